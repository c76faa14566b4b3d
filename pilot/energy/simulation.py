"""The co-simulation run: Vessim steps every site's microgrid, a controller decides and publishes.

Each step the controller reads the microgrid states Vessim computed (generation, load, MOER grid
signal), applies the curtailment policy per site (`policy.decide`, with hysteresis), and publishes the
step to Redis in a transaction (publisher.py): paced, each step as soon as it is computed; unpaced,
steps are batched into one transaction at most MAX_BATCH_S of wall time apart. A pacer holds simulated time to `speedup` simulated
seconds per wall second (1 = live; 3600 = an hour per second; 0 = as fast as possible). A stop request
(SIGTERM) takes effect between steps, so Redis always ends on a whole step; running again with the same
run id continues from the next step.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

import pandas as pd
import redis

from pilot.energy import policy
from pilot.energy import scenario as scenario_mod
from pilot.energy.publisher import Publisher, Transition
from pilot.energy.sites import Scenario

PROGRESS_EVERY_S = 5.0      # wall seconds between progress lines
WAITING_EVERY_S = 60.0      # paced and waiting for the next step: a line at least this often (wall seconds)
FAST_SPEEDUP = 3600         # the speed-up the start line suggests to a live run (an hour per second)
MAX_BATCH_S = 0.05          # unpaced, steps are published together at least this often (wall seconds)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def window_outlook(scenario: Scenario, profiles: Mapping[str, pd.DataFrame],
                   from_step: int = 0) -> dict[str, tuple[float, float] | None]:
    """Per site, its first curtailment window (sim epoch seconds start, end) that ends after `from_step`, from
    the profiles alone (no Redis), with the scenario's hysteresis applied as `pilot plan` does; None: no window
    before the scenario ends. A window that started before `from_step` means curtailed now."""
    times = scenario_mod.step_times(scenario)
    end = float(times[-1] + scenario.step_s) if len(times) else scenario.start.timestamp()
    now = float(times[from_step]) if from_step < len(times) else end
    out: dict[str, tuple[float, float] | None] = {}
    for site in scenario.sites:
        raw = policy.step_windows(times, scenario_mod.raw_curtailed(site, scenario, profiles[site.name]), end)
        windows = policy.offline_hysteresis(raw, scenario.min_on_s, scenario.min_off_s, end)
        out[site.name] = next(((float(a), float(b)) for a, b in windows if b > now), None)
    return out


def describe_pace(scenario: Scenario, profiles: Mapping[str, pd.DataFrame], from_step: int,
                  speedup: float) -> list[str]:
    """What a person starting the simulation should know: the pace, when each site's next window opens (in
    simulated time and in wall time at this pace), and how to go faster."""
    lines = []
    if speedup <= 0:
        lines.append("unpaced (--speedup 0): steps run as fast as they compute")
    elif speedup == 1:
        lines.append(f"live: wall-clock pace (--speedup 1), one {scenario.step_s} s step every {scenario.step_s} s "
                     f"of wall time; --speedup {FAST_SPEEDUP} runs an hour of simulated time per second, "
                     f"--speedup 0 as fast as possible")
    else:
        lines.append(f"speed-up {speedup:g}: a {scenario.step_s} s step every {scenario.step_s / speedup:.3g} s of "
                     f"wall time" + (f"; --speedup {FAST_SPEEDUP} goes faster" if speedup < FAST_SPEEDUP else ""))
    times = scenario_mod.step_times(scenario)
    now = float(times[from_step]) if from_step < len(times) else scenario.end.timestamp()
    for name, window in window_outlook(scenario, profiles, from_step).items():
        if window is None:
            lines.append(f"{name}: no curtailment window before the scenario ends ({scenario.end.isoformat()})")
            continue
        start, end = window
        if start <= now:
            lines.append(f"{name}: curtailed now, until {publisher_iso(end)}")
            continue
        if speedup == 1:
            when = f"in {_duration(start - now)} of wall time at live pace"
        elif speedup > 0:
            when = f"{_duration(start - now)} simulated, {_duration((start - now) / speedup)} of wall time"
        else:
            when = f"{_duration(start - now)} simulated"
        lines.append(f"{name}: next window opens {publisher_iso(start)} ({when}), until {publisher_iso(end)}")
    return lines


class Stopped(Exception):
    """Raised inside the Vessim loop when a stop was requested; the last whole step is published."""


@dataclass
class RunSummary:
    first_step: int
    last_step: int          # the last step published by this process (first_step - 1 if none)
    status: str             # finished | stopped (paused at --until/--days or by a signal) | nothing-to-do
    transitions: int
    wall_s: float


class Pacer:
    """Holds a simulation to `speedup` simulated seconds per wall second; a stop event cuts waits short."""

    def __init__(self, speedup: float, stop: threading.Event):
        self.speedup = speedup
        self.stop = stop
        self.origin: tuple[float, float] | None = None   # (sim_ts, wall monotonic) of the first step

    def delay(self, sim_ts: float) -> float:
        """Wall seconds until `sim_ts` is due (<= 0: due now)."""
        if self.speedup <= 0:
            return 0.0
        if self.origin is None:
            self.origin = (sim_ts, time.monotonic())
        return self.origin[1] + (sim_ts - self.origin[0]) / self.speedup - time.monotonic()

    def wait(self, seconds: float) -> None:
        if seconds > 0:
            self.stop.wait(seconds)


def _controller_class():
    import vessim as vs  # noqa: PLC0415 - keep `import pilot.energy.simulation` light

    class CurtailmentController(vs.Controller):
        """Vessim calls `step` once per simulated step with every microgrid's state."""

        def __init__(self, run: Simulation):
            self.run = run

        def step(self, now: datetime, microgrid_states: dict) -> None:
            self.run.on_step(pd.Timestamp(now).timestamp(), microgrid_states)

    return CurtailmentController


class Simulation:
    """One process's part of a run: steps [resume, until) of the scenario, published to Redis."""

    def __init__(self, scenario: Scenario, client: redis.Redis, run_id: str, speedup: float = 1.0,
                 stop: threading.Event | None = None, profiles: Mapping[str, pd.DataFrame] | None = None,
                 log: Callable[[str], None] | None = None, publisher: Publisher | None = None):
        self.scenario = scenario
        self.speedup = speedup
        self.stop = stop or threading.Event()
        self.publisher = publisher or Publisher(client, run_id, scenario, speedup)
        self.profiles = profiles
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.pacer = Pacer(speedup, self.stop)
        self.thresholds = {s.name: float(s.options.get("threshold") or scenario.threshold)
                           for s in scenario.sites if s.signal == "moer"}
        self.states: dict[str, policy.PolicyState] = {}
        self.step = 0
        self.transitions = 0
        self._next_progress = 0.0
        self._last_flush = time.monotonic()

    def run(self, until_step: int | None = None) -> RunSummary:
        """Simulate and publish up to step `until_step` (exclusive; default: the scenario's end)."""
        started = time.monotonic()
        until_step = min(until_step if until_step is not None else self.scenario.steps, self.scenario.steps)
        resume = self.publisher.begin()
        first = resume.next_step
        if first >= until_step:
            return RunSummary(first, first - 1, "nothing-to-do", 0, time.monotonic() - started)
        self.states = resume.states
        self.step = first
        if self.profiles is None:
            self.log("building the site profiles (pvlib, windpowerlib) ...")
            self.profiles = scenario_mod.site_profiles(self.scenario)
        env = scenario_mod.build_environment(self.scenario, self.profiles, first, until_step)
        env.add_controller(_controller_class()(self))
        verb = "resuming" if first else "starting"
        self.log(f"{verb} at step {first} ({self.scenario.start + pd.Timedelta(seconds=first * self.scenario.step_s)})"
                 f", {len(self.scenario.sites)} sites, speed-up {self.speedup or 'unpaced'}")
        for line in describe_pace(self.scenario, self.profiles, first, self.speedup):
            self.log(line)
        status = "finished"
        try:
            env.run(until=(until_step - first) * self.scenario.step_s)
        except Stopped:
            status = "stopped"
        self._flush()                  # staged steps are whole steps: they go out before the status
        if status == "finished" and self.speedup > 0:
            # the last step lasts its step_s too: a paced run ends when the simulated span does
            # (a stop signal cuts the wait short; every step is published, so the run is still finished)
            self._wait(self.pacer.delay(self.scenario.start.timestamp() + until_step * self.scenario.step_s),
                       "the end of the last step")
        if status == "finished" and until_step < self.scenario.steps:
            status = "stopped"  # paused at --until; a later run goes on
        self.publisher.set_status(status)
        return RunSummary(first, self.step - 1, status, self.transitions, time.monotonic() - started)

    def _wait(self, seconds: float, what: str) -> None:
        """Wait for the pace, saying so at least every WAITING_EVERY_S of wall time (a live run is quiet for
        a whole step otherwise)."""
        end = time.monotonic() + seconds
        while not self.stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            self.pacer.wait(min(left, WAITING_EVERY_S))
            left = end - time.monotonic()
            if left > 0 and not self.stop.is_set():
                curtailed = [name for name, s in self.states.items() if s.curtailed]
                self.log(f"waiting {_duration(left)} of wall time for {what} at speed-up {self.speedup:g}; "
                         f"curtailed {curtailed or 'none'} (--speedup {FAST_SPEEDUP} goes faster)")

    def _flush(self) -> None:
        self.publisher.flush()
        self._last_flush = time.monotonic()

    def on_step(self, sim_ts: float, states: Mapping[str, Mapping]) -> None:
        if self.stop.is_set():
            raise Stopped()
        delay = self.pacer.delay(sim_ts)
        if delay > 0:
            self._flush()              # ahead of the clock: publish what is staged, then wait
            self._wait(delay, f"step {self.step} ({publisher_iso(sim_ts)})")
        if self.stop.is_set():
            raise Stopped()
        fields: dict[str, dict] = {}
        transitions: list[Transition] = []
        for site in self.scenario.sites:
            state = states[site.name]
            actors = state["actor_states"]
            load = -float(actors["load"]["power"])
            if site.signal == "moer":
                value = float(state["grid_signals"]["moer"])
                raw = value < self.thresholds[site.name]
                generation = 0.0
            else:
                generation = float(actors["pv"]["power"]) + float(actors["wind"]["power"])
                value = float(state["p_delta"])           # generation - load, W
                raw = value > 0
            old = self.states[site.name]
            new = policy.decide(old, sim_ts, raw, self.scenario.min_on_s, self.scenario.min_off_s)
            if new.curtailed != old.curtailed:
                transitions.append(Transition(site.name, new.curtailed, value))
            self.states[site.name] = new
            fields[site.name] = {
                "site": site.name, "region": site.region, "signal": site.signal, "raw": int(raw),
                "value": repr(value), "generation_w": repr(generation), "load_w": repr(load),
                "threshold": repr(self.thresholds.get(site.name, 0.0)),
                "power_kw": repr(site.train_kw if new.curtailed else site.idle_kw), **new.to_fields()}
        self.publisher.stage_step(self.step, sim_ts, fields, transitions)
        self.transitions += len(transitions)
        self.step += 1
        if self.speedup > 0 and self.pacer.delay(sim_ts + self.scenario.step_s) > 0:
            self._flush()              # the next step is not due yet: this one goes out now
        elif time.monotonic() - self._last_flush >= MAX_BATCH_S:
            self._flush()
        if time.monotonic() >= self._next_progress:
            self._next_progress = time.monotonic() + PROGRESS_EVERY_S
            curtailed = [name for name, s in self.states.items() if s.curtailed]
            self.log(f"step {self.step - 1} {publisher_iso(sim_ts)}: curtailed {curtailed or 'none'}")


def publisher_iso(sim_ts: float) -> str:
    return pd.Timestamp(sim_ts, unit="s", tz="UTC").isoformat()
