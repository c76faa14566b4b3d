"""`pilot stop RUN_ID`: stop everything of a run on this machine, in order, and say what was stopped.

    the server   asked through Redis (pilot:{run}:server:stop): it ends the round in progress (every site
                 hands in its work), writes its checkpoint and final model, shuts its site trainers down
    trainers     any still registered after that are asked, then killed with their children
    Redis        the run's embedded redis-server, if the run has one

`pilot run` calls the same on Ctrl-C (and stops the local SuperLink and its simulation processes).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import redis

from pilot import coordination, protocol
from pilot.site import process

SERVER_STOP_TIMEOUT_S = 120.0   # a server ends a round within stop-grace; it then checkpoints


class NoSuchRun(RuntimeError):
    """No run of that id answers here: the message says where Pilot looked."""


def run_client(run_id: str, run_dir: Path, redis_url: str = "") -> tuple[redis.Redis, bool]:
    """A client of the run's Redis (never starts one: a stopped run stays stopped); whether it is embedded."""
    url = redis_url or os.environ.get(coordination.REDIS_URL_ENV, "")
    embedded = not url
    if embedded:
        server = coordination.EmbeddedRedis(run_dir)
        state = server.read_state()
        if state is None or not server.alive(state):
            raise NoSuchRun(f"no run {run_id!r} is running here: no embedded Redis in {run_dir / 'redis'} "
                            f"(give --run-dir, or set {coordination.REDIS_URL_ENV} for a run on a shared Redis)")
        url = state.url
    r = coordination.client_from_url(url)
    known = r.exists(protocol.server_current_key(run_id), protocol.server_events_key(run_id),
                     protocol.train_config_key(run_id))
    if not known:
        raise NoSuchRun(f"Redis at {coordination.redact_url(url)} knows no run {run_id!r}")
    return r, embedded


def stop_run(run_id: str, run_dir: Path | None = None, redis_url: str = "", reason: str = "pilot stop",
             timeout_s: float = SERVER_STOP_TIMEOUT_S, say=print) -> dict:
    run_dir = Path(run_dir) if run_dir else coordination.default_run_dir(run_id)
    r, embedded = run_client(run_id, run_dir, redis_url)
    done: dict = {"server": "not running", "trainers": [], "redis": "shared (left running)"}
    if r.exists(protocol.server_alive_key(run_id)):
        r.set(protocol.server_stop_key(run_id), reason)
        say(f"asked the server of {run_id} to stop (it ends the round in progress and checkpoints)")
        deadline = time.monotonic() + timeout_s
        while r.exists(protocol.server_alive_key(run_id)) and time.monotonic() < deadline:
            time.sleep(0.5)
        done["server"] = "stopped" if not r.exists(protocol.server_alive_key(run_id)) else "did not stop in time"
    try:
        done["trainers"] = process.stop_trainers(r, run_id)
    except redis.RedisError:
        pass   # the server's shutdown may already have let the embedded Redis go
    if done["trainers"]:
        say(f"stopped site trainer(s) {done['trainers']}")
    if embedded:
        done["redis"] = "stopped" if coordination.EmbeddedRedis(run_dir).stop() else "already stopped"
    say(f"run {run_id}: server {done['server']}, {len(done['trainers'])} trainer(s) stopped, Redis {done['redis']}")
    return done
