"""Processes of a run on this one machine: an isolated Flower home, and stopping everything a run started.

`flwr run . local-simulation` starts a local SuperLink in the background and leaves it running; site
trainers are detached on purpose (they outlive a restarted server). A demo or a test that must leave
nothing behind stops them explicitly: the SuperLink by its Flower home (in its command line), the
trainers by the PIDs they register in Redis (pilot/protocol.py), after asking them to exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import redis

from pilot import protocol
from pilot.coordination import free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def isolated_flwr_env(flwr_home: Path, base_env: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An environment whose `flwr` uses `flwr_home` (a copy of the project's connections) and its own free
    local SuperLink ports, so that this run's SuperLink is its own and can be found and stopped."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT_ROOT / ".flwr" / "config.toml", flwr_home / "config.toml")
    env = dict(os.environ if base_env is None else base_env)
    env.update(FLWR_HOME=str(flwr_home), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
               FLWR_LOCAL_CONTROL_API_PORT=str(free_port()), **extra)
    return env


def kill_tree(proc: psutil.Process, grace_s: float = 3.0) -> None:
    """SIGTERM a process and all its descendants, SIGKILL what is left after `grace_s`."""
    with contextlib.suppress(psutil.Error):
        family = proc.children(recursive=True) + [proc]
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(family, timeout=grace_s)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=grace_s)


def stop_local_superlink(flwr_home: Path, grace_s: float = 3.0) -> int:
    """Stop the SuperLink (and its simulation processes) that `flwr run` started for this Flower home."""
    stopped = 0
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(flwr_home) in part for part in proc.info["cmdline"] or []):
                kill_tree(proc, grace_s)
                stopped += 1
    return stopped


def trainer_pids(r: redis.Redis, run_id: str) -> dict[str, int]:
    """PIDs of the run's site trainers on this host, as they registered themselves."""
    pids = {}
    for k in r.scan_iter(match=protocol.trainer_key(run_id, "*")):
        fields = r.hgetall(k)
        if fields.get("pid") and fields.get("status") != "stopped":
            pids[k.split(":")[-2]] = int(fields["pid"])
    return pids


def stop_trainers(r: redis.Redis, run_id: str, grace_s: float = 10.0) -> list[int]:
    """Ask every site trainer of the run to exit; kill (with its children) any still there after `grace_s`."""
    from pilot.client_app import shutdown_trainer  # Flower's client side: import only when needed

    pids = trainer_pids(r, run_id)
    for site in pids:
        shutdown_trainer(r, run_id, site)
    procs = []
    for pid in pids.values():
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        kill_tree(proc)
    return list(pids.values())


def wait_until(condition, timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return condition()
