"""The writing side of the energy schema (documented in events.py): one MULTI/EXEC per simulated step.

Because a step's site states, its transition events and the clock go in one transaction, a crash or
SIGTERM leaves Redis at a step boundary: the restarted simulation resumes after `clock.step`, and
nothing is published twice. Stream ids carry the simulated time, so a stray re-publish of an old step
would be refused by Redis rather than duplicated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
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
    return {"scenario": {"start": scenario.start.isoformat(), "end": scenario.end.isoformat(),
                         "step_s": scenario.step_s, "threshold": scenario.threshold,
                         "min_on_s": scenario.min_on_s, "min_off_s": scenario.min_off_s},
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

    def begin(self) -> Resume:
        """Register the run (or check that it is the same scenario) and say where to resume."""
        description = scenario_description(self.scenario)
        existing = self.client.get(events.config_key(self.run_id))
        if existing is not None and json.loads(existing) != json.loads(json.dumps(description)):
            raise RunMismatch(f"run {self.run_id!r} was started with a different scenario (sites, span or "
                              f"policy) than {self.scenario.source}; use another --run-id or the same scenario")
        if existing is None:
            self.client.set(events.config_key(self.run_id), json.dumps(description))
        clock = self.client.hgetall(self.clock_key)
        pipe = self.client.pipeline(transaction=True)
        for key in self.site_keys.values():
            pipe.hgetall(key)
        fields = dict(zip(self.site_keys, pipe.execute(), strict=True))
        states = {name: PolicyState.from_fields(f) if f else PolicyState() for name, f in fields.items()}
        next_step = int(clock["step"]) + 1 if clock else 0
        return Resume(next_step, states, clock.get("status", "new") if clock else "new")

    def publish_step(self, step: int, sim_ts: float, site_fields: Mapping[str, Mapping[str, Any]],
                     transitions: Sequence[Transition]) -> None:
        """Everything of one step, atomically: site hashes, transition events, then the clock."""
        sim_time = iso(sim_ts)
        pipe = self.client.pipeline(transaction=True)
        for name, fields in site_fields.items():
            pipe.hset(self.site_keys[name], mapping={**fields, "sim_time": sim_time, "sim_ts": repr(sim_ts),
                                                     "step": step})
        ms = int(round(sim_ts * 1000))
        for n, t in enumerate(transitions):
            pipe.xadd(self.stream_key, {"site": t.site, "curtailed": int(t.curtailed), "sim_time": sim_time,
                                        "sim_ts": repr(sim_ts), "step": step, "value": repr(float(t.value))},
                      id=f"{ms}-{n}")
        pipe.hset(self.clock_key, mapping={**self._clock_fixed, "sim_time": sim_time, "sim_ts": repr(sim_ts),
                                           "step": step, "wall_ts": repr(time.time()), "status": "running"})
        pipe.execute()

    def set_status(self, status: str) -> None:
        """running | stopped | finished, kept on the clock hash (nothing else changes)."""
        if self.client.exists(self.clock_key):
            self.client.hset(self.clock_key, mapping={"status": status, "wall_ts": repr(time.time())})
