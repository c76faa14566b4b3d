"""Kill the ServerApp mid-run: a new one resumes from the last checkpoint (same round, tokens and ledger),
and the site trainers, still alive, serve the new server with their optimizer state."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from pilot import protocol
from pilot.coordination import connect, release
from pilot.server import checkpoint as global_state
from tests.conftest import PROJECT_ROOT, VENV_BIN
from tests.test_flower_connections import flwr_env_for, stop_local_superlink

pytestmark = pytest.mark.e2e   # real Flower runs: minutes each (quick tier: -m 'not e2e')

def start_run(env, run_config: str) -> subprocess.Popen:
    return subprocess.Popen([str(VENV_BIN / "flwr"), "run", ".", "local-simulation", "--stream", "--run-config",
                             run_config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=PROJECT_ROOT)


def server_app_processes(flwr_home) -> list[psutil.Process]:
    """The simulation's ServerApp process(es) under our local SuperLink."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(flwr_home) in part for part in proc.info["cmdline"] or []):
                found += [c for c in proc.children(recursive=True) if "flwr-simulation" in " ".join(c.cmdline())]
    return found


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_killed_server_is_resumed_from_its_checkpoint(tmp_path, text_shards, tiny_tokenizer):
    run_dir, run_id = tmp_path / "run", "resume"
    flwr_home, env = flwr_env_for(tmp_path)
    env[protocol.ORPHAN_TIMEOUT_ENV] = "300"  # a busy machine may take a minute to start the new server
    common = [f'run-id="{run_id}"', f'run-dir="{run_dir}"', f'data-dir="{text_shards}"',
              f'tokenizer-dir="{tiny_tokenizer}"', 'curtailment="always"', "round-duration=4", "depth=2",
              'outer-optimizer="nesterov"', "outer-lr=0.7",
              "max-seq-len=128", "device-batch-size=4", "total-batch-size=1024", "eval-tokens=1024"]
    r = connect(run_dir=run_dir)
    events_key = protocol.server_events_key(run_id)

    def events(kind: str) -> list[dict]:
        return [f for _, f in r.xrange(events_key) if f["kind"] == kind]

    first = start_run(env, " ".join(common + ["token-budget=100000000"]))
    second = None
    try:
        wait_for(lambda: len([e for e in events("round-end") if int(e["tokens"]) > 0]) >= 2, 150,
                 "two rounds with training")
        for proc in wait_for(lambda: server_app_processes(flwr_home), 30, "the ServerApp process"):
            proc.send_signal(signal.SIGKILL)
        first.kill()  # the CLI only streams the dead run's log; the new run does not wait for it
        first.wait(timeout=60)
        pids_before = json.loads(events("round-end")[-1]["trainers"])
        checkpoint = global_state.load(global_state.latest(run_dir))
        assert checkpoint.round >= 2 and checkpoint.tokens > 0
        assert checkpoint.outer_state, "the outer optimizer's momentum is part of the global state"

        second = start_run(env, " ".join(common + [f"token-budget={checkpoint.tokens + 6 * 1024}"]))
        output, _ = second.communicate(timeout=180)
        assert second.returncode == 0, output
        assert "finished outcome=horizon" in output, output
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
        stop_local_superlink(flwr_home)

    resume = events("resume")
    assert len(resume) == 1
    assert f"round {checkpoint.round}, {checkpoint.tokens} tokens" in resume[0]["detail"]
    after = [e for e in events("round-start") if float(e["wall_ts"]) > float(resume[0]["wall_ts"])]
    assert int(after[0]["round"]) == checkpoint.round + 1, "the new server goes on from the checkpoint's round"
    # the ledger the new server started from is the checkpoint's (nothing reset, nothing lost)
    assert checkpoint.info["ledger"], "checkpoints carry the ledger"
    first_assignment = json.loads(after[0]["shards"])
    for site, shards in first_assignment.items():
        for shard in shards:
            assert not checkpoint.info["ledger"][shard]["done"], (site, shard)
    # the trainers outlived the server: the same processes served the new one
    pids_after = json.loads(events("round-end")[-1]["trainers"])
    assert {s: p[0] for s, p in pids_after.items()} == {s: p[0] for s, p in pids_before.items()}
    assert all(pids_after[s][1] > pids_before[s][1] for s in pids_after), "step counters go on"
    final = global_state.load(global_state.latest(run_dir))
    assert final.tokens >= checkpoint.tokens + 6 * 1024 and final.round > checkpoint.round
    assert set(final.outer_state) == set(checkpoint.outer_state)
    release(r, run_dir)
    os.environ.pop(protocol.ORPHAN_TIMEOUT_ENV, None)
