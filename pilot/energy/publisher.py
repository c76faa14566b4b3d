"""The writing side of the energy schema (documented in events.py): steps go out in MULTI/EXEC transactions.

Paced, every step is its own transaction. Unpaced (or behind the clock), the simulation stages steps and
flushes them together at least every few tens of milliseconds (simulation.py), which is what lets it run
a year of three sites in seconds; a transaction always ends on a whole step.

Because a step's site states, its transition events and the clock go in one transaction, a crash or
SIGTERM leaves Redis at a step boundary: the restarted simulation resumes after `clock.step`, and
nothing is published twice. Stream ids carry the simulated time, so a stray re-publish of an old step
would be refused by Redis rather than duplicated.

A heartbeat thread refreshes the clock's `alive_ts` every events.HEARTBEAT_S while the run goes on, also while
a paced run waits minutes for its next step: consumers tell a live simulation from a dead, frozen or cut-off
one within events.SIGNAL_FRESH_S, whatever the pace. It stops with the final status, or when the thread that
began the run is gone (a crash), so that a beat never outlives the simulation it vouches for.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from pilot.energy import events
from pilot.energy.policy import PolicyState
from pilot.energy.sites import Scenario


class RunMismatch(RuntimeError):
    """The run id already belongs to a different scenario."""


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat()


def scenario_description(scenario: Scenario) -> dict[str, Any]:
    # the fingerprint covers what consumers need not read (PV sizes, turbines, trace files, ...)
    options = json.dumps([site.options for site in scenario.sites], sort_keys=True, default=str)
    return {"scenario": {"start": scenario.start.isoformat(), "end": scenario.end.isoformat(),
                         "step_s": scenario.step_s, "threshold": scenario.threshold,
                         "min_on_s": scenario.min_on_s, "min_off_s": scenario.min_off_s,
                         "fingerprint": hashlib.sha256(options.encode()).hexdigest()[:16]},
            "sites": [site.describe() for site in scenario.sites]}


@dataclass
class Resume:
    """Where a run stands in Redis: the next step to simulate and each site's policy state."""

    next_step: int
    states: dict[str, PolicyState]
    status: str


@dataclass(frozen=True)
class Transition:
    site: str
    curtailed: bool
    value: float


class Publisher:
    def __init__(self, client: redis.Redis, run_id: str, scenario: Scenario, speedup: float):
        self.client = client
        self.run_id = run_id
        self.scenario = scenario
        self.speedup = speedup
        self.clock_key = events.clock_key(run_id)
        self.stream_key = events.stream_key(run_id)
        self.site_keys = {site.name: events.site_key(run_id, site.name) for site in scenario.sites}
        self._clock_fixed = {"step_s": scenario.step_s, "start": scenario.start.isoformat(),
                             "end": scenario.end.isoformat(), "speedup": repr(float(speedup))}
        self._sites: dict[str, dict[str, Any]] = {}
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._clock: dict[str, Any] | None = None
        self._beating = threading.Event()      # set: the heartbeat thread ends
        self._heartbeat: threading.Thread | None = None

    def _beat(self, owner: threading.Thread) -> None:
        while not self._beating.wait(events.HEARTBEAT_S) and owner.is_alive():
            try:
                # only a clock this run has (a beat must never create a clock hash without its fields); a
                # finished run (e.g. one that found nothing left to do) needs no heartbeat
                status = self.client.hget(self.clock_key, "status")
                if status in ("finished", b"finished"):
                    return
                if status is not None:
                    self.client.hset(self.clock_key, "alive_ts", repr(time.time()))
            except redis.RedisError:
                pass   # Redis away: consumers see the signal go stale, which is the truth

    def start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._beating.clear()
            self._heartbeat = threading.Thread(target=self._beat, args=(threading.current_thread(),),
                                               name="energy-heartbeat", daemon=True)
            self._heartbeat.start()

    def stop_heartbeat(self) -> None:
        self._beating.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5)
        self._heartbeat = None

    def begin(self) -> Resume:
        """Register the run (or check that it is the same scenario) and say where to resume."""
        description = scenario_description(self.scenario)
        existing = self.client.get(events.config_key(self.run_id))
        if existing is not None and json.loads(existing) != json.loads(json.dumps(description)):
            raise RunMismatch(f"run {self.run_id!r} was started with a different scenario (sites, span or "
                              f"policy) than {self.scenario.source}; use another --run-id or the same scenario")
        if existing is None:
            self.client.set(events.config_key(self.run_id), json.dumps(description))
        if self.scenario.source is not None:  # lets a report read the scenario's MOER traces
            self.client.set(events.source_key(self.run_id), str(Path(self.scenario.source).resolve()))
        clock = self.client.hgetall(self.clock_key)
        pipe = self.client.pipeline(transaction=True)
        for key in self.site_keys.values():
            pipe.hgetall(key)
        fields = dict(zip(self.site_keys, pipe.execute(), strict=True))
        states = {name: PolicyState.from_fields(f) if f else PolicyState() for name, f in fields.items()}
        next_step = int(clock["step"]) + 1 if clock else 0
        self.start_heartbeat()
        return Resume(next_step, states, clock.get("status", "new") if clock else "new")

    def publish_step(self, step: int, sim_ts: float, site_fields: Mapping[str, Mapping[str, Any]],
                     transitions: Sequence[Transition]) -> None:
        """Everything of one step, atomically: site hashes, transition events, then the clock."""
        self.stage_step(step, sim_ts, site_fields, transitions)
        self.flush()

    def stage_step(self, step: int, sim_ts: float, site_fields: Mapping[str, Mapping[str, Any]],
                   transitions: Sequence[Transition]) -> None:
        """Hold a step for the next `flush`; staged steps go out together, in one transaction.

        Only the last staged state of a site is written (nobody could observe the ones before it inside
        one transaction); every transition event is.
        """
        sim_time = iso(sim_ts)
        for name, fields in site_fields.items():
            self._sites[name] = {**fields, "sim_time": sim_time, "sim_ts": repr(sim_ts), "step": step}
        ms = int(round(sim_ts * 1000))
        for n, t in enumerate(transitions):
            self._events.append((f"{ms}-{n}", {"site": t.site, "curtailed": int(t.curtailed), "sim_time": sim_time,
                                               "sim_ts": repr(sim_ts), "step": step, "value": repr(float(t.value))}))
        self._clock = {**self._clock_fixed, "sim_time": sim_time, "sim_ts": repr(sim_ts), "step": step,
                       "status": "running"}

    @property
    def staged(self) -> bool:
        return self._clock is not None

    def flush(self) -> None:
        """Write the staged steps: site hashes, then events in order, then the clock, in one MULTI/EXEC."""
        if self._clock is None:
            return
        pipe = self.client.pipeline(transaction=True)
        for name, fields in self._sites.items():
            pipe.hset(self.site_keys[name], mapping=fields)
        for entry_id, fields in self._events:
            pipe.xadd(self.stream_key, fields, id=entry_id)
        now = repr(time.time())
        pipe.hset(self.clock_key, mapping={**self._clock, "wall_ts": now, "alive_ts": now})
        pipe.execute()
        self._sites, self._events, self._clock = {}, [], None

    def set_status(self, status: str) -> None:
        """running | stopped | finished, kept on the clock hash (nothing else changes); the run's last word,
        so the heartbeat ends here."""
        self.stop_heartbeat()
        if self.client.exists(self.clock_key):
            self.client.hset(self.clock_key, mapping={"status": status, "wall_ts": repr(time.time())})
