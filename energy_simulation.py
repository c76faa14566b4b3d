"""Publish every site's curtailment state to Redis, step by step, from a Vessim co-simulation.

    python energy_simulation.py                          # the shipped scenario, live (speed-up 1)
    python energy_simulation.py --speedup 3600           # an hour of simulated time per second
    python energy_simulation.py --speedup 0 --days 7     # as fast as possible, the first week

The Redis schema (clock, per-site states, the transition stream) is documented in
pilot/energy/events.py. SIGTERM or Ctrl-C stop it after the current step; running it again with the
same --run-id continues the run where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import threading
from datetime import datetime

from pilot import coordination
from pilot.energy import sites, traces
from pilot.energy.publisher import RunMismatch
from pilot.energy.simulation import Simulation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--scenario", default=None,
                        help=f"scenario TOML (default: the shipped {sites.DEFAULT_SCENARIO.name})")
    parser.add_argument("--run-id", default=os.environ.get("PILOT_RUN_ID", "default"),
                        help="run id that namespaces the Redis keys (default: $PILOT_RUN_ID or 'default')")
    parser.add_argument("--redis-url", default=None,
                        help=f"Redis URL (default: ${coordination.REDIS_URL_ENV}, else the run's embedded server)")
    parser.add_argument("--run-dir", default=None,
                        help=f"run directory of the embedded Redis (default: ${coordination.RUN_DIR_ENV}, else "
                             f"${coordination.HOME_ENV}/runs/RUN_ID with {coordination.HOME_ENV}=~/.cache/pilot)")
    parser.add_argument("--speedup", type=float, default=1.0,
                        help="simulated seconds per wall second: 1 = live, 3600 = an hour per second, 0 = unpaced")
    parser.add_argument("--start", default=None,
                        help="begin at this simulated time instead of the scenario's start (ISO 8601 with time "
                             "zone, within the scenario), e.g. 2025-08-09T00:00Z: summer days with overlapping windows")
    horizon = parser.add_mutually_exclusive_group()
    horizon.add_argument("--days", type=float, default=None,
                         help="stop after this many simulated days from the scenario start (default: its end)")
    horizon.add_argument("--until", default=None, help="stop at this simulated time (ISO 8601 with time zone)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.speedup) and args.speedup >= 0):
        parser.error(f"--speedup must be a number >= 0 (0: as fast as possible, 1: live, 3600: an hour per "
                     f"second), got {args.speedup:g}")
    if args.days is not None and not (math.isfinite(args.days) and args.days > 0):
        parser.error(f"--days must be a number > 0 (simulated days from the scenario start), got {args.days:g}")
    return args


def until_step(args: argparse.Namespace, scenario: sites.Scenario) -> int | None:
    if args.days is not None:
        return int(args.days * 86400) // scenario.step_s
    if args.until is not None:
        until = sites.parse_time(args.until, "--until")
        if until <= scenario.start:
            raise sites.ScenarioError(f"--until {args.until} is not after the scenario start "
                                      f"({scenario.start.isoformat()}); it must lie in {scenario.start.isoformat()} "
                                      f".. {scenario.end.isoformat()}")
        return int((until - scenario.start).total_seconds()) // scenario.step_s
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.run_dir = args.run_dir or coordination.default_run_dir(args.run_id)
    stop = threading.Event()

    def request_stop(signum: int, _frame) -> None:
        print(f"energy_simulation: {signal.Signals(signum).name}, stopping after this step", file=sys.stderr)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        scenario = sites.load_scenario(args.scenario)
        if args.start is not None:
            begin = sites.parse_time(args.start, "--start")
            if not scenario.start <= begin < scenario.end:
                raise sites.ScenarioError(f"--start {args.start} is outside the scenario: it must lie in "
                                          f"{scenario.start.isoformat()} .. {scenario.end.isoformat()}")
            scenario = dataclasses.replace(scenario, start=begin)
        until = until_step(args, scenario)
        client = coordination.connect(args.redis_url, run_dir=args.run_dir)
    except (sites.ScenarioError, coordination.RedisUnavailable) as error:
        print(f"energy_simulation: {error}", file=sys.stderr)
        return 2
    try:
        summary = Simulation(scenario, client, args.run_id, args.speedup, stop).run(until)
    except (RunMismatch, sites.ScenarioError, traces.TraceError) as error:
        print(f"energy_simulation: {error}", file=sys.stderr)
        return 2
    finally:
        if not (args.redis_url or os.environ.get(coordination.REDIS_URL_ENV)):
            coordination.release(client, args.run_dir)
    status = summary.status
    if status == "stopped" and not stop.is_set():
        status = "paused at the --days/--until horizon (run again with a later one to go on)"
    print(f"energy_simulation: {status}; last step {summary.last_step} of {scenario.steps} "
          f"({summary.transitions} transitions published in {summary.wall_s:.1f} s; run {args.run_id!r}, "
          f"{datetime.now().isoformat(timespec='seconds')})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
