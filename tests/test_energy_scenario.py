"""The shipped renewable-surplus scenario (pvlib weather, windpowerlib curves, Vessim), and
energy_simulation.py as a real process: SIGTERM mid-run, restart, the same run to the end."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pilot.energy import policy, scenario, sites
from pilot.energy.events import EnergyEvents
from tests.conftest import PROJECT_ROOT, subprocess_env

DAYS = 3


@pytest.fixture(scope="module")
def default_scenario() -> sites.Scenario:
    return sites.load_scenario()


@pytest.fixture(scope="module")
def profiles(default_scenario):
    return scenario.site_profiles(default_scenario)


def short_scenario(tmp_path, days: int = DAYS) -> sites.Scenario:
    text = sites.DEFAULT_SCENARIO.read_text().replace('end = "2026-01-01T00:00:00Z"',
                                                       f'end = "2025-01-{1 + days:02d}T00:00:00Z"')
    path = tmp_path / "short.toml"
    path.write_text(text)
    return sites.load_scenario(path)


def test_shipped_scenario_is_three_surplus_sites_over_one_year(default_scenario):
    assert [s.name for s in default_scenario.sites] == ["client_0", "client_1", "client_2"]
    assert {s.signal for s in default_scenario.sites} == {"surplus"}
    assert default_scenario.steps == 365 * 288


def test_pv_follows_the_sun_and_wind_the_weather(default_scenario, profiles):
    for site in default_scenario.sites:
        p = profiles[site.name]
        weather, meta = scenario.read_weather(site.options["weather"], 2025)
        solar_hour = ((p.index.hour + p.index.minute / 60 + meta["longitude"] / 15) % 24).to_numpy()
        night = (solar_hour < 1.5) | (solar_hour > 22.5)
        assert p["pv_w"].to_numpy()[night].max() == 0.0, site.name
        noon = (solar_hour > 11) & (solar_hour < 13)
        assert p["pv_w"].to_numpy()[noon].mean() > 0.2 * site.options["pv_kwp"] * 1000, site.name
        peak = site.options["turbines"] * 810_000   # the E-53/800 curve's maximum
        assert 0 < p["wind_w"].max() <= peak
        assert p["wind_w"].mean() > 0.05 * peak, site.name
    # the windy site (Sand Point) gets more of its energy from wind than the sunny one (Greensboro)
    share = {n: profiles[n]["wind_w"].sum() / profiles[n]["generation_w"].sum() for n in profiles}
    assert share["client_1"] > 0.7 > 0.4 > share["client_0"]


def test_surplus_windows_from_the_pvlib_files(default_scenario, profiles):
    times = scenario.step_times(default_scenario)
    end = times[-1] + default_scenario.step_s
    for site in default_scenario.sites:
        raw = scenario.raw_curtailed(site, default_scenario, profiles[site.name])
        windows = policy.offline_hysteresis(policy.step_windows(times, raw, end), default_scenario.min_on_s,
                                            default_scenario.min_off_s, end)
        share = policy.total_seconds(windows) / (end - times[0])
        assert 0.1 < share < 0.6, (site.name, share)
        assert len(windows) > 200   # windows come and go through the year, not one block
        # every window holds a moment of real surplus
        for s, e in windows[:50]:
            inside = (times >= s) & (times < e)
            assert raw[inside].any()


def test_vessim_sees_the_same_power_as_the_profiles(tmp_path, redis_client, profiles):
    short = short_scenario(tmp_path, days=1)
    from pilot.energy.simulation import Simulation

    Simulation(short, redis_client, "vessim", speedup=0, log=lambda _t: None).run()
    states = EnergyEvents(redis_client, "vessim").current_states()
    last = short.steps - 1
    for name, state in states.items():
        row = profiles[name].iloc[last]
        assert state.step == last
        assert float(state.fields["generation_w"]) == pytest.approx(row["generation_w"])
        assert float(state.fields["load_w"]) == pytest.approx(row["load_w"])
        assert state.value == pytest.approx(row["generation_w"] - row["load_w"])


def expected_transitions(short: sites.Scenario, profiles) -> list[tuple[str, bool, float]]:
    times = scenario.step_times(short)
    end = times[-1] + short.step_s
    out = []
    for order, site in enumerate(short.sites):
        raw = scenario.raw_curtailed(site, short, profiles[site.name].iloc[:short.steps])
        for s, e in policy.online_windows(times, raw, end, short.min_on_s, short.min_off_s):
            out.append((s, order, site.name, True))
            if e < end:
                out.append((e, order, site.name, False))
    return [(name, curtailed, t) for t, _, name, curtailed in sorted(out)]


def test_sigterm_then_restart_continues_the_same_run(tmp_path, redis_server, redis_client, profiles):
    short = short_scenario(tmp_path)
    command = [sys.executable, str(PROJECT_ROOT / "energy_simulation.py"), "--scenario", str(short.source),
               "--run-id", "restart", "--redis-url", redis_server.url]
    env = subprocess_env()
    consumer = EnergyEvents(redis_client, "restart")
    # three simulated days in ~10 s of wall time (a high speed-up); stopped after ~1.5 s
    first = subprocess.Popen([*command, "--speedup", str(DAYS * 86400 / 10)], env=env, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        clock = consumer.clock()
        if clock and clock.step >= 150:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=30)
    assert first.returncode == 0, err
    stopped = consumer.clock()
    assert stopped.status == "stopped" and 150 <= stopped.step < short.steps - 1, err
    assert "SIGTERM" in err

    second = subprocess.run([*command, "--speedup", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert f"resuming at step {stopped.step + 1} " in second.stderr
    finished = consumer.clock()
    assert finished.status == "finished" and finished.step == short.steps - 1

    got = [(e.site, e.curtailed, e.sim_ts) for e in consumer.history()]
    expected = expected_transitions(short, profiles)
    assert len(expected) > 10
    assert got == expected   # nothing lost, nothing twice, in order, across the restart
    ids = [tuple(map(int, e.id.split("-"))) for e in consumer.history()]
    assert ids == sorted(set(ids))
    assert np.isclose(finished.sim_ts, short.start.timestamp() + (short.steps - 1) * short.step_s)


def test_week_plot_is_written(tmp_path, default_scenario):
    from pilot.energy.plot import plot_window

    out = plot_window(default_scenario, default_scenario.start + (default_scenario.end - default_scenario.start) / 4,
                      2, tmp_path / "week.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


@pytest.mark.parametrize("change, message", [
    (('turbines = 1', 'turbines = 1\ncolour = "red"'), "unknown key(s) ['colour']"),
    (('gpus = 4\n', ''), "missing key(s) ['gpus']"),
    (('start = "2025-01-01T00:00:00Z"', 'start = "2025-01-01T00:00:00"'), "has no time zone"),
    (('name = "client_1"', 'name = "client_0"'), "site names must be unique"),
    (('signal = "surplus"', 'signal = "sunshine"'), "signal must be one of"),
    (('gpu_idle_kw = 0.1', 'gpu_idle_kw = "low"'), "gpu_idle_kw must be a number"),
    (('pv_kwp = 1500.0', 'pv_kwp = "big"'), "pv_kwp must be a number"),
    (('weather = "723170TYA.CSV"', 'weather = 7'), "weather must be a string"),
])
def test_bad_scenario_files_say_which_file_and_key(tmp_path, change, message):
    path = tmp_path / "bad.toml"
    path.write_text(sites.DEFAULT_SCENARIO.read_text().replace(*change, 1))
    with pytest.raises(sites.ScenarioError) as info:
        sites.load_scenario(path)
    assert str(path) in str(info.value) and message in str(info.value)
