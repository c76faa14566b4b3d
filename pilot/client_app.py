"""Pilot ClientApp: thin. Flower may start a fresh process for every message, so it owns no training state.

It names its site (QUERY), and for a TRAIN message makes sure the site's persistent trainer runs (starting
it once, detached, if no live one answers), hands it the round request through Redis and returns its result.
It imports no torch: a ClientApp process starts in well under a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import redis
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from pilot import coordination, protocol
from pilot.protocol import RoundRequest, RoundResult
from pilot.sites import IDENTIFY, site_name

ROUND_KEY = "pilot.round"
RESULT_KEY = "pilot.result"
TRAINER_START_TIMEOUT_S = 300.0   # a trainer that is not alive this long after its launch has failed
LAUNCH_LOCK_S = 60

app = ClientApp()


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the ServerApp which site this node serves, and warm up the site's trainer: it loads its model
    and data now, so that the site's first curtailment window is spent training, not starting up."""
    site = site_name(context.node_config)
    run = msg.content[IDENTIFY]
    if "run-id" in run:
        r = coordination.connect(redis_url(run, context), wait=True)
        ensure_trainer(r, site, run, context)
        r.close()
    return Message(RecordDict({IDENTIFY: ConfigRecord({"name": site})}), reply_to=msg)


def redis_url(run: ConfigRecord, context: Context) -> str:
    """A SuperNode at another site reaches Redis by its own address (and, in a secure deployment, as its own
    user): its node config wins, then its own $PILOT_REDIS_URL, then the server's URL."""
    return str(context.node_config.get("redis-url") or os.environ.get(coordination.REDIS_URL_ENV) or run["redis-url"])


def trainer_command(site: str, run_id: str, run_dir: str, nproc: int, device: str) -> list[str]:
    """The site trainer's command line (the Redis URL, which may hold a password, goes by environment)."""
    module = ["-m", "pilot.site_trainer", "--site", site, "--run-id", run_id, "--run-dir", run_dir,
              "--device", device]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *module]
    return [sys.executable, *module]


def ensure_trainer(r: redis.Redis, site: str, run: ConfigRecord, context: Context) -> float | None:
    """Start the site's trainer unless a live one exists; returns the launch time, or None if it was alive."""
    run_id, run_dir = str(run["run-id"]), str(run["run-dir"])
    if r.exists(protocol.alive_key(run_id, site)):
        return None
    if not r.set(coordination.key(run_id, "site", site, "launch"), str(os.getpid()), nx=True, ex=LAUNCH_LOCK_S):
        return time.monotonic()  # another ClientApp is starting it right now
    log_dir = Path(run_dir) / "sites" / site
    log_dir.mkdir(parents=True, exist_ok=True)
    # Started through a launcher that exits at once, so the trainer is nobody's child: a process manager
    # that kills the children of a ClientApp process when it ends (Ray's workers do) cannot take it along.
    launcher = subprocess.run(
        [sys.executable, "-c", LAUNCHER,
         json.dumps(trainer_command(site, run_id, run_dir, int(run["site-nproc"]), str(run["site-device"]))),
         str(log_dir / "trainer.log")],
        env={**os.environ, "PYTHONUNBUFFERED": "1", coordination.REDIS_URL_ENV: redis_url(run, context)}, timeout=60,
        stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if launcher.returncode != 0:
        raise RuntimeError(f"could not start the trainer of {site}: {launcher.stderr.strip()}")
    return time.monotonic()


LAUNCHER = """
import json, subprocess, sys
with open(sys.argv[2], "ab") as log:
    subprocess.Popen(json.loads(sys.argv[1]), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                     start_new_session=True)
"""


def wait_for_result(r: redis.Redis, run_id: str, site: str, request: RoundRequest, after_id: str,
                    launched_at: float | None) -> RoundResult:
    outbox = protocol.outbox_key(run_id, site)
    round_number = request.round
    while True:
        for _, entries in r.xread({outbox: after_id}, block=1000) or []:
            for entry_id, fields in entries:
                after_id = entry_id
                result = RoundResult.from_json(fields["result"])
                if result.round == round_number and result.server_id == request.server_id:
                    return result
        if not r.exists(protocol.alive_key(run_id, site)):
            starting = launched_at is not None and time.monotonic() - launched_at < TRAINER_START_TIMEOUT_S
            if not starting:
                return RoundResult(round=round_number, site=site, status="error", server_id=request.server_id,
                                   reason=f"the trainer of {site} died (see {protocol.trainer_key(run_id, site)})")
        else:
            launched_at = None  # it is up: from now on, silence means death


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run one round at this site's trainer and return its result."""
    site = site_name(context.node_config)
    config = msg.content[ROUND_KEY]
    run_id = str(config["run-id"])
    request = RoundRequest.from_json(str(config["request"]))
    r = coordination.connect(redis_url(config, context), wait=True)  # the run is going: ride out a Redis restart
    launched_at = ensure_trainer(r, site, config, context)
    last = r.xrevrange(protocol.outbox_key(run_id, site), count=1)
    after_id = last[0][0] if last else "0-0"
    # MAXLEN 1: a trainer that (re)starts finds only the newest request, never a stale one
    r.xadd(protocol.inbox_key(run_id, site), {"kind": "train", "round": request.round, "request": request.to_json()},
           maxlen=1)
    result = wait_for_result(r, run_id, site, request, after_id, launched_at)
    r.close()
    return Message(RecordDict({RESULT_KEY: ConfigRecord({"result": result.to_json()})}), reply_to=msg)


def shutdown_trainer(r: redis.Redis, run_id: str, site: str) -> None:
    """Ask a site's trainer to exit (the server does this when the run ends)."""
    r.xadd(protocol.inbox_key(run_id, site), {"kind": "shutdown", "at": json.dumps(time.time())}, maxlen=1)
