"""`pilot watch`: what the live view shows is what the run published to Redis."""

from __future__ import annotations

import io
import json
import time

from rich.console import Console

from pilot import protocol
from pilot.energy import events as energy_events
from pilot.ops import watch


def publish_run(r, run: str) -> None:
    now = time.time()
    r.hset(energy_events.clock_key(run), mapping={
        "sim_time": "2025-08-09T12:00:00+00:00", "sim_ts": "1754740800", "step": "144", "step_s": "300",
        "speedup": "720", "wall_ts": str(now), "status": "running", "start": "2025-08-09T00:00:00+00:00",
        "end": "2025-08-11T00:00:00+00:00"})
    r.set(energy_events.config_key(run), json.dumps({"scenario": {"step_s": 300}, "sites": [
        {"name": "client_0", "signal": "surplus"}, {"name": "client_1", "signal": "surplus"}]}))
    for site, curtailed, gen, load in (("client_0", 1, 900_000, 600_000), ("client_1", 0, 100_000, 400_000)):
        r.hset(energy_events.site_key(run, site), mapping={
            "site": site, "region": "R", "signal": "surplus", "curtailed": curtailed, "raw": curtailed,
            "value": gen - load, "generation_w": gen, "load_w": load, "power_kw": 2.8, "since": "",
            "pending_since": "", "sim_time": "2025-08-09T12:00:00+00:00", "sim_ts": "1754740800", "step": "144"})
    stream = protocol.server_events_key(run)
    for fields in ({"kind": "sites", "connected": "client_0,client_1"},
                   {"kind": "regime", "regime": "solo", "sites": "client_0"},
                   {"kind": "round-start", "round": "3", "regime": "solo", "sites": "client_0"},
                   {"kind": "round-end", "round": "2", "total_tokens": "40960", "val_bpb": "2.3456",
                    "loss": json.dumps({"client_0": 5.1})},
                   {"kind": "energy", "site": "client_0", "curtailed": "1"}):
        r.xadd(stream, {"wall_ts": str(now), **fields})
    r.hset(protocol.trainer_key(run, "client_0"), mapping={"status": "training", "round": "3", "step": "17",
                                                          "pid": "1"})
    for step in (16, 17):
        r.xadd(protocol.metrics_key(run, "client_0"), {"round": "3", "step": str(step), "loss": "4.5",
                                                       "tokens": "2048", "seconds": "0.25", "wall_ts": str(now)})


def test_the_view_shows_what_the_run_published(redis_client):
    run = "watched"
    publish_run(redis_client, run)
    snap = watch.snapshot(redis_client, run)
    assert (snap.regime, snap.round, snap.total_tokens, snap.val_bpb) == ("solo", 3, 40960, 2.3456)
    assert snap.speedup == 720 and 1754740800 <= snap.sim_time <= 1754740800 + 300
    sites = {s.name: s for s in snap.sites}
    assert sites["client_0"].curtailed is True and sites["client_1"].curtailed is False
    assert sites["client_0"].signal == "900 / 600 kW"
    assert (sites["client_0"].trainer, sites["client_0"].step, sites["client_0"].loss) == ("training", "17", 4.5)
    assert sites["client_0"].tokens_per_s == 8192             # 2 x 2048 tokens in 2 x 0.25 s
    assert sites["client_1"].tokens_per_s is None
    assert not any("energy" in line.split()[1] for line in snap.recent)   # frequent kinds stay out
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(watch.render(snap, "Pilot demo"))
    text = console.file.getvalue()
    assert "2025-08-09 12:" in text and "curtailed" in text and "8,192" in text and "2.3456" in text
    assert watch.one_line(snap).startswith("[08-09 12:") and "client_0:ON client_1:off" in watch.one_line(snap)


def test_an_empty_run_shows_dashes_not_errors(redis_client):
    snap = watch.snapshot(redis_client, "nothing-yet")
    assert (snap.regime, snap.round, snap.sites, snap.sim_time) == ("-", 0, [], None)
    Console(file=io.StringIO()).print(watch.render(snap))


def test_watching_a_run_that_is_not_running_here_is_an_error(tmp_path):
    """`pilot watch` on an unknown run says so and where it looked, instead of starting a Redis to show nothing."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pilot.cli", "watch", "nosuchrun", "--run-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no run 'nosuchrun' is running here" in done.stderr, done.stderr
    assert not (tmp_path / "r" / "redis").exists(), "no Redis was started for it"
