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
import time
from pathlib import Path

import psutil

from pilot.coordination import free_port
from pilot.site.process import kill_tree

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def isolated_flwr_env(flwr_home: Path, base_env: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An environment whose `flwr` uses `flwr_home` (a copy of the project's connections) and its own free
    local SuperLink ports, so that this run's SuperLink is its own and can be found and stopped."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT_ROOT / ".flwr" / "config.toml", flwr_home / "config.toml")
    env = dict(os.environ if base_env is None else base_env)
    env.update(FLWR_HOME=str(flwr_home), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
               FLWR_LOCAL_CONTROL_API_PORT=str(free_port()), **extra)
    return env


def stop_local_superlink(flwr_home: Path, grace_s: float = 3.0) -> int:
    """Stop the SuperLink (and its simulation processes) that `flwr run` started for this Flower home."""
    stopped = 0
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(flwr_home) in part for part in proc.info["cmdline"] or []):
                kill_tree(proc, grace_s)
                stopped += 1
    return stopped


def wait_until(condition, timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return condition()
