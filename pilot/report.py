"""`pilot report RUN_DIR`: one self-contained HTML page (and its PNG figures, and summary.json) about a run.

    python -m pilot.report runs/demo                  # writes runs/demo/report/index.html
    python -m pilot.report RUN_DIR --out /tmp/r --png # also a screenshot of the page (headless Chromium)

It reads only the run directory's logs (pilot/report_logs.py: the run-log contract) and shows:
the curtailment timeline per site with the regime shaded and the moments each site trained; loss and
validation bits per byte against wall time and tokens, federated against centralized; energy inside and
outside the windows; emissions against the same training at each single site; compute utilisation.
Every number on the page is in report/summary.json (the page is rendered from it).

Method (also stated on the page, `METHOD`):
- Simulated time: a step that took `seconds` of wall time and ended at `sim_ts` trained over
  [sim_ts - seconds * speedup, sim_ts] of simulated time (speedup: energy_config.json; when it is absent or
  0, simulated over wall seconds between the first and the last server event).
- Energy: a site is held by the run while its window is open (and the run is live) and while it works in a
  round (site-result sim_start..sim_end), even outside its window. Held time draws training power while
  it steps and idle power otherwise; time not held draws nothing (the hosts are not the run's then).
- Emissions, default method: energy drawn inside the site's curtailment window is surplus renewable energy
  that would otherwise be curtailed: zero marginal emissions. Energy outside windows comes from the grid at
  DEFAULT_INTENSITY_KG_PER_KWH (EIA's 2023 U.S. average; `--intensity` changes it). MOER method, for sites
  whose scenario has a MOER trace: all energy times the trace's marginal rate (pilot/energy/accounting.py).
- Single-site runs: the run's training GPU-hours at one site, training without pause from the run's first
  training moment (accounting.baselines); under the default method that run's energy inside the site's
  logged windows is zero, and beyond the logged record it is counted as grid energy.
- Utilisation: simulated seconds trained (union of the step intervals) / simulated seconds curtailed while
  the run was live (from each start/resume event to the last event of that server incarnation).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from pilot import report_figures
from pilot.report_logs import LogError, RunLogs, read_run

DEFAULT_INTENSITY_KG_PER_KWH = 0.367   # EIA: U.S. utility-scale generation 2023, 0.81 lb CO2/kWh
INTENSITY_SOURCE = ("EIA, 'How much carbon dioxide is produced per kilowatthour of U.S. electricity generation?' "
                    "(2023: 0.81 lb CO2/kWh = 0.367 kg/kWh)")
REPORT_DIR = "report"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
REGIMES = ("paused", "solo", "federated")

Span = tuple[float, float]


# ------------------------------------------------------------------ intervals (sorted, disjoint, half-open)
def union(intervals: Iterable[Span]) -> list[Span]:
    out: list[Span] = []
    for s, e in sorted((float(s), float(e)) for s, e in intervals if e > s):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def intersect(a: Sequence[Span], b: Sequence[Span]) -> list[Span]:
    """Both sorted and disjoint: one sweep (runs have tens of thousands of step intervals)."""
    out: list[Span] = []
    i = j = 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if e > s:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return union(out)


def subtract(a: Sequence[Span], b: Sequence[Span]) -> list[Span]:
    """`a` minus `b`, both sorted and disjoint."""
    out: list[Span] = []
    j = 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k, at = j, s
        while k < len(b) and b[k][0] < e:
            if b[k][0] > at:
                out.append((at, b[k][0]))
            at = max(at, b[k][1])
            k += 1
        if e > at:
            out.append((at, e))
    return union(out)


def length(intervals: Iterable[Span]) -> float:
    return float(sum(e - s for s, e in intervals))


# ------------------------------------------------------------------ the run's structure
def sim_times(logs: RunLogs) -> list[float]:
    values = [e["sim_ts"] for e in logs.events or [] if e.get("sim_ts") is not None]
    values += [s["sim_ts"] for s in logs.steps or [] if s.get("sim_ts") is not None]
    return [float(v) for v in values]


def scenario_start(logs: RunLogs) -> float | None:
    config = logs.energy_config or {}
    head = config.get("scenario") if isinstance(config.get("scenario"), dict) else config
    try:
        return datetime.fromisoformat(str(head["start"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return None


def place_early_events(logs: RunLogs, notes: list[str]) -> None:
    """Server events logged before the energy simulation published its first clock have no sim_ts; the
    simulation then starts at its scenario's start, so that is where they happened on the simulated clock
    (a server that waited, paused, for the simulation was live from its first moment)."""
    events = logs.events or []
    first_known = next((i for i, e in enumerate(events) if e.get("sim_ts") is not None), None)
    origin = scenario_start(logs)
    if not first_known or origin is None or origin > float(events[first_known]["sim_ts"]):
        return
    for event in events[:first_known]:
        event["sim_ts"] = origin
    notes.append(f"{first_known} server event(s) logged before the energy simulation's clock started are placed "
                 f"at the scenario's start ({iso(origin)})")


def live_spans(logs: RunLogs) -> list[Span]:
    """Simulated spans while a server incarnation was logging: from its first event (setup, or start/resume
    without one) to its last."""
    spans: list[list[float]] = []
    current: list[float] | None = None
    only_setup = False
    for event in logs.events or []:
        kind = event["kind"]
        if current is None or kind == "setup" or (kind in ("start", "resume") and not only_setup):
            current = []
            spans.append(current)
        only_setup = kind == "setup"
        if event.get("sim_ts") is not None:
            current.append(float(event["sim_ts"]))
    out = union((min(s), max(s)) for s in spans if len(s) >= 2)
    if not out:   # no server events on the simulated clock: the steps' span
        steps = [float(s["sim_ts"]) for s in logs.steps or [] if s.get("sim_ts") is not None]
        out = [(min(steps), max(steps))] if len(steps) >= 2 else []
    return out


def speedup_of(logs: RunLogs) -> tuple[float | None, str]:
    config = logs.energy_config or {}
    value = config.get("speedup")
    if isinstance(value, (int, float)) and value > 0:
        return float(value), "energy_config.json"
    timed = [(e["wall_ts"], e["sim_ts"]) for e in logs.events or [] if e.get("sim_ts") is not None]
    if len(timed) >= 2 and timed[-1][0] > timed[0][0]:
        return (timed[-1][1] - timed[0][1]) / (timed[-1][0] - timed[0][0]), "estimated from server events"
    return None, "unknown (no simulated clock in the logs)"


def config_sites(logs: RunLogs) -> list[dict[str, Any]]:
    config = logs.energy_config or {}
    return [s for s in config.get("sites", []) if isinstance(s, dict) and "name" in s]


def site_names(logs: RunLogs) -> list[str]:
    names = [str(s["name"]) for s in config_sites(logs)]
    seen = set(names)
    others = {str(r["site"]) for r in (logs.energy or []) + (logs.steps or [])}
    others |= {str(e["site"]) for e in logs.events or [] if e["kind"] == "site-result"}
    return names + sorted(others - seen)


def windows_by_site(logs: RunLogs, sites: Sequence[str], horizon: Span) -> dict[str, list[Span]]:
    """Curtailment windows from the transitions; a window open at the first transition's close started
    before the record (horizon start); one still open at the end runs to the horizon's end."""
    out: dict[str, list[Span]] = {s: [] for s in sites}
    opened: dict[str, float | None] = {}
    for event in sorted(logs.energy or [], key=lambda r: float(r["sim_ts"])):
        site, t, on = str(event["site"]), float(event["sim_ts"]), bool(int(event["curtailed"]))
        if site not in opened:   # the first transition of a site says what it was before
            opened[site] = None if on else horizon[0]
        if on and opened[site] is None:
            opened[site] = t
        elif not on and opened[site] is not None:
            out.setdefault(site, []).append((min(opened[site], t), t))
            opened[site] = None
    for site, start in opened.items():
        if start is not None and horizon[1] > start:
            out.setdefault(site, []).append((start, horizon[1]))
    return {s: union(w) for s, w in out.items()}


def training_by_site(logs: RunLogs, sites: Sequence[str], speedup: float | None) -> dict[str, list[Span]]:
    """Simulated intervals each site spent in optimizer steps (steps.jsonl); for a site without step
    records, its site-result's training seconds from the moment it received the round."""
    out: dict[str, list[Span]] = {s: [] for s in sites}
    if speedup is None:
        return out
    for site in sites:
        steps = sorted((float(r["sim_ts"]), float(r["seconds"])) for r in logs.steps or []
                       if str(r["site"]) == site and r.get("sim_ts") is not None)
        intervals: list[Span] = []
        last_end = -math.inf
        for end, seconds in steps:
            # a step lasts its wall seconds x speed-up; when the logged clock lagged (steps stamped with the
            # same simulated moment while the simulation's next step was late) it starts where the previous
            # one ended, so no training time is lost to the stamping
            start = max(end - seconds * speedup, last_end)
            end = start + seconds * speedup
            if end > start:
                intervals.append((start, end))
            last_end = max(last_end, end)
        if not steps:
            for r in results(logs, site):
                dur = min(float(r["seconds_training"]) * speedup, float(r["sim_end"]) - float(r["sim_start"]))
                intervals.append((float(r["sim_start"]), float(r["sim_start"]) + max(dur, 0.0)))
        out[site] = union(intervals)
    return out


def results(logs: RunLogs, site: str | None = None) -> list[dict[str, Any]]:
    return [e for e in logs.events or [] if e["kind"] == "site-result" and (site is None or str(e["site"]) == site)
            and e.get("sim_start") is not None and e.get("sim_end") is not None]


def regime_spans(logs: RunLogs, live: Sequence[Span]) -> list[tuple[float, float, str]]:
    """The federation's regime over simulated time: each regime event holds until the next one (or the
    end of its live span)."""
    changes = [(float(e["sim_ts"]), str(e["regime"])) for e in logs.events or []
               if e["kind"] == "regime" and e.get("sim_ts") is not None]
    out: list[tuple[float, float, str]] = []
    for i, (t, regime) in enumerate(changes):
        nxt = changes[i + 1][0] if i + 1 < len(changes) else math.inf
        span_end = next((e for s, e in live if s <= t <= e), t)
        end = min(nxt, span_end)
        if end > t:
            out.append((t, end, regime))
    return out


# ------------------------------------------------------------------ learning curves
def learning_series(logs: RunLogs) -> dict[str, Any]:
    events = logs.events or []
    steps = sorted(logs.steps or [], key=lambda r: float(r["wall_ts"]))
    t0_candidates = [float(e["wall_ts"]) for e in events[:1]]
    t0_candidates += [float(s["wall_ts"]) - float(s["seconds"]) for s in steps[:1]]
    t0 = min(t0_candidates) if t0_candidates else 0.0
    per_site: dict[str, dict[str, list[float]]] = {}
    tokens = 0.0
    for s in steps:
        tokens += float(s["tokens"])
        row = per_site.setdefault(str(s["site"]), {"wall_s": [], "tokens": [], "loss": []})
        if s.get("loss") is not None and math.isfinite(float(s["loss"])):
            row["wall_s"].append(float(s["wall_ts"]) - t0)
            row["tokens"].append(tokens)
            row["loss"].append(float(s["loss"]))
    val: dict[str, list[float]] = {"wall_s": [], "tokens": [], "val_bpb": []}
    running = 0.0
    for e in events:
        if e["kind"] != "round-end":
            continue
        running = float(e.get("total_tokens", running + float(e.get("tokens") or 0)))
        if e.get("val_bpb") is not None:
            val["wall_s"].append(float(e["wall_ts"]) - t0)
            val["tokens"].append(running)
            val["val_bpb"].append(float(e["val_bpb"]))
    return {"t0": t0, "steps": per_site, "val": val, "baseline": baseline_series(logs)}


def baseline_series(logs: RunLogs) -> dict[str, list[float]] | None:
    if not logs.baseline:
        return None
    rows = logs.baseline
    first = rows[0]
    if first.get("wall_ts") is not None:
        t0 = float(first["wall_ts"]) - float(first.get("dt") or 0.0)
    else:
        t0 = 0.0
    out: dict[str, list[float]] = {k: [] for k in ("wall_s", "tokens", "loss", "val_wall_s", "val_tokens", "val_bpb")}
    elapsed = 0.0
    for r in rows:
        elapsed += float(r.get("dt") or 0.0)
        wall = float(r["wall_ts"]) - t0 if r.get("wall_ts") is not None else elapsed
        tokens = float(r.get("tokens") or 0.0)
        if r.get("loss") is not None:
            out["wall_s"].append(wall)
            out["tokens"].append(tokens)
            out["loss"].append(float(r["loss"]))
        if r.get("val_bpb") is not None:
            out["val_wall_s"].append(wall)
            out["val_tokens"].append(tokens)
            out["val_bpb"].append(float(r["val_bpb"]))
    return out


# ------------------------------------------------------------------ energy and emissions
def load_moer(logs: RunLogs, notes: list[str]) -> dict[str, Any]:
    """MOER traces (region -> series) of the scenario's MOER sites, when the scenario file is readable."""
    path = (logs.energy_config or {}).get("scenario_path")
    moer_sites = [s for s in config_sites(logs) if s.get("signal") == "moer"]
    if not moer_sites:
        return {}
    if not path or not Path(path).is_file():
        notes.append(f"MOER sites {[s['name'] for s in moer_sites]}: the scenario file ({path or 'not logged'}) "
                     "is not readable here; their MOER emissions are not shown (give it with --scenario)")
        return {}
    from pilot.energy import sites as energy_sites  # noqa: PLC0415
    from pilot.energy import traces  # noqa: PLC0415

    out: dict[str, Any] = {}
    try:
        scn = energy_sites.load_scenario(path)
        for site in scn.sites:
            source = site.options.get("moer_trace")
            if site.signal != "moer" or not source:
                continue
            if source == "watttime":   # downloaded by the simulation: its cached file, never the network
                from pilot.energy import watttime  # noqa: PLC0415

                source = str(watttime.cache_path(watttime.default_cache_dir(), site.region, scn.start, scn.end))
            if not Path(str(source)).is_file():
                notes.append(f"site {site.name}: MOER trace {source!r} is not a local file; no MOER emissions")
                continue
            out.update({r: s for r, s in traces.read_moer_csv(source).items() if r == site.region})
    except (OSError, ValueError) as error:
        notes.append(f"MOER traces of {path} could not be read ({error}); no MOER emissions")
        return {}
    return out


def clip_trace(series: Any, lo: float, hi: float) -> Any:
    """The samples of a MOER trace that matter for [lo, hi]: from the one in force at `lo` to one past `hi`."""
    from pilot.energy import traces  # noqa: PLC0415

    times = traces.epoch_seconds(series.index)
    first = max(0, int(np.searchsorted(times, lo, side="right")) - 1)
    last = max(first + 2, int(np.searchsorted(times, hi, side="right")) + 1)
    return series.iloc[first:last]


def energy_and_emissions(logs: RunLogs, sites: Sequence[str], windows: dict[str, list[Span]],
                         training: dict[str, list[Span]], live: Sequence[Span], intensity: float,
                         notes: list[str]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    from pilot.energy import accounting  # noqa: PLC0415
    from pilot.energy.accounting import Interval  # noqa: PLC0415
    from pilot.energy.sites import Site  # noqa: PLC0415

    configured = {str(s["name"]): Site(str(s["name"]), str(s.get("region", "?")), str(s.get("signal", "?")),
                                       int(s.get("gpus", 0)), float(s.get("gpu_train_kw", 0.0)),
                                       float(s.get("gpu_idle_kw", 0.0))) for s in config_sites(logs)}
    if not configured:
        notes.append("no energy configuration (logs/energy_config.json): energy and emissions are not available")
        return None, None
    missing = [s for s in sites if s not in configured]
    if missing:
        notes.append(f"sites {missing} are not in energy_config.json: their energy is not counted")
    schedule: dict[str, list[Interval]] = {}
    for name in configured:
        rounds = union((float(r["sim_start"]), float(r["sim_end"])) for r in results(logs, name))
        held = union(intersect(windows.get(name, []), live) + rounds + training.get(name, []))
        idle = subtract(held, training.get(name, []))
        schedule[name] = sorted([Interval(s, e, "train") for s, e in training.get(name, [])]
                                + [Interval(s, e, "idle") for s, e in idle], key=lambda iv: iv.start)
    win = {n: windows.get(n, []) for n in configured}
    moer = load_moer(logs, notes)
    if moer and live:   # only the part a schedule or a single-site run can reach: a year of 5-min samples is slow
        gpus = [s.gpus for s in configured.values() if s.gpus > 0] or [1]
        lo = live[0][0]
        hi = live[-1][1] + (live[-1][1] - lo) * sum(gpus) / min(gpus) + 86400.0
        moer = {region: clip_trace(series, lo, hi) for region, series in moer.items()}
    # energy inside windows by a sweep here (accounting's per-interval window scan is quadratic in steps)
    try:
        acc = accounting.account(schedule, configured, moer)
    except ValueError as error:   # a trace that does not cover the run: energy without MOER emissions
        notes.append(f"MOER emissions not available: {error}")
        moer = {}
        acc = accounting.account(schedule, configured, {})
    for name, row in acc["sites"].items():
        train, idle = training.get(name, []), [(iv.start, iv.end) for iv in schedule[name] if iv.mode == "idle"]
        row["in_windows_kwh"] = (configured[name].train_kw * length(intersect(train, win[name]))
                                 + configured[name].idle_kw * length(intersect(idle, win[name]))) / 3600.0
        row["share_in_windows"] = row["in_windows_kwh"] / row["energy_kwh"] if row["energy_kwh"] else None
    acc["total"]["in_windows_kwh"] = sum(row["in_windows_kwh"] for row in acc["sites"].values())
    acc["total"]["share_in_windows"] = (acc["total"]["in_windows_kwh"] / acc["total"]["energy_kwh"]
                                        if acc["total"]["energy_kwh"] else None)
    energy: dict[str, Any] = {"sites": {}, "total": {}}
    keys = ("train_kwh", "idle_kwh", "energy_kwh", "in_windows_kwh", "outside_windows_kwh", "share_in_windows")
    for name, row in acc["sites"].items():
        row = dict(row, outside_windows_kwh=row["energy_kwh"] - row["in_windows_kwh"])
        energy["sites"][name] = {k: row[k] for k in keys} | {"train_hours": row["train_hours"],
                                                             "gpus": configured[name].gpus}
    total = acc["total"]
    energy["total"] = {k: total[k] for k in keys if k in total} | {
        "outside_windows_kwh": total["energy_kwh"] - total["in_windows_kwh"],
        "train_gpu_hours": total["train_gpu_hours"]}
    record_end = max((e for w in win.values() for _, e in w), default=-math.inf)
    record_end = max([record_end] + [e for _, e in live])
    emissions: dict[str, Any] = {
        "default_intensity_kg_per_kwh": intensity, "intensity_source": INTENSITY_SOURCE,
        "moer_regions": sorted(moer), "sites": {}, "total": {}, "single_site": {}}
    for name, row in acc["sites"].items():
        emissions["sites"][name] = {"default_kg": (row["energy_kwh"] - row["in_windows_kwh"]) * intensity,
                                    "moer_kg": row["emissions_kg"]}
    emissions["total"] = {"default_kg": sum(r["default_kg"] for r in emissions["sites"].values()),
                          "moer_kg": acc["total"]["emissions_kg"] if moer else None}
    for name, base in acc["baselines"].items():
        site = configured[name]
        start = min((s for w in training.values() for s, _ in w), default=math.nan)
        end = start + base["hours"] * 3600.0
        inside_s = sum(max(0.0, min(e, end) - max(s, start)) for s, e in win[name])
        beyond_h = max(0.0, end - max(record_end, start)) / 3600.0
        default_kg = (base["energy_kwh"] - site.train_kw * inside_s / 3600.0) * intensity
        emissions["single_site"][name] = {
            "hours": base["hours"], "energy_kwh": base["energy_kwh"],
            "in_windows_kwh": site.train_kw * inside_s / 3600.0, "beyond_record_hours": beyond_h,
            "default_kg": default_kg, "moer_kg": base["emissions_kg"],
            "run_over_single_default": (emissions["total"]["default_kg"] / default_kg if default_kg > 0 else None)}
    return energy, emissions


# ------------------------------------------------------------------ the summary
def summarize(logs: RunLogs, intensity: float = DEFAULT_INTENSITY_KG_PER_KWH) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every number of the report (JSON-ready) and the series and intervals the figures draw."""
    notes: list[str] = []
    place_early_events(logs, notes)
    events = logs.events or []
    steps = logs.steps or []
    sites = site_names(logs)
    speedup, speedup_source = speedup_of(logs)
    live = live_spans(logs)
    times = sim_times(logs) + [float(r["sim_ts"]) for r in logs.energy or []]
    run_times = sim_times(logs)
    horizon = (min(run_times), max(times)) if run_times else None
    if logs.energy is None:
        notes.append("no energy transitions (logs/energy.jsonl): no curtailment windows")
    windows = windows_by_site(logs, sites, horizon) if horizon else {s: [] for s in sites}
    windows = {s: intersect(w, [horizon]) if horizon else w for s, w in windows.items()}
    training = training_by_site(logs, sites, speedup)
    regimes = regime_spans(logs, live)

    # -------- run
    round_ends = [e for e in events if e["kind"] == "round-end"]
    finished = [e for e in events if e["kind"] == "finished"]
    vals = [e for e in round_ends if e.get("val_bpb") is not None]
    tokens_stepped = sum(float(s["tokens"]) for s in steps)
    if round_ends and round_ends[-1].get("total_tokens") is not None:
        tokens = float(round_ends[-1]["total_tokens"])
    elif finished and finished[-1].get("tokens") is not None:
        tokens = float(finished[-1]["tokens"])
    else:
        tokens = tokens_stepped
    walls = [float(e["wall_ts"]) for e in events] + [float(s["wall_ts"]) for s in steps]
    run = {
        "rounds": len({int(e["round"]) for e in round_ends}),
        "tokens": tokens, "tokens_stepped": tokens_stepped, "steps": len(steps),
        "final_val_bpb": float(vals[-1]["val_bpb"]) if vals else None,
        "final_val_bpb_tokens": float(vals[-1]["total_tokens"]) if vals and vals[-1].get("total_tokens") is not None
        else None,
        "wall_s": (max(walls) - min(walls)) if walls else 0.0,
        "outcome": str(finished[-1]["outcome"]) if finished else "unfinished (no 'finished' event)",
        "speedup": speedup, "speedup_source": speedup_source,
        "sim_start": horizon[0] if horizon else None, "sim_end": horizon[1] if horizon else None,
        "live_sim_s": length(live), "incarnations": sum(1 for e in events if e["kind"] in ("start", "resume")),
        "regime_sim_s": {r: float(sum(e - s for s, e, g in regimes if g == r)) for r in REGIMES},
    }
    # -------- baseline
    base_series = baseline_series(logs)
    baseline: dict[str, Any] | None = None
    if logs.baseline is None:
        notes.append("no centralized baseline (baseline/metrics.jsonl): federated curves only")
    else:
        rows = logs.baseline
        bvals = [r for r in rows if r.get("val_bpb") is not None]
        at_equal = min(bvals, key=lambda r: abs(float(r.get("tokens") or 0.0) - tokens)) if bvals else None
        bwall = base_series["wall_s"] + base_series["val_wall_s"] if base_series else []
        baseline = {"steps": len(rows), "tokens": float(rows[-1].get("tokens") or 0.0),
                    "final_val_bpb": float(bvals[-1]["val_bpb"]) if bvals else None,
                    "wall_s": max(bwall) if bwall else None,
                    "val_bpb_at_equal_tokens": float(at_equal["val_bpb"]) if at_equal else None,
                    "val_bpb_at_equal_tokens_tokens": float(at_equal.get("tokens") or 0.0) if at_equal else None}
    # -------- per site
    per_site: dict[str, Any] = {}
    for site in sites:
        site_steps = [s for s in steps if str(s["site"]) == site]
        site_results = [e for e in events if e["kind"] == "site-result" and str(e["site"]) == site]
        curtailed_live = intersect(windows.get(site, []), live)
        train_sim = length(training.get(site, []))
        per_site[site] = {
            "windows": len(windows.get(site, [])), "curtailed_s": length(windows.get(site, [])),
            "curtailed_live_s": length(curtailed_live),
            "steps": len(site_steps), "tokens_stepped": sum(float(s["tokens"]) for s in site_steps),
            "tokens_results": sum(float(e["tokens"]) for e in site_results),
            "rounds": len({int(e["round"]) for e in site_results}),
            "train_wall_s": sum(float(s["seconds"]) for s in site_steps) if site_steps
            else sum(float(e["seconds_training"]) for e in site_results),
            "train_sim_s": train_sim,
            "train_in_windows_sim_s": length(intersect(training.get(site, []), windows.get(site, []))),
        }
    util_sites = {s: {"curtailed_s": v["curtailed_live_s"], "train_sim_s": v["train_sim_s"],
                      "utilisation": (v["train_sim_s"] / v["curtailed_live_s"] if v["curtailed_live_s"] else None)}
                  for s, v in per_site.items()}
    total_c = sum(v["curtailed_s"] for v in util_sites.values())
    total_t = sum(v["train_sim_s"] for v in util_sites.values())
    utilisation = {"sites": util_sites, "total": {"curtailed_s": total_c, "train_sim_s": total_t,
                                                  "utilisation": total_t / total_c if total_c else None}}
    if speedup is None:
        notes.append("no simulated clock in the logs: timeline, energy and utilisation are not available")
    energy, emissions = (energy_and_emissions(logs, sites, windows, training, live, intensity, notes)
                         if horizon and speedup else (None, None))
    summary = {
        "run_dir": str(logs.run_dir), "generated_wall_ts": time.time(),
        "inputs": dict(logs.lines) | {"logs/energy_config.json": logs.energy_config is not None},
        "notes": notes, "warnings": list(logs.warnings),
        "run": run, "baseline": baseline, "sites": per_site, "utilisation": utilisation,
        "energy": energy, "emissions": emissions,
    }
    drawing = {"sites": sites, "windows": windows, "training": training, "regimes": regimes, "horizon": horizon,
               "series": learning_series(logs)}
    return summary, drawing


# ------------------------------------------------------------------ the page
def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value.is_integer() and 1000 <= abs(value) < 1e15:   # token counts and the like
            return f"{int(value):,}"
        return f"{value:,.{digits}f}" if abs(value) >= 10 ** -digits else f"{value:.{digits}g}"
    return html.escape(str(value))


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def iso(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


METHOD = """
<p><b>Simulated time.</b> A step that took <i>s</i> wall seconds and ended at simulated time <i>t</i> trained over
[<i>t</i> − <i>s</i>·speedup, <i>t</i>] (started where the previous step ended when the logged clock lagged, so that no step time is lost). Windows come from the curtailment transitions the server read
(logs/energy.jsonl); the run was live from each start/resume event to the last event of that server.</p>
<p><b>Wall time.</b> Federated: seconds since the server's first event (setup and start-up included);
centralized: seconds since its first step began.</p>
<p><b>Energy.</b> A site is held by the run while its window is open (and the run is live) and while it works in a
round (from receiving the round to handing in its result), also outside its window. Held time draws the site's
training power (GPUs × gpu_train_kw) while it steps and its idle power (GPUs × gpu_idle_kw) otherwise; time not held
draws nothing.</p>
<p><b>Emissions.</b> Default method: energy drawn inside a site's curtailment window is surplus renewable energy that
would otherwise be curtailed, so it counts as zero marginal emissions; energy outside windows comes from the grid at
{intensity:g} kg CO2/kWh ({source}). MOER method (sites whose scenario has a MOER trace): all energy × the trace's
marginal emission rate. A single-site run places all of this run's training GPU-hours at one site, training without
pause from the run's first training moment; under the default method its energy inside that site's logged windows
is zero and any part beyond the logged record counts as grid energy.</p>
<p><b>Utilisation.</b> Simulated seconds spent in optimizer steps / simulated seconds curtailed while the run was
live.</p>
"""

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px} th,td{border:1px solid #ccc;padding:3px 8px;
text-align:right} th{background:#f0f3f6} td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee} .note{background:#fff7e0;border-left:4px solid #e0a800;padding:6px 10px;
margin:4px 0;font-size:13px} .warn{background:#fdecea;border-left:4px solid #d9534f;padding:6px 10px;margin:4px 0;
font-size:13px} .small{font-size:12px;color:#555}
"""


def img(path: Path | None, alt: str) -> str:
    if path is None:
        return f'<p class="note">{html.escape(alt)}: not available (see the notes above).</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>' \
           f'<p class="small">also as <a href="{html.escape(path.name)}">{html.escape(path.name)}</a></p>'


def render_html(summary: dict[str, Any], figures: dict[str, Path | None]) -> str:
    run, base, sites = summary["run"], summary["baseline"], summary["sites"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Pilot run report</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Pilot run report</h1><p class='small'>{html.escape(summary['run_dir'])} · generated "
             f"{iso(summary['generated_wall_ts'])} · every number here is in summary.json</p>"]
    for note in summary["notes"]:
        parts.append(f"<div class='note'>{html.escape(note)}</div>")
    for warning in summary["warnings"]:
        parts.append(f"<div class='warn'>{html.escape(warning)}</div>")
    parts.append("<h2>Summary</h2>")
    rows = [("rounds", fmt(run["rounds"]), "–"),
            ("tokens", fmt(run["tokens"]), fmt(base["tokens"]) if base else "–"),
            ("final validation bits per byte", fmt(run["final_val_bpb"], 4), fmt(base["final_val_bpb"], 4) if base else "–"),
            ("centralized val bpb at equal tokens (tokens)", "–",
             f"{fmt(base['val_bpb_at_equal_tokens'], 4)} ({fmt(base['val_bpb_at_equal_tokens_tokens'])})" if base else "–"),
            ("wall time (s)", fmt(run["wall_s"], 1), fmt(base["wall_s"], 1) if base else "–"),
            ("optimizer steps", fmt(run["steps"]), fmt(base["steps"]) if base else "–"),
            ("outcome", fmt(run["outcome"]), "–")]
    parts.append(table(("", "federated", "centralized"), rows))
    parts.append(table(("simulated clock", ""), [
        ("span", f"{iso(run['sim_start'])} → {iso(run['sim_end'])}"),
        ("speedup (simulated s per wall s)", f"{fmt(run['speedup'], 2)} ({fmt(run['speedup_source'])})"),
        ("live simulated hours", fmt(run["live_sim_s"] / 3600, 2)),
        ("server incarnations", fmt(run["incarnations"])),
        *((f"hours in regime {r}", fmt(s / 3600, 2)) for r, s in run["regime_sim_s"].items())]))
    parts.append("<h2>Curtailment timeline</h2>" + img(figures.get("timeline"), "curtailment timeline"))
    parts.append(table(("site", "windows", "curtailed h", "curtailed h (run live)", "rounds", "steps",
                        "tokens (steps)", "tokens (results)", "training wall s", "training sim h",
                        "training inside windows sim h"),
                       [(html.escape(s), fmt(v["windows"]), fmt(v["curtailed_s"] / 3600, 2),
                         fmt(v["curtailed_live_s"] / 3600, 2), fmt(v["rounds"]), fmt(v["steps"]),
                         fmt(v["tokens_stepped"]), fmt(v["tokens_results"]), fmt(v["train_wall_s"], 1),
                         fmt(v["train_sim_s"] / 3600, 2), fmt(v["train_in_windows_sim_s"] / 3600, 2))
                        for s, v in sites.items()]))
    parts.append("<h2>Loss and validation bits per byte</h2>" + img(figures.get("learning"), "learning curves"))
    parts.append("<h2>Energy, emissions and utilisation</h2>" + img(figures.get("energy"), "energy and emissions"))
    energy, em, util = summary["energy"], summary["emissions"], summary["utilisation"]
    if energy:
        parts.append(table(("site", "GPUs", "training kWh", "idle kWh", "total kWh", "inside windows kWh",
                            "outside windows kWh", "share inside", "kg CO2 (default)", "kg CO2 (MOER)"),
                           [(html.escape(n), fmt(r["gpus"]), fmt(r["train_kwh"]), fmt(r["idle_kwh"]),
                             fmt(r["energy_kwh"]), fmt(r["in_windows_kwh"]), fmt(r["outside_windows_kwh"]),
                             pct(r["share_in_windows"]), fmt(em["sites"][n]["default_kg"]),
                             fmt(em["sites"][n]["moer_kg"])) for n, r in energy["sites"].items()]
                           + [("total", "–", fmt(energy["total"]["train_kwh"]), fmt(energy["total"]["idle_kwh"]),
                               fmt(energy["total"]["energy_kwh"]), fmt(energy["total"]["in_windows_kwh"]),
                               fmt(energy["total"]["outside_windows_kwh"]), pct(energy["total"]["share_in_windows"]),
                               fmt(em["total"]["default_kg"]), fmt(em["total"]["moer_kg"]))]))
        parts.append(f"<p>Training GPU-hours of the run: {fmt(energy['total']['train_gpu_hours'])}.</p>")
        parts.append(table(("same training at one site", "hours", "kWh", "inside windows kWh",
                            "hours beyond the logged record", "kg CO2 (default)", "kg CO2 (MOER)",
                            "this run / single site (default)"),
                           [(f"only {html.escape(n)}", fmt(b["hours"], 2), fmt(b["energy_kwh"]),
                             fmt(b["in_windows_kwh"]), fmt(b["beyond_record_hours"], 2), fmt(b["default_kg"]),
                             fmt(b["moer_kg"]), pct(b["run_over_single_default"]))
                            for n, b in em["single_site"].items()]))
    parts.append(table(("site", "curtailed sim h (run live)", "training sim h", "utilisation"),
                       [(html.escape(n), fmt(u["curtailed_s"] / 3600, 2), fmt(u["train_sim_s"] / 3600, 2),
                         pct(u["utilisation"])) for n, u in util["sites"].items()]
                       + [("total", fmt(util["total"]["curtailed_s"] / 3600, 2),
                           fmt(util["total"]["train_sim_s"] / 3600, 2), pct(util["total"]["utilisation"]))]))
    intensity = em["default_intensity_kg_per_kwh"] if em else DEFAULT_INTENSITY_KG_PER_KWH
    parts.append("<h2>Method</h2>" + METHOD.format(intensity=intensity, source=html.escape(INTENSITY_SOURCE)))
    parts.append("<h2>Inputs</h2>" + table(("file", "records"), [(html.escape(k), fmt(v))
                                                                 for k, v in summary["inputs"].items()]))
    parts.append("</body></html>")
    return "\n".join(parts)


def build(run_dir: str | Path, out_dir: str | Path | None = None,
          intensity: float = DEFAULT_INTENSITY_KG_PER_KWH, scenario: str | Path | None = None) -> Path:
    """Read the logs, write summary.json, the figures and index.html into `out_dir` (RUN_DIR/report).
    `scenario`: the scenario file, for its MOER traces, when energy_config.json does not name it."""
    logs = read_run(run_dir)
    if scenario is not None and logs.energy_config is not None:
        logs.energy_config["scenario_path"] = str(scenario)
    out = Path(out_dir) if out_dir else Path(run_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    summary, drawing = summarize(logs, intensity)
    figures: dict[str, Path | None] = {"timeline": None, "learning": None, "energy": None}
    if drawing["horizon"] and drawing["horizon"][1] > drawing["horizon"][0]:
        figures["timeline"] = report_figures.timeline(out / "timeline.png", drawing["sites"], drawing["windows"],
                                                      drawing["training"], drawing["regimes"], drawing["horizon"])
    figures["learning"] = report_figures.learning_curves(out / "learning.png", drawing["series"])
    if summary["energy"]:
        figures["energy"] = report_figures.energy(out / "energy.png", summary)
    summary["figures"] = {k: (v.name if v else None) for k, v in figures.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False, default=_json_default) + "\n")
    page = out / "index.html"
    page.write_text(render_html(summary, figures), encoding="utf-8")
    return page


def _json_default(value: Any) -> Any:
    raise TypeError(f"not JSON: {value!r}")


# ------------------------------------------------------------------ screenshots
def chromium_binary() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(f"no headless browser found (looked for {', '.join(CHROMIUM_NAMES)} on PATH); "
                            "install Debian's chromium (system-packages.txt)")


def render_png(html_path: str | Path, png_path: str | Path, width: int = 1200, height: int = 3000,
               timeout_s: float = 90.0) -> Path:
    """A screenshot of a local HTML page by headless Chromium (a fresh profile, no network chatter)."""
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pilot-chromium-") as profile:
        cmd = [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png_path}",
               f"--window-size={width},{height}", html_path.as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0 or not png_path.is_file():
        raise RuntimeError(f"chromium could not render {html_path} (exit {done.returncode}): {done.stderr[-800:]}")
    return png_path


# ------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pilot report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Method:\n" + __doc__.split("Method (also stated on the page, `METHOD`):")[1])
    parser.add_argument("run_dir", help="the run directory (holds logs/events.jsonl, logs/steps.jsonl, ...)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    parser.add_argument("--intensity", type=float, default=DEFAULT_INTENSITY_KG_PER_KWH,
                        help="grid carbon intensity outside curtailment windows, kg CO2/kWh "
                             f"(default {DEFAULT_INTENSITY_KG_PER_KWH}: U.S. average 2023, EIA)")
    parser.add_argument("--scenario", default=None,
                        help="the run's scenario TOML, for MOER traces (default: the one energy_config.json names)")
    parser.add_argument("--png", action="store_true", help="also screenshot the page to index.png (headless Chromium)")
    args = parser.parse_args(argv)
    if not (args.intensity >= 0 and math.isfinite(args.intensity)):
        parser.error(f"--intensity must be a non-negative number, got {args.intensity}")
    try:
        page = build(args.run_dir, args.out, args.intensity, args.scenario)
    except LogError as error:
        print(f"pilot report: error: {error}", file=sys.stderr)
        return 2
    print(page)
    if args.png:
        print(render_png(page, page.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
