"""`pilot plan`: replay MOER traces without Redis; per site the curtailed minutes and windows, and for the
whole set the minutes with 0, 1, 2, ... sites curtailed at once.

    pilot plan --trace moer.csv --threshold 100 --sites client_0=CAISO_NORTH,client_1=SPP_TX --json

Without --sites, each region column of the trace is one site, named client_0, client_1, ... in column
order. With --sites, a region of the trace that no site uses (the prototype's traces carry one for the
emissions comparison) is planned as a single-site baseline: its windows and mean MOER are in the plan's
`baselines`, beside the sites. Windows are reported in UTC.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pilot.energy import policy, traces


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat()


def _minutes(seconds: float) -> float | int:
    minutes = round(seconds / 60.0, 6)
    return int(minutes) if float(minutes).is_integer() else minutes


def site_windows(series: pd.Series, threshold: float, min_on_s: float = 0.0,
                 min_off_s: float = 0.0) -> tuple[list[policy.Window], list[policy.Window], tuple[float, float]]:
    """Raw and effective windows of one MOER series, and the span it covers (start, end)."""
    times = traces.epoch_seconds(series.index)
    end = float(times[-1] + traces.sample_period_s(series))
    raw = policy.step_windows(times, policy.below(series.to_numpy(), threshold), end)
    effective = policy.offline_hysteresis(raw, min_on_s, min_off_s, end)
    return raw, effective, (float(times[0]), end)


def _mean(values) -> float:
    return round(float(sum(values) / len(values)), 3) if len(values) else 0.0


def baseline(series: pd.Series, threshold: float, min_on_s: float = 0.0, min_off_s: float = 0.0) -> dict[str, Any]:
    """One region as a single-site baseline: its curtailment windows, and its mean MOER over the whole span
    and inside those windows (what one site there would emit per MWh, training always or only in windows)."""
    _, effective, _ = site_windows(series, threshold, min_on_s, min_off_s)
    times = traces.epoch_seconds(series.index)
    values = series.to_numpy()
    inside_mask = np.zeros(len(times), dtype=bool)
    for s, e in effective:
        inside_mask |= (times >= s) & (times < e)
    inside = values[inside_mask]
    return {"region": str(series.name),
            "curtailed_minutes": _minutes(policy.total_seconds(effective)),
            "windows": [[iso(s), iso(e)] for s, e in effective],
            "mean_moer": _mean(values), "mean_moer_in_windows": _mean(inside)}


def plan(moer: Mapping[str, pd.Series], sites: Mapping[str, str], threshold: float,
         min_on_s: float = 0.0, min_off_s: float = 0.0) -> dict[str, Any]:
    """The plan as JSON-ready data (the `--json` output). Regions of `moer` that no site uses are planned
    as single-site baselines (`baselines`, keyed by region)."""
    windows: dict[str, list[policy.Window]] = {}
    out_sites: dict[str, Any] = {}
    spans = []
    for name, region in sites.items():
        raw, effective, span = site_windows(moer[region], threshold, min_on_s, min_off_s)
        spans.append(span)
        windows[name] = effective
        entry: dict[str, Any] = {"region": region,
                                 "curtailed_minutes": _minutes(policy.total_seconds(effective)),
                                 "windows": [[iso(s), iso(e)] for s, e in effective]}
        if min_on_s or min_off_s:
            entry["raw_minutes"] = _minutes(policy.total_seconds(raw))
            entry["raw_windows"] = [[iso(s), iso(e)] for s, e in raw]
        out_sites[name] = entry
    start, end = min(s for s, _ in spans), max(e for _, e in spans)
    overlap = policy.overlap_seconds(windows, start, end)
    result = {"sites": out_sites,
              "overlap_minutes": {str(k): _minutes(v) for k, v in overlap.items()},
              "span": [iso(start), iso(end)], "threshold": threshold}
    used = set(sites.values())
    baselines = {region: baseline(series, threshold, min_on_s, min_off_s)
                 for region, series in moer.items() if region not in used}
    if baselines:
        result["baselines"] = baselines
    return result


def plan_files(paths: list[str | Path], threshold: float, sites: Mapping[str, str] | None = None,
               min_on_s: float = 0.0, min_off_s: float = 0.0) -> dict[str, Any]:
    """Read the trace files (every site's region must have data) and plan them; with `sites`, the trace's
    other regions become single-site baselines."""
    moer = traces.read_moer_files(list(paths), set(sites.values()) if sites else None, allow_extra=True)
    if not sites:
        sites = {f"client_{i}": region for i, region in enumerate(moer)}
    return plan(moer, sites, threshold, min_on_s, min_off_s)


def format_text(result: Mapping[str, Any]) -> str:
    """The human-readable plan."""
    lines = [f"span {result['span'][0]} .. {result['span'][1]}, curtailed while MOER < {result['threshold']}"]
    for name, site in result["sites"].items():
        lines.append(f"\n{name} ({site['region']}): {site['curtailed_minutes']} curtailed minutes "
                     f"in {len(site['windows'])} window(s)")
        lines.extend(f"  {s} .. {e}" for s, e in site["windows"])
    lines.append("\nminutes with k sites curtailed at once:")
    lines.extend(f"  {k}: {m}" for k, m in result["overlap_minutes"].items())
    if result.get("baselines"):
        lines.append("\nsingle-site baselines (regions of the trace no site uses):")
        for region, b in result["baselines"].items():
            lines.append(f"  {region}: {b['curtailed_minutes']} curtailed minutes in {len(b['windows'])} window(s); "
                         f"mean MOER {b['mean_moer']:g} overall, {b['mean_moer_in_windows']:g} inside its windows")
    return "\n".join(lines) + "\n"
