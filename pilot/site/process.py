"""A site trainer's process life: start it, find it, let it drain, stop it. No torch here: the ClientApp,
the provisioners and the operator's tools import this module, and a ClientApp process starts in well under
a second.

    ensure_trainer   start the site's trainer (detached, once: a launch lock in Redis) unless a live one answers
    shutdown_trainer ask it to exit through its inbox (it finishes its step and releases what it holds)
    drain_trainer    give a trainer in the middle of a round time to stop at a step boundary and hand in its work
    find_trainers    its processes on this host, by command line (one still starting has registered nothing yet)
    stop_trainer     ask, wait, then kill: one site's trainer; stop_trainers: every trainer of a run
    kill_tree        the one process-tree killer: SIGTERM to a family and its process groups, SIGKILL after a grace
    deliver          put a round's request in the site's inbox (the ClientApp's relay, and the server's direct copy)
    handed_in        the site's result of a round, if the outbox holds it already
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil
import redis

from pilot import coordination, protocol, signing
from pilot.protocol import RoundResult

TRAINER_MODULE = "pilot.site.trainer"
TRAINER_START_TIMEOUT_S = 300.0   # a trainer that is not alive this long after its launch has failed
LAUNCH_LOCK_S = 60                # one launch at a time per site (several ClientApps may ask at once)
STOP_TIMEOUT_S = 10.0             # a process asked to exit gets this long before SIGKILL


# ------------------------------------------------------------------ start
def trainer_command(site: str, run_id: str, run_dir: str, nproc: int, device: str) -> list[str]:
    """The site trainer's command line (the Redis URL, which may hold a password, goes by environment)."""
    module = ["-m", TRAINER_MODULE, "--site", site, "--run-id", run_id, "--run-dir", run_dir, "--device", device]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *module]
    return [sys.executable, *module]


# Started through a launcher that exits at once, so the trainer is nobody's child: a process manager that
# kills the children of a ClientApp process when it ends (Ray's workers do) cannot take it along.
LAUNCHER = """
import json, subprocess, sys
with open(sys.argv[2], "ab") as log:
    subprocess.Popen(json.loads(sys.argv[1]), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                     start_new_session=True)
"""


# the trainer hash's field naming the server key its trainer was started with (written by the launching ClientApp)
SERVER_KEY_FIELD = "server_key"


def ensure_trainer(r: redis.Redis, site: str, run_id: str, run_dir: str, *, nproc: int, device: str,
                   redis_url: str, server_key: str = "") -> float | None:
    """Start the site's trainer unless a live one exists; returns the launch time, or None if it was alive.

    server_key: the server's public key (pilot/signing.py) as the ClientApp learned it through Flower; the trainer
    gets it in its environment, a channel no Redis role can write, and obeys only requests signed with it."""
    if r.exists(protocol.alive_key(run_id, site)):
        return None
    if not r.set(protocol.launch_key(run_id, site), str(os.getpid()), nx=True, ex=LAUNCH_LOCK_S):
        return time.monotonic()  # another ClientApp is starting it right now
    log_dir = Path(run_dir) / "sites" / site
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", coordination.REDIS_URL_ENV: redis_url}
    if server_key:
        env[signing.PUBLIC_KEY_ENV] = server_key
    launcher = subprocess.run(
        [sys.executable, "-c", LAUNCHER, json.dumps(trainer_command(site, run_id, run_dir, nproc, device)),
         str(log_dir / "trainer.log")],
        env=env, timeout=60, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if launcher.returncode != 0:
        raise RuntimeError(f"could not start the trainer of {site}: {launcher.stderr.strip()}")
    # which key it trusts, so that a ClientApp meeting another server key restarts it (the trainer never
    # deletes fields of its hash; the field is the site's own key, no other role writes it)
    r.hset(protocol.trainer_key(run_id, site), SERVER_KEY_FIELD, signing.fingerprint(env.get(signing.PUBLIC_KEY_ENV, "")))
    return time.monotonic()


def trusts_key(r: redis.Redis, run_id: str, site: str, server_key: str) -> bool:
    """Whether the site's live trainer was started trusting `server_key` (as its launching ClientApp recorded)."""
    return r.hget(protocol.trainer_key(run_id, site), SERVER_KEY_FIELD) == signing.fingerprint(server_key)


# ------------------------------------------------------------------ hand a round over
def deliver(r: redis.Redis, run_id: str, site: str, entry: Mapping[str, str | int], via: str) -> None:
    """Put a round's inbox entry (signing.inbox_fields) in the site's inbox. MAXLEN 1: a trainer that (re)starts
    finds only the newest request, never a stale one. The ClientApp relays every round this way; the server also
    delivers straight to a live trainer that trusts its key, so that the round starts without Flower's
    polling and a fresh ClientApp process (the trainer takes a round once, whichever copy comes first). `via`
    says which ("clientapp" or "server"; not signed: it only labels the copy in the round's result)."""
    r.xadd(protocol.inbox_key(run_id, site), {**entry, "via": via}, maxlen=1)


def handed_in(r: redis.Redis, run_id: str, site: str, round_number: int, server_id: str) -> RoundResult | None:
    """The site's result of that round for that server, if it is in the outbox already."""
    for _, fields in r.xrevrange(protocol.outbox_key(run_id, site), count=3):
        result = RoundResult.from_json(fields["result"])
        if result.round == round_number and result.server_id == server_id:
            return result
    return None


# ------------------------------------------------------------------ ask
def shutdown_trainer(r: redis.Redis, run_id: str, site: str) -> str:
    """Ask a site's trainer to exit (MAXLEN 1: it finds this and nothing older); returns the entry's id."""
    return r.xadd(protocol.inbox_key(run_id, site), {"kind": "shutdown", "at": json.dumps(time.time())}, maxlen=1)


def drain_trainer(r: redis.Redis, run_id: str, site: str, timeout_s: float) -> None:
    """Give a site trainer in the middle of a round up to `timeout_s` to stop at a step boundary and hand in
    its work before its compute goes away (it stops by itself when its window closes: pilot/site/watchers.py)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = r.hget(protocol.trainer_key(run_id, site), "status")
            if status != "training" or not r.exists(protocol.alive_key(run_id, site)):
                return
        except redis.RedisError:
            return
        time.sleep(0.2)


# ------------------------------------------------------------------ find
def is_trainer_of(cmdline: Sequence[str], site: str, run_id: str) -> bool:
    """Whether a command line is a site trainer of `site` in run `run_id` (plain, torchrun or one of its ranks)."""
    def value(flag: str) -> str | None:
        for i, arg in enumerate(cmdline):
            if arg == flag and i + 1 < len(cmdline):
                return cmdline[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
        return None
    return TRAINER_MODULE in cmdline and value("--site") == site and value("--run-id") == run_id


def find_trainers(site: str, run_id: str) -> list[psutil.Process]:
    """The site's trainer processes on this host, found by their command lines."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.info["cmdline"] and is_trainer_of(proc.info["cmdline"], site, run_id) and alive(proc):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def trainer_pids(r: redis.Redis, run_id: str) -> dict[str, int]:
    """PIDs of the run's site trainers, as they registered themselves in Redis."""
    pids = {}
    for k in r.scan_iter(match=protocol.trainer_key(run_id, "*")):
        fields = r.hgetall(k)
        if fields.get("pid") and fields.get("status") != "stopped":
            pids[k.split(":")[-2]] = int(fields["pid"])
    return pids


# ------------------------------------------------------------------ stop
def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def family(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (empty if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_processes(procs: Sequence[psutil.Process], timeout_s: float = STOP_TIMEOUT_S) -> list[psutil.Process]:
    """SIGTERM to each process and to its process group, then SIGKILL to whatever is left after `timeout_s`.
    Never signals this process' own group. Returns the processes that survived even SIGKILL (none, normally)."""
    own_group = os.getpgrp()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        groups = set()
        for proc in procs:
            try:
                groups.add(os.getpgid(proc.pid))
                proc.send_signal(sig)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        for group in groups - {own_group}:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (timeout_s if sig == signal.SIGTERM else 5.0)
        while any(alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        procs = [p for p in procs if alive(p)]
        if not procs:
            return []
    return procs


def kill_tree(proc: psutil.Process, grace_s: float = 3.0) -> list[psutil.Process]:
    """Stop a process and all its descendants (stop_processes over its family)."""
    return stop_processes(family(proc.pid), grace_s)


def stop_trainer(r: redis.Redis | None, run_id: str, site: str, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop a site's trainer on this host: ask through its inbox, wait up to `timeout_s`, then kill what is
    left; afterwards no stale shutdown waits for its successor and no alive key or launch lock of it remains."""
    procs = find_trainers(site, run_id)
    if not procs:
        return
    families = {p.pid: p for proc in procs for p in family(proc.pid)}
    shutdown_id = None
    if r is not None:
        try:  # the trainer's own way out: it finishes cleanly and releases what it holds
            shutdown_id = shutdown_trainer(r, run_id, site)
        except redis.RedisError:
            pass
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in families.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    stop_processes([p for p in families.values() if alive(p)], timeout_s)
    if r is not None:
        try:
            if shutdown_id is not None:
                r.xdel(protocol.inbox_key(run_id, site), shutdown_id)
            r.delete(protocol.alive_key(run_id, site), protocol.launch_key(run_id, site))
        except redis.RedisError:
            pass


def stop_trainers(r: redis.Redis, run_id: str, grace_s: float = STOP_TIMEOUT_S) -> list[int]:
    """Ask every site trainer of the run (as registered in Redis) to exit; kill, with its children, any still
    there after `grace_s`. Returns their PIDs."""
    pids = trainer_pids(r, run_id)
    for site in pids:
        shutdown_trainer(r, run_id, site)
    procs = []
    for pid in pids.values():
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            continue
    _, left = psutil.wait_procs(procs, timeout=grace_s)
    for proc in left:
        kill_tree(proc)
    return list(pids.values())
