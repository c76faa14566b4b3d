"""Energy and emissions of a schedule, and what the same training would have cost at one site alone.

A schedule says, per site, when it trained and when it idled: intervals (start, end, mode) in epoch
seconds, mode "train" or "idle"; time outside every interval draws nothing. A site draws
`gpus * gpu_train_kw` while training and `gpus * gpu_idle_kw` while idle (sites.py).

Emissions integrate power times the marginal emission rate of the site's region: MOER is a step
function (traces.py) in lbs CO2/MWh, so kg CO2 = kWh * MOER / 1000 * 0.45359237.

Baseline per site: all the run's training GPU-hours placed at that one site, training without pause on
its own GPUs from the run's first training moment (duration = GPU-hours / its GPUs), as the reference's
single-site runs did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pilot.energy import policy, traces
from pilot.energy.sites import Site

KG_PER_LB = 0.45359237
MODES = ("train", "idle")


@dataclass(frozen=True)
class Interval:
    start: float
    end: float
    mode: str   # "train" or "idle"


def check_schedule(schedule: Mapping[str, Sequence[Interval]], sites: Mapping[str, Site]) -> None:
    for name, intervals in schedule.items():
        if name not in sites:
            raise ValueError(f"schedule names site {name!r}, which is not configured; sites: {sorted(sites)}")
        last_end = -np.inf
        for i, iv in enumerate(sorted(intervals, key=lambda iv: iv.start)):
            if iv.mode not in MODES:
                raise ValueError(f"site {name}, interval {i}: mode {iv.mode!r} is not one of {MODES}")
            if iv.end <= iv.start:
                raise ValueError(f"site {name}, interval {i}: end {iv.end} is not after start {iv.start}")
            if iv.start < last_end:
                raise ValueError(f"site {name}, interval {i}: overlaps the previous interval")
            last_end = iv.end


def moer_kg(series: pd.Series, power_kw: float, start: float, end: float) -> float:
    """kg CO2 of drawing `power_kw` over [start, end) under a MOER step-function trace."""
    if end <= start or power_kw == 0:
        return 0.0
    times = traces.epoch_seconds(series.index)
    trace_end = times[-1] + traces.sample_period_s(series)
    if start < times[0] or end > trace_end:
        raise traces.TraceError(f"MOER trace of {series.name!r} ({series.attrs.get('source', 'in memory')}) covers "
                                f"{policy_iso(times[0])} .. {policy_iso(trace_end)}, not {policy_iso(start)} .. "
                                f"{policy_iso(end)}")
    bounds = np.append(times, trace_end)
    lo, hi = np.clip(bounds[:-1], start, end), np.clip(bounds[1:], start, end)
    lbs_hours = float(np.sum((hi - lo) / 3600.0 * series.to_numpy()))   # sum of hours * lbs/MWh
    return power_kw * lbs_hours / 1000.0 * KG_PER_LB


def policy_iso(seconds: float) -> str:
    return pd.Timestamp(seconds, unit="s", tz="UTC").isoformat()


def account(schedule: Mapping[str, Sequence[Interval]], sites: Mapping[str, Site],
            moer: Mapping[str, pd.Series] | None = None,
            windows: Mapping[str, Sequence[policy.Window]] | None = None) -> dict[str, Any]:
    """Energy (kWh), emissions (kg CO2; None without a MOER trace for the region), the share of energy
    drawn inside the curtailment windows (when given), per site and in total, and single-site baselines."""
    check_schedule(schedule, sites)
    moer = moer or {}
    per_site: dict[str, Any] = {}
    total = {"train_kwh": 0.0, "idle_kwh": 0.0, "energy_kwh": 0.0, "emissions_kg": 0.0,
             "in_windows_kwh": 0.0, "train_gpu_hours": 0.0}
    emissions_known = True
    first_train = np.inf
    for name, intervals in schedule.items():
        site = sites[name]
        series = moer.get(site.region)
        row = {"train_kwh": 0.0, "idle_kwh": 0.0, "in_windows_kwh": 0.0, "train_hours": 0.0,
               "emissions_kg": 0.0 if series is not None else None}
        for iv in intervals:
            kw = site.train_kw if iv.mode == "train" else site.idle_kw
            hours = (iv.end - iv.start) / 3600.0
            row[f"{iv.mode}_kwh"] += kw * hours
            if iv.mode == "train":
                row["train_hours"] += hours
                first_train = min(first_train, iv.start)
            if windows is not None:
                row["in_windows_kwh"] += kw * policy.inside_seconds(windows.get(name, []), iv.start, iv.end) / 3600
            if series is not None:
                row["emissions_kg"] += moer_kg(series, kw, iv.start, iv.end)
        row["energy_kwh"] = row["train_kwh"] + row["idle_kwh"]
        row["share_in_windows"] = (row["in_windows_kwh"] / row["energy_kwh"]
                                   if windows is not None and row["energy_kwh"] else None)
        per_site[name] = row
        for key in ("train_kwh", "idle_kwh", "energy_kwh", "in_windows_kwh"):
            total[key] += row[key]
        total["train_gpu_hours"] += row["train_hours"] * site.gpus
        if row["emissions_kg"] is None:
            emissions_known = False
        else:
            total["emissions_kg"] += row["emissions_kg"]
    total["emissions_kg"] = total["emissions_kg"] if emissions_known else None
    total["share_in_windows"] = (total["in_windows_kwh"] / total["energy_kwh"]
                                 if windows is not None and total["energy_kwh"] else None)
    return {"sites": per_site, "total": total,
            "baselines": baselines(total["train_gpu_hours"], first_train, sites, moer)}


def baselines(train_gpu_hours: float, start: float, sites: Mapping[str, Site],
              moer: Mapping[str, pd.Series]) -> dict[str, Any]:
    """The run's training GPU-hours placed entirely at each single site, from `start` without pause."""
    out: dict[str, Any] = {}
    for name, site in sites.items():
        if site.gpus == 0 or not np.isfinite(start):
            continue
        hours = train_gpu_hours / site.gpus
        series = moer.get(site.region)
        emissions = None
        if series is not None:
            try:
                emissions = moer_kg(series, site.train_kw, start, start + hours * 3600)
            except traces.TraceError:
                emissions = None   # the trace ends before such a run would: unknown, not zero
        out[name] = {"hours": hours, "energy_kwh": hours * site.train_kw, "emissions_kg": emissions}
    return out
