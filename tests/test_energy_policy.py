"""Curtailment windows of hand-made traces, hysteresis, trace validation, and `pilot plan`."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import pytest

from pilot import cli
from pilot.energy import plan, policy, traces

T0 = datetime(2025, 3, 1, tzinfo=UTC).timestamp()
MIN = 60.0


def ts(minutes: float) -> float:
    return T0 + minutes * MIN


def iso(minutes: float) -> str:
    return datetime.fromtimestamp(ts(minutes), tz=UTC).isoformat()


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text.strip() + "\n")
    return path


# ------------------------------------------------------------------ step windows
def test_step_windows_edges_and_the_last_sample():
    times = [ts(m) for m in (0, 5, 10, 15, 20)]
    # curtailed at the first sample, not at 10, curtailed again through the last sample
    flags = [True, True, False, True, True]
    assert policy.step_windows(times, flags, ts(25)) == [(ts(0), ts(10)), (ts(15), ts(25))]
    assert policy.step_windows(times, [False] * 5, ts(25)) == []
    assert policy.step_windows(times, [True] * 5, ts(25)) == [(ts(0), ts(25))]


def test_threshold_is_strict():
    assert list(policy.below([99.9, 100.0, 100.1], 100.0)) == [True, False, False]


def test_missing_samples_hold_the_previous_value(tmp_path):
    # 00:15 and 00:20 are missing: the 00:10 value (curtailed) holds until 00:25
    path = write(tmp_path, "gap.csv", """
timestamp,CAISO_NORTH
2025-03-01T00:00:00+00:00,150
2025-03-01T00:05:00+00:00,150
2025-03-01T00:10:00+00:00,40
2025-03-01T00:25:00+00:00,150
2025-03-01T00:30:00+00:00,90
""")
    result = plan.plan_files([path], 100.0)
    site = result["sites"]["client_0"]
    assert site["windows"] == [[iso(10), iso(25)], [iso(30), iso(35)]]
    assert site["curtailed_minutes"] == 20
    assert result["span"] == [iso(0), iso(35)]


def test_time_zones_are_converted_and_mixed_offsets_allowed(tmp_path):
    # the same instants written in three zones; the window is 01:00-01:10 UTC
    path = write(tmp_path, "tz.csv", """
point_time,value
2025-02-28T17:00:00-08:00,200
2025-03-01T02:05:00+01:00,50
2025-03-01T01:10:00Z,200
""")
    moer = traces.read_moer_csv(path)
    assert list(moer) == ["tz"]
    raw, effective, span = plan.site_windows(moer["tz"], 100.0)
    assert raw == effective == [(ts(65), ts(70))]
    assert span == (ts(60), ts(75))


# a 20-minute wide trace of two regions, shared by the format and the `pilot plan` tests
TWO_REGIONS = """
timestamp,CAISO_NORTH,SPP_TX
2025-03-01T00:00:00Z,120,50
2025-03-01T00:05:00Z,90,50
2025-03-01T00:10:00Z,80,150
2025-03-01T00:15:00Z,130,20
"""


def test_wide_and_long_files_give_the_same_windows(tmp_path):
    wide = write(tmp_path, "wide.csv", TWO_REGIONS)
    long_caiso = write(tmp_path, "CAISO_NORTH_co2_moer_2025-03-01_2025-03-01.csv", """
point_time,value
2025-03-01T00:00:00Z,120
2025-03-01T00:05:00Z,90
2025-03-01T00:10:00Z,80
2025-03-01T00:15:00Z,130
""")
    long_spp = write(tmp_path, "spp.csv", """
region,point_time,value
SPP_TX,2025-03-01T00:00:00Z,50
SPP_TX,2025-03-01T00:05:00Z,50
SPP_TX,2025-03-01T00:10:00Z,150
SPP_TX,2025-03-01T00:15:00Z,20
""")
    sites = {"a": "CAISO_NORTH", "b": "SPP_TX"}
    from_wide = plan.plan_files([wide], 100.0, sites)
    from_long = plan.plan_files([long_caiso, long_spp], 100.0, sites)
    assert from_wide == from_long
    assert from_wide["sites"]["a"]["windows"] == [[iso(5), iso(15)]]
    assert from_wide["sites"]["b"]["windows"] == [[iso(0), iso(10)], [iso(15), iso(20)]]
    assert from_wide["overlap_minutes"] == {"0": 0, "1": 15, "2": 5}


# ------------------------------------------------------------------ hysteresis
@pytest.mark.parametrize("raw, min_on, min_off, expected", [
    # no hysteresis: the raw windows
    ([(0, 10), (20, 30)], 0, 0, [(0, 10), (20, 30)]),
    # a gap shorter than min_off is bridged; the window closes min_off after the raw end
    ([(0, 10), (15, 30)], 0, 10, [(0, 40)]),
    # a gap exactly min_off long is bridged too (the signal is back when the delay runs out)
    ([(0, 10), (20, 30)], 0, 10, [(0, 40)]),
    # a longer gap closes the window after min_off
    ([(0, 10), (25, 30)], 0, 10, [(0, 20), (25, 40)]),
    # min_on delays the opening; a raw window not longer than min_on never opens
    ([(0, 10), (20, 25), (40, 60)], 5, 0, [(5, 10), (45, 60)]),
    # both, and the end of the span clips an open window
    ([(0, 10), (12, 30), (90, 100)], 5, 15, [(5, 45), (95, 100)]),
])
def test_hysteresis_cases(raw, min_on, min_off, expected):
    raw_s = [(ts(s), ts(e)) for s, e in raw]
    assert policy.offline_hysteresis(raw_s, min_on * MIN, min_off * MIN, ts(100)) == \
        [(ts(s), ts(e)) for s, e in expected]


def test_online_decisions_match_the_offline_windows():
    rng = random.Random(5)
    step = 5 * MIN
    for _ in range(40):
        times = [ts(5 * i) for i in range(200)]
        flags, state = [], rng.random() < 0.5
        for _ in times:
            if rng.random() < 0.25:
                state = not state
            flags.append(state)
        end = times[-1] + step
        raw = policy.step_windows(times, flags, end)
        for min_on, min_off in [(0, 0), (0, 10 * MIN), (10 * MIN, 0), (15 * MIN, 10 * MIN)]:
            assert policy.online_windows(times, flags, end, min_on, min_off) == \
                policy.offline_hysteresis(raw, min_on, min_off, end)


def test_policy_state_round_trips_through_redis_fields():
    state = policy.PolicyState(True, ts(3), ts(1))
    assert policy.PolicyState.from_fields(state.to_fields()) == state
    assert policy.PolicyState.from_fields(policy.PolicyState().to_fields()) == policy.PolicyState()


def test_overlap_counts_every_moment_once():
    windows = {"a": [(ts(0), ts(30))], "b": [(ts(10), ts(20)), (ts(25), ts(40))], "c": []}
    out = policy.overlap_seconds(windows, ts(0), ts(60))
    assert out == {0: 20 * MIN, 1: 25 * MIN, 2: 15 * MIN, 3: 0.0}


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("body, where, what", [
    ("timestamp,CAISO_NORTH,NOWHERE\n2025-03-01T00:00:00Z,1,2\n", "row 1, column 'NOWHERE'", "unknown region"),
    ("timestamp,CAISO_NORTH\n2025-03-01T00:05:00Z,1\n2025-03-01T00:00:00Z,2\n", "row 3, column 'timestamp'",
     "not after"),
    ("timestamp,CAISO_NORTH\n2025-03-01T00:00:00Z,1\n2025-03-01T00:05:00,2\n", "row 3, column 'timestamp'",
     "no time zone"),
    ("timestamp,CAISO_NORTH\n2025-03-01T00:00:00Z,1\n2025-03-01T00:05:00Z,abc\n", "row 3, column 'CAISO_NORTH'",
     "not a number"),
    ("timestamp,CAISO_NORTH\n2025-03-01T00:00:00Z,nan\n", "row 2, column 'CAISO_NORTH'", "not a finite number"),
    ("point_time,value\n2025-03-01T00:00:00Z,1\n2025-03-01T00:00:00Z,2\n", "row 3, column 'point_time'",
     "not after"),
])
def test_bad_traces_are_rejected_naming_file_row_and_column(tmp_path, body, where, what):
    path = tmp_path / "CAISO_NORTH.csv"
    path.write_text(body)
    with pytest.raises(traces.TraceError) as info:
        traces.read_moer_csv(path, {"CAISO_NORTH"})
    message = str(info.value)
    assert str(path) in message and where in message and what in message


def test_a_region_the_sites_need_but_the_file_lacks(tmp_path):
    path = write(tmp_path, "t.csv", "timestamp,CAISO_NORTH\n2025-03-01T00:00:00Z,1\n")
    with pytest.raises(traces.TraceError, match="no data for region.*SPP_TX"):
        traces.read_moer_csv(path, {"CAISO_NORTH", "SPP_TX"})


# ------------------------------------------------------------------ pilot plan
def test_pilot_plan_json(tmp_path, capsys):
    path = write(tmp_path, "moer.csv", TWO_REGIONS)
    code = cli.main(["plan", "--trace", str(path), "--threshold", "100",
                     "--sites", "client_0=CAISO_NORTH,client_1=SPP_TX", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sites"]["client_0"]["curtailed_minutes"] == 10
    assert out["sites"]["client_0"]["windows"] == [[iso(5), iso(15)]]
    assert out["sites"]["client_1"]["curtailed_minutes"] == 15
    assert out["overlap_minutes"] == {"0": 0, "1": 15, "2": 5}
    # hysteresis: SPP_TX's 5-minute gap is bridged with a 5-minute leave delay
    cli.main(["plan", "--trace", str(path), "--json", "--min-off", "5"])
    bridged = json.loads(capsys.readouterr().out)
    assert bridged["sites"]["client_1"]["windows"] == [[iso(0), iso(20)]]
    assert bridged["sites"]["client_1"]["raw_windows"] == [[iso(0), iso(10)], [iso(15), iso(20)]]


def test_pilot_plan_reports_bad_input(tmp_path, capsys):
    path = write(tmp_path, "moer.csv", "timestamp,CAISO_NORTH\n2025-03-01T00:00:00Z,1\n2025-03-01T00:05:00Z,2\n")
    assert cli.main(["plan", "--trace", str(path), "--sites", "client_0=SPP_TX"]) == 2
    err = capsys.readouterr().err
    assert "CAISO_NORTH" in err and "unknown region" in err and str(path) in err
    assert cli.main(["plan", "--trace", str(path), "--sites", "client_0"]) == 2
    assert "NAME=REGION" in capsys.readouterr().err
