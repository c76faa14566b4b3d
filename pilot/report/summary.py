"""The summary of a run: every number of the report page (summary.json), computed from the run's logs alone.

It reads only the run directory's logs (pilot/report/logs.py: the run-log contract) and shows:
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

import math
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from pilot.report.logs import RunLogs
from pilot.report.spans import Span, intersect, length, subtract, union

DEFAULT_INTENSITY_KG_PER_KWH = 0.367   # EIA: U.S. utility-scale generation 2023, 0.81 lb CO2/kWh
INTENSITY_SOURCE = ("EIA, 'How much carbon dioxide is produced per kilowatthour of U.S. electricity generation?' "
                    "(2023: 0.81 lb CO2/kWh = 0.367 kg/kWh)")
REPORT_DIR = "report"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
REGIMES = ("paused", "solo", "federated")

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


def regime_lags(logs: RunLogs) -> list[float]:
    """Simulated seconds from the last window change (any site) to each regime change the server logged: the
    server acts on a window change when the round in progress has ended (its sites stop within a step and
    hand their work in) and the next one is dispatched, so the regime trails the windows by that reaction
    time, in simulated time (wall seconds x the speed-up)."""
    changes = sorted(float(e["sim_ts"]) for e in logs.energy or [] if e.get("sim_ts") is not None)
    lags = []
    for event in logs.events or []:
        if event["kind"] != "regime" or event.get("sim_ts") is None:
            continue
        t = float(event["sim_ts"])
        before = [c for c in changes if c <= t]
        if before:
            lags.append(t - before[-1])
    return lags


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


# ------------------------------------------------------------------ the centralized baselines
def baseline_summary(rows: list[dict[str, Any]] | None, tokens: float, label: str) -> dict[str, Any] | None:
    """A base_train run's figures: its batch and steps, final val bpb and the val bpb nearest the federation's
    tokens (`tokens`)."""
    if rows is None:
        return None
    series = baseline_series(rows)
    vals = [r for r in rows if r.get("val_bpb") is not None]
    at_equal = min(vals, key=lambda r: abs(float(r.get("tokens") or 0.0) - tokens)) if vals else None
    last_tokens = float(rows[-1].get("tokens") or 0.0)
    last_step = int(rows[-1].get("step") or len(rows))
    wall = series["wall_s"] + series["val_wall_s"] if series else []
    return {"label": label, "steps": last_step, "tokens": last_tokens,
            "batch_tokens": round(last_tokens / last_step) if last_step else None,
            "final_val_bpb": float(vals[-1]["val_bpb"]) if vals else None,
            "wall_s": max(wall) if wall else None,
            "val_bpb_at_equal_tokens": float(at_equal["val_bpb"]) if at_equal else None,
            "val_bpb_at_equal_tokens_tokens": float(at_equal.get("tokens") or 0.0) if at_equal else None}


def baseline_note(federated: float | None, one_site: dict | None, sites: dict | None) -> str:
    """How to read federated against the baselines: the gap to the sites' batch is the cost of federating;
    the gap to one site's batch also holds the cost of fewer sequential optimizer steps."""
    parts = ["Both baselines train the federation's tokens on the same data. "
             "One site's batch takes as many sequential optimizer steps as all the sites' steps together "
             "(K times a site's in a K-site round); the sites' batch takes as many as one site: "
             "the data-parallel equivalent of the federation (DiLoCo's baseline)."]
    for name, base in (("the sites' batch", sites), ("one site's batch", one_site)):
        if federated is not None and base and base.get("final_val_bpb"):
            gap = federated / base["final_val_bpb"] - 1
            parts.append(f"Federated final val bpb is {100 * gap:+.1f}% against {name}.")
    parts.append("A gap to one site's batch that the sites' batch shares is the cost of fewer sequential steps, "
                 "not of federation.")
    return " ".join(parts)


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
    return {"t0": t0, "steps": per_site, "val": val, "baseline": baseline_series(logs.baseline),
            "baseline_sites": baseline_series(logs.baseline_sites)}


def baseline_series(rows: list[dict[str, Any]] | None) -> dict[str, list[float]] | None:
    if not rows:
        return None
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
        site = configured[name]
        energy["sites"][name] = {k: row[k] for k in keys} | {
            "train_hours": row["train_hours"], "gpus": site.gpus,
            # the modelled power behind the kWh (the scenario's sites): GPUs x kW per GPU, training and idle
            "gpu_train_kw": site.gpu_train_kw, "gpu_idle_kw": site.gpu_idle_kw,
            "train_kw": site.gpus * site.gpu_train_kw, "idle_kw": site.gpus * site.gpu_idle_kw}
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
    lags = sorted(regime_lags(logs))
    if lags:
        median = lags[len(lags) // 2]
        run["regime_lag_sim_s"] = {"median": median, "max": lags[-1], "count": len(lags)}
        wall = f" ({median / speedup:.1f} s of wall time at x{speedup:g})" if speedup else ""
        notes.append(f"the regime shading is the server's own log: it follows a window change once the round in "
                     f"progress has ended and the next one is dispatched, a median {median / 60:.1f} simulated "
                     f"minutes later{wall}; the windows themselves are drawn where the energy simulation put them")
    # -------- the centralized baselines: one site's batch, and the sites' batch (same tokens, fewer steps)
    baseline = baseline_summary(logs.baseline, tokens, "centralized, one site's batch")
    baseline_sites = baseline_summary(logs.baseline_sites, tokens, "centralized, the sites' batch")
    if baseline is None and baseline_sites is None:
        notes.append("no centralized baseline (baseline/metrics.jsonl, baseline-sites/metrics.jsonl): federated "
                     "curves only")
    else:
        notes.append(baseline_note(run.get("final_val_bpb"), baseline, baseline_sites))
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
        "run": run, "baseline": baseline, "baseline_sites": baseline_sites, "sites": per_site, "utilisation": utilisation,
        "energy": energy, "emissions": emissions,
    }
    drawing = {"sites": sites, "windows": windows, "training": training, "regimes": regimes, "horizon": horizon,
               "series": learning_series(logs)}
    return summary, drawing


def iso(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
