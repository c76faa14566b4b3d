"""Fault 1: the energy simulation dies while a window is open. No fresh curtailment signal means not curtailed: the
server sees no curtailed site, and the site trainer's own watcher stops it within one optimizer step of the
freshness bound (events.SIGNAL_FRESH_S after the simulation's last heartbeat), with no server involved."""

from __future__ import annotations

import signal
import subprocess
import sys

from pilot.energy.events import SIGNAL_FRESH_S, EnergyEvents
from pilot.server.clock import EnergyClock
from pilot.site.watchers import STOP_POLL_S
from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.fault_harness import SITE, SiteHarness, always_curtailed_scenario, copy_shards, wait_for

RUN = "fault-stale-energy"
SLACK_S = 0.5   # the watcher's poll, one Redis read, pushing the step's metrics: measured well under this


def test_a_killed_energy_simulation_stops_the_site_within_one_step_of_the_bound(redis_server, redis_client, tmp_path,
                                                                                 text_shards, tiny_tokenizer):
    shards = copy_shards(text_shards, tmp_path / "data")
    energy = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "energy_simulation.py"), "--scenario",
         str(always_curtailed_scenario(tmp_path)), "--run-id", RUN, "--redis-url", redis_server.url,
         "--speedup", "300"],   # a 300 s step every wall second
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=subprocess_env())
    events = EnergyEvents(redis_client, RUN)
    site = None
    try:
        wait_for(lambda: events.curtailed_sites() == [SITE], 60, "the window to open")
        site = SiteHarness(redis_server.url, RUN, tmp_path / "data", tiny_tokenizer, tmp_path / "trainer.log")
        site.request(1, shards)
        wait_for(lambda: len(site.steps(1)) >= 3, 60, "the site to train")

        energy.send_signal(signal.SIGKILL)           # mid-window, without a word to anyone
        energy.wait(timeout=10)
        last_heard = events.clock().alive_ts         # the last heartbeat it wrote: nothing comes after it
        assert events.clock().status == "running" and events.current_states()[SITE].curtailed  # frozen flags

        result = site.result(1, timeout=SIGNAL_FRESH_S + 60)
        steps = site.steps(1)
        last_step = max(float(s["wall_ts"]) for s in steps)
        step_s = max(float(s["seconds"]) for s in steps)
        assert result.status == "ok" and result.reason.startswith("no fresh curtailment signal: energy signal stale")
        assert result.steps == len(steps) and result.tokens == len(steps) * site.tokens_per_step
        # the promise: no optimizer step ended later than one step past the bound
        assert last_step <= last_heard + SIGNAL_FRESH_S + step_s + STOP_POLL_S + SLACK_S, \
            (last_step - last_heard, step_s)
        assert last_step >= last_heard + SIGNAL_FRESH_S - 1.0, "it trained on until the bound (not stopped early)"

        # the server's side reads the same: no curtailed site, and says why
        clock = EnergyClock(redis_client, RUN, "windows", runlog=None)
        assert clock.curtailed({SITE}) == set() and "energy signal stale" in clock.stale
        assert events.curtailed_sites() == [] and events.current_states()[SITE].curtailed

        site.request(2, shards, digest=result.weights_digest)   # a round asked for now stops at once
        second = site.result(2)
        assert second.steps == 0 and second.reason.startswith("no fresh curtailment signal")
        print(f"stale bound {SIGNAL_FRESH_S} s: last step ended {last_step - last_heard:.2f} s after the last "
              f"heartbeat (one step {step_s:.3f} s)")
    finally:
        if energy.poll() is None:
            energy.kill()
        if site is not None:
            site.close()
