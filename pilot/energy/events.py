"""The energy simulation's Redis schema, and the consumer API for it.

`energy_simulation.py` writes every simulated step, each step's site states, events and clock in ONE
transaction (MULTI/EXEC), so that a reader never sees a clock ahead of its events or half a step. Paced,
each step is published as soon as it is computed; unpaced, consecutive steps share a transaction (at
most 50 ms of wall time apart), which still ends on a whole step:

    pilot:{run}:energy:config          string, JSON: {"scenario": {start, end, step_s, threshold, min_on_s,
                                       min_off_s, fingerprint}, "sites": [{name, region, signal, gpus, gpu_train_kw,
                                       gpu_idle_kw}, ...]}; written once when the run starts
    pilot:{run}:energy:source          string: path of the scenario TOML on the simulation's host
    pilot:{run}:energy:clock           hash, the simulated clock every component shares:
        sim_time   ISO 8601 UTC of the last published step      sim_ts  the same, epoch seconds
        step       index of that step (0 = scenario start)      step_s  seconds per step
        start/end  the scenario's span (ISO, end exclusive)     speedup simulated s per wall s (0 = unpaced)
        wall_ts    wall-clock epoch seconds of that publish     status  running | stopped | finished
        alive_ts   wall-clock epoch seconds of the publisher's last heartbeat (every HEARTBEAT_S while it runs)
      Between steps, the simulated now is sim_ts + (time.time() - wall_ts) * speedup (`SimClock.now()`).
    pilot:{run}:energy:site:{name}     hash per site, its state at the last step:
        site, region, signal        curtailed  1/0, the effective decision (after hysteresis)
        raw  1/0, the signal alone  value      MOER (lbs CO2/MWh) or surplus (generation - load, W)
        threshold (MOER sites)      generation_w, load_w  the microgrid's power (W)
        power_kw  what the site draws when it follows the decision (training if curtailed, else idle)
        since  epoch s of the last effective change ("" if none yet)
        pending_since  epoch s since when the raw signal disagrees with `curtailed` ("" if it does not)
        sim_time, sim_ts, step  the step these values belong to
    pilot:{run}:energy:events          Redis Stream, one entry per effective transition, in order:
        site, curtailed (1 = window opened, 0 = closed), sim_time, sim_ts, step, value
      Entry ids are `{simulated epoch ms}-{n}`: sorted by simulated time, n orders transitions of one
      step (site order of the scenario). The stream is never trimmed by the simulation.
    pilot:{run}:energy:cursors         hash, consumer name -> id of the last event it committed

Clients must decode responses (what `coordination.connect` gives). A restarted simulation reads `clock.step` and the per-site `curtailed/since/pending_since`, and goes on
at the next step: the same clock position, no transition published twice.

Consumer side (the federated server):

    events = EnergyEvents(client, run_id, consumer="server")
    for event in events.read(block_ms=1000):     # from the stored cursor; waits up to 1 s for news
        react(event.site, event.curtailed, event.sim_ts)
        events.commit(event.id)                  # a restarted consumer resumes after this one
    for event in events.follow(block_ms=1000):   # the same as a generator, committing as it goes
        ...
    events.current_states()                      # {site: SiteState} at the last step
    events.clock()                               # SimClock (sim_ts, step, speedup, status, ...)
    events.staleness()                           # None while the signal is fresh, else why it is not

No fresh curtailment signal means not curtailed: `curtailed_sites()` is empty while `staleness()` says why
(no clock yet, the simulation stopped or finished, its heartbeat older than SIGNAL_FRESH_S, or a paced clock
stuck on one step). The last published states stay readable (`current_states()`) for reports and views.
The bound compares the consumer's wall clock with the publisher's: hosts must agree within a few seconds (NTP).

`read` returns as soon as an event is there (XREAD BLOCK), so a consumer reacts within milliseconds of
the publish. Delivery is at least once: a consumer that crashes before `commit` sees the event again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from pilot import coordination

START_ID = "0-0"
HEARTBEAT_S = 1.0         # the publisher refreshes the clock's alive_ts this often (wall seconds) while it runs
# A signal not heard from for this long (wall seconds) is stale. Ten missed heartbeats: a loaded host or a slow
# Redis write does not flap the sites, and a crashed, frozen or partitioned simulation stops them within 10 s
# (each site then finishes the optimizer step it is in).
SIGNAL_FRESH_S = 10.0


# ------------------------------------------------------------------ keys
def config_key(run_id: str) -> str:
    return coordination.key(run_id, "energy", "config")


def source_key(run_id: str) -> str:
    """The scenario file the simulation runs (a path on its host; not part of the compared config)."""
    return coordination.key(run_id, "energy", "source")


def clock_key(run_id: str) -> str:
    return coordination.key(run_id, "energy", "clock")


def site_key(run_id: str, site: str) -> str:
    return coordination.key(run_id, "energy", "site", site)


def stream_key(run_id: str) -> str:
    return coordination.key(run_id, "energy", "events")


def cursors_key(run_id: str) -> str:
    return coordination.key(run_id, "energy", "cursors")


# ------------------------------------------------------------------ records
@dataclass(frozen=True)
class Event:
    """One transition: `site` became curtailed (window opened) or not (window closed) at `sim_ts`."""

    id: str
    site: str
    curtailed: bool
    sim_ts: float
    sim_time: str
    step: int
    value: float

    @classmethod
    def from_entry(cls, entry_id: str, fields: dict[str, str]) -> Event:
        return cls(entry_id, fields["site"], fields["curtailed"] == "1", float(fields["sim_ts"]),
                   fields["sim_time"], int(fields["step"]), float(fields["value"]))


@dataclass(frozen=True)
class SiteState:
    site: str
    curtailed: bool
    raw: bool
    value: float
    power_kw: float
    sim_ts: float
    step: int
    since: float | None
    fields: dict[str, str]

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> SiteState:
        return cls(fields["site"], fields["curtailed"] == "1", fields["raw"] == "1", float(fields["value"]),
                   float(fields["power_kw"]), float(fields["sim_ts"]), int(fields["step"]),
                   float(fields["since"]) if fields.get("since") else None, fields)


@dataclass(frozen=True)
class SimClock:
    sim_ts: float
    step: int
    step_s: int
    speedup: float
    wall_ts: float
    status: str
    start: str
    end: str
    alive_ts: float = 0.0     # the publisher's last heartbeat (wall); older publishers wrote none: wall_ts

    def now(self, wall_now: float | None = None) -> float:
        """The simulated now (epoch s), advanced from the last step at the speed-up, capped at the next step."""
        if self.status != "running" or self.speedup <= 0:
            return self.sim_ts
        wall_now = time.time() if wall_now is None else wall_now
        return self.sim_ts + min(max(0.0, (wall_now - self.wall_ts) * self.speedup), float(self.step_s))

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> SimClock:
        wall_ts = float(fields["wall_ts"])
        return cls(float(fields["sim_ts"]), int(fields["step"]), int(fields["step_s"]), float(fields["speedup"]),
                   wall_ts, fields["status"], fields["start"], fields["end"],
                   max(wall_ts, float(fields.get("alive_ts") or 0.0)))


def staleness(clock: SimClock | None, wall_now: float, bound: float = SIGNAL_FRESH_S) -> str | None:
    """Why the curtailment signal is not fresh at `wall_now` (wall epoch s), or None when it is.

    Fresh means: a simulation is running, its heartbeat is at most `bound` old, and, paced, its last step is
    at most one step's wall time plus `bound` old (a heartbeat alone could come from a hung simulation)."""
    if clock is None:
        return "no energy clock published yet"
    if clock.status != "running":
        return f"energy simulation {clock.status} (its last flags are not a live signal)"
    age = wall_now - clock.alive_ts
    if age > bound:
        return f"energy signal stale: last heard {age:.1f} s ago (bound {bound:g} s)"
    if clock.speedup > 0:
        step_age, step_wall = wall_now - clock.wall_ts, clock.step_s / clock.speedup
        if step_age > step_wall + bound:
            return (f"energy clock stuck at step {clock.step}: last step {step_age:.1f} s ago, one step is "
                    f"{step_wall:.3g} s (bound {bound:g} s)")
    return None


# ------------------------------------------------------------------ the consumer API
class EnergyEvents:
    """Read a run's energy state and its transition events, resuming from a stored cursor."""

    def __init__(self, client: redis.Redis, run_id: str, consumer: str = "default"):
        self.client = client
        self.run_id = run_id
        self.consumer = consumer

    def cursor(self) -> str:
        """Id of the last event this consumer committed ("0-0": none yet)."""
        return self.client.hget(cursors_key(self.run_id), self.consumer) or START_ID

    def commit(self, event_id: str) -> None:
        """Remember that this consumer has handled everything up to `event_id`."""
        self.client.hset(cursors_key(self.run_id), self.consumer, event_id)

    def read(self, after_id: str | None = None, block_ms: int | None = None, count: int | None = None) -> list[Event]:
        """Events after `after_id` (default: this consumer's cursor), in order; with `block_ms`, wait that
        long for the first one if there is none yet. Does not move the cursor (call `commit`)."""
        after = after_id or self.cursor()
        reply = self.client.xread({stream_key(self.run_id): after}, count=count, block=block_ms)
        if not reply:
            return []
        _, entries = reply[0]
        return [Event.from_entry(entry_id, fields) for entry_id, fields in entries]

    def follow(self, block_ms: int = 1000, stop: Callable[[], bool] | None = None) -> Iterator[Event]:
        """Yield events as they come, from the cursor on, until `stop()` is true; each is committed when
        the caller asks for the next one (so a crash while handling it replays it)."""
        while not (stop and stop()):
            for event in self.read(block_ms=block_ms):
                yield event
                self.commit(event.id)

    def history(self) -> list[Event]:
        """Every transition of the run, in order."""
        return [Event.from_entry(i, f) for i, f in self.client.xrange(stream_key(self.run_id))]

    def current_states(self) -> dict[str, SiteState]:
        """Each site's state at the last published step."""
        names = [site["name"] for site in self.config().get("sites", [])]
        pipe = self.client.pipeline(transaction=True)
        for name in names:
            pipe.hgetall(site_key(self.run_id, name))
        return {name: SiteState.from_fields(fields) for name, fields in zip(names, pipe.execute(), strict=True)
                if fields}

    def staleness(self, wall_now: float | None = None) -> str | None:
        """None while the curtailment signal is fresh, else why it is not (see `staleness`)."""
        return staleness(self.clock(), time.time() if wall_now is None else wall_now)

    def curtailed_sites(self) -> list[str]:
        """The sites curtailed now: none while the signal is not fresh (no signal is no permission to train)."""
        if self.staleness() is not None:
            return []
        return [name for name, state in self.current_states().items() if state.curtailed]

    def clock(self) -> SimClock | None:
        fields = self.client.hgetall(clock_key(self.run_id))
        return SimClock.from_fields(fields) if fields else None

    def config(self) -> dict[str, Any]:
        text = self.client.get(config_key(self.run_id))
        return json.loads(text) if text else {}
