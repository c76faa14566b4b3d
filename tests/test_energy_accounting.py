"""Energy and emissions of a schedule against hand-computed numbers, and single-site baselines."""

from __future__ import annotations

import pandas as pd
import pytest

from pilot.energy import accounting, plan, traces
from pilot.energy.accounting import Interval
from pilot.energy.sites import Site

T0 = pd.Timestamp("2025-03-01T00:00:00Z").timestamp()
H = 3600.0
KG = accounting.KG_PER_LB
SITES = {"a": Site("a", "R1", "moer", 2, 0.5, 0.1), "b": Site("b", "R2", "moer", 4, 0.5, 0.05)}


def series(region: str, values: list[float], step_h: float) -> pd.Series:
    index = pd.date_range(pd.Timestamp(T0, unit="s", tz="UTC"), periods=len(values), freq=pd.Timedelta(hours=step_h))
    return pd.Series(values, index=index, name=region, dtype=float)


@pytest.fixture
def moer():
    return {"R1": series("R1", [100, 300] * 4, 0.5),          # 4 h, alternating every 30 min
            "R2": series("R2", [50, 50, 500, 50], 1.0)}       # 4 h, hourly


def test_energy_emissions_and_share_inside_windows(moer):
    schedule = {"a": [Interval(T0, T0 + H, "train"), Interval(T0 + H, T0 + 2 * H, "idle")],
                "b": [Interval(T0 + 0.5 * H, T0 + 1.5 * H, "train")]}
    windows = {name: plan.site_windows(moer[SITES[name].region], 150.0)[1] for name in SITES}
    out = accounting.account(schedule, SITES, moer, windows)
    a, b = out["sites"]["a"], out["sites"]["b"]
    # a: 1 kW for 1 h training, 0.2 kW for 1 h idle; MOER 100 and 300 half of each hour
    assert a["train_kwh"] == pytest.approx(1.0) and a["idle_kwh"] == pytest.approx(0.2)
    assert a["emissions_kg"] == pytest.approx((1.0 * 200 + 0.2 * 200) / 1000 * KG)
    # R1 is below 150 in the first half of every hour: half of a's energy is inside windows
    assert a["in_windows_kwh"] == pytest.approx(0.6) and a["share_in_windows"] == pytest.approx(0.5)
    # b: 2 kW for 1 h at MOER 50, entirely inside R2's first window
    assert b["energy_kwh"] == pytest.approx(2.0) and b["emissions_kg"] == pytest.approx(2.0 * 50 / 1000 * KG)
    assert b["share_in_windows"] == pytest.approx(1.0)
    total = out["total"]
    assert total["energy_kwh"] == pytest.approx(3.2) and total["train_gpu_hours"] == pytest.approx(6.0)
    assert total["share_in_windows"] == pytest.approx(2.6 / 3.2)
    assert total["emissions_kg"] == pytest.approx(a["emissions_kg"] + b["emissions_kg"])
    # baselines: 6 GPU-hours at a single site from the first training moment, without pause
    base = out["baselines"]
    assert base["a"]["hours"] == pytest.approx(3.0) and base["a"]["energy_kwh"] == pytest.approx(3.0)
    assert base["a"]["emissions_kg"] == pytest.approx(3.0 * 200 / 1000 * KG)
    assert base["b"]["hours"] == pytest.approx(1.5) and base["b"]["energy_kwh"] == pytest.approx(3.0)
    assert base["b"]["emissions_kg"] == pytest.approx(2.0 * 1.5 * 50 / 1000 * KG)


def test_moer_step_function_between_samples():
    # a single interval crossing a sample boundary mid-way
    s = series("R", [100, 400, 100], 1.0)
    assert accounting.moer_kg(s, 2.0, T0 + 0.75 * H, T0 + 1.25 * H) == \
        pytest.approx(2.0 * (0.25 * 100 + 0.25 * 400) / 1000 * KG)


def test_without_a_trace_emissions_are_unknown_not_zero(moer):
    out = accounting.account({"a": [Interval(T0, T0 + H, "train")]}, SITES, {"R2": moer["R2"]})
    assert out["sites"]["a"]["emissions_kg"] is None and out["total"]["emissions_kg"] is None
    assert out["sites"]["a"]["share_in_windows"] is None


def test_bad_schedules_and_short_traces_are_rejected(moer):
    with pytest.raises(ValueError, match="overlaps"):
        accounting.account({"a": [Interval(T0, T0 + H, "train"), Interval(T0 + 0.5 * H, T0 + 2 * H, "idle")]},
                           SITES, moer)
    with pytest.raises(ValueError, match="not configured"):
        accounting.account({"zz": [Interval(T0, T0 + H, "train")]}, SITES, moer)
    with pytest.raises(ValueError, match="mode"):
        accounting.account({"a": [Interval(T0, T0 + H, "sleep")]}, SITES, moer)
    with pytest.raises(traces.TraceError, match="covers"):
        accounting.account({"a": [Interval(T0 + 3 * H, T0 + 5 * H, "train")]}, SITES, moer)
