"""Simulated days per wall second of the energy co-simulation, for 3 and 100 sites at 5-minute steps.

Each row runs the real Simulation (Vessim microgrids, the curtailment policy, unpaced) and publishes every
step to Redis (unpaced: steps batched into transactions every 50 ms of wall time), against the baseline side by side: the same simulation with publishing
switched off. Redis is a real redis-server on loopback, once without persistence and once as Pilot's
embedded server runs it (append-only file, fsync on every write).

    .venv/bin/python bench/energy_sim.py [--days3 30] [--days100 7]

100 sites are the three shipped sites repeated with different PV and load sizes (the pvlib and windpowerlib
profiles are computed per site; building them is timed separately).
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import subprocess
import tempfile
import time
from datetime import timedelta

import redis

from pilot import coordination
from pilot.energy import scenario as scenario_mod
from pilot.energy import sites
from pilot.energy.publisher import Publisher, Resume
from pilot.energy.simulation import Simulation


class NoPublisher(Publisher):
    """The baseline: everything but the Redis writes."""

    def __init__(self, scenario: sites.Scenario):
        self.scenario = scenario

    def begin(self) -> Resume:
        return Resume(0, {s.name: sites_policy_state() for s in self.scenario.sites}, "new")

    def stage_step(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def set_status(self, status: str) -> None:
        pass


def sites_policy_state():
    from pilot.energy.policy import PolicyState  # noqa: PLC0415

    return PolicyState()


def many_sites(base: sites.Scenario, count: int, days: float) -> sites.Scenario:
    out = []
    for i in range(count):
        template = base.sites[i % len(base.sites)]
        scale = 0.8 + 0.4 * ((i * 37) % 11) / 10   # 0.8 .. 1.2
        options = {**template.options, "pv_kwp": template.options["pv_kwp"] * scale,
                   "load_base_kw": template.options["load_base_kw"] * (2.0 - scale)}
        out.append(dataclasses.replace(template, name=f"client_{i}", options=options))
    return dataclasses.replace(base, sites=tuple(out), end=base.start + timedelta(days=days))


def start_plain_redis(data_dir: str) -> tuple[subprocess.Popen, str]:
    port, password = coordination.free_port(), secrets.token_hex(8)
    proc = subprocess.Popen([coordination.find_redis_server(), "--bind", "127.0.0.1", "--port", str(port),
                             "--requirepass", password, "--save", "", "--appendonly", "no", "--dir", data_dir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    return proc, url


def measure(scenario: sites.Scenario, profiles, client: redis.Redis | None, run_id: str) -> float:
    """Wall seconds for the whole scenario, unpaced."""
    publisher = None if client is not None else NoPublisher(scenario)
    sim = Simulation(scenario, client, run_id, speedup=0, profiles=profiles, log=lambda _t: None,
                     publisher=publisher)
    started = time.perf_counter()
    summary = sim.run()
    assert summary.status == "finished", summary
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days3", type=float, default=30.0, help="simulated days for the 3-site rows")
    parser.add_argument("--days100", type=float, default=7.0, help="simulated days for the 100-site rows")
    args = parser.parse_args()
    base = sites.load_scenario()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain, plain_url = start_plain_redis(tmp)
        try:
            with coordination.embedded_redis(f"{tmp}/run") as embedded_url:
                targets = [("no Redis (baseline)", None), ("Redis, no persistence", plain_url),
                           ("Redis embedded (AOF fsync always)", embedded_url)]
                for count, days in ((3, args.days3), (100, args.days100)):
                    scenario = many_sites(base, count, days)
                    started = time.perf_counter()
                    profiles = scenario_mod.site_profiles(scenario)
                    build_s = time.perf_counter() - started
                    baseline = None
                    for label, url in targets:
                        client = coordination.client_from_url(url) if url else None
                        wall = measure(scenario, profiles, client, f"bench-{count}-{secrets.token_hex(3)}")
                        baseline = baseline or wall
                        rows.append((count, days, scenario.steps, label, wall, days / wall, baseline / wall,
                                     build_s))
                        print(f"  {count} sites, {label}: {wall:.2f} s", flush=True)
        finally:
            plain.terminate()
            plain.wait()
    print()
    print(f"{'sites':>5} {'days':>5} {'steps':>6}  {'publishing':<34} {'wall s':>7} {'days/s':>8} "
          f"{'vs baseline':>11}  {'profiles s':>10}")
    for count, days, steps, label, wall, rate, ratio, build_s in rows:
        print(f"{count:>5} {days:>5g} {steps:>6}  {label:<34} {wall:>7.2f} {rate:>8.2f} {ratio:>10.2f}x  "
              f"{build_s:>10.1f}")


if __name__ == "__main__":
    main()
