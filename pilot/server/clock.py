"""The energy clock, as the server reads it: which sites are curtailed, what simulated time it is, whether the
simulation has finished, and waiting for its next news. With curtailment "always" every connected site may
train and the wall clock is the clock.

No fresh curtailment signal means not curtailed: while the energy simulation is not running or has not been
heard from within events.SIGNAL_FRESH_S, no site is curtailed (a round in progress ends as "window closed"),
and the moment the signal goes stale or fresh again is an "energy-signal" event.

Every transition the server reads is logged (RUN_DIR/logs/energy.jsonl and an "energy" event), and every
clock reading becomes an anchor of the wall -> simulated timeline the run's logs use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Set

import redis

from pilot.energy import events as energy_events
from pilot.energy.events import EnergyEvents
from pilot.server.runlog import RunLog, SimTimeline

CLOCK_READ_S = 0.2   # one Redis read of the clock per this many seconds, however many steps are logged


class EnergyClock:
    def __init__(self, client: redis.Redis, run_id: str, curtailment: str, runlog: RunLog):
        self.r, self.run_id, self.runlog = client, run_id, runlog
        self.always = curtailment == "always"
        self.events = EnergyEvents(client, run_id, consumer="server")
        self.timeline, self._clock_read = SimTimeline(), 0.0
        self.stale: str | None = ""      # why the signal is not fresh (None: fresh; "": not read yet)
        self.on_event: Callable[..., None] = lambda kind, **fields: None   # the server's event sink, set later

    def curtailed(self, connected: Set[str]) -> set[str]:
        """The sites that may train now (of those connected, with curtailment "always"); none without a fresh
        signal."""
        if self.always:
            return set(connected)
        stale = self.events.staleness()
        if (stale is None) != (self.stale is None) or self.stale == "":
            self.on_event("energy-signal", fresh=int(stale is None), reason=stale or "fresh")
        self.stale = stale
        return set() if stale is not None else set(self.events.curtailed_sites())

    def now(self) -> float:
        if self.always:
            return time.time()
        clock = self.events.clock()
        return clock.now() if clock else time.time()

    def time_at(self, wall_ts: float) -> float | None:
        """The simulated time at a wall-clock moment (None before the energy simulation has a clock)."""
        if self.always:
            return wall_ts
        if time.monotonic() - self._clock_read > CLOCK_READ_S:
            self._clock_read = time.monotonic()
            clock = self.events.clock()
            if clock is not None and clock.status == "running":
                self.timeline.add(clock.wall_ts, clock.sim_ts, clock.speedup, clock.step_s)
            elif clock is not None:  # a finished (or paused) simulation has held its last step to its end
                self.timeline.add(clock.wall_ts, clock.sim_ts + clock.step_s, 0.0, clock.step_s)
        return self.timeline.at(wall_ts)

    def finished(self) -> bool:
        if self.always:
            return False
        clock = self.events.clock()
        return clock is not None and clock.status == "finished"

    def wait_for_news(self, block_ms: int) -> None:
        """Block up to `block_ms` for energy news; log what came."""
        if self.always:
            time.sleep(block_ms / 1000)
            return
        self.time_at(time.time())  # keep the wall -> simulated timeline's anchors current
        if not self.runlog.has_energy_config:
            clock = self.events.clock()
            if clock is not None:
                source = self.r.get(energy_events.source_key(self.run_id))
                self.runlog.energy_config({**self.events.config(), **({"scenario_path": source} if source else {})},
                                          speedup=clock.speedup)
        news = self.events.read(block_ms=block_ms)
        for event in news:
            self.runlog.energy(event.site, event.curtailed, event.sim_ts, event.value)
            self.on_event("energy", site=event.site, curtailed=int(event.curtailed), event_sim_ts=event.sim_ts)
        if news:
            self.events.commit(news[-1].id)
