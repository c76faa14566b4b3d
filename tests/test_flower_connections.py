"""The project's Flower connections (.flwr/config.toml) are what `flwr` uses, without the user's home."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from pilot import protocol
from pilot.coordination import EmbeddedRedis, connect, release
from pilot.ops.local import isolated_flwr_env, stop_local_superlink
from pilot.protocol import site_name
from tests.conftest import PROJECT_ROOT, VENV_BIN, subprocess_env

pytestmark = pytest.mark.e2e   # real Flower runs: minutes each (quick tier: -m 'not e2e')

CONNECTIONS = ("local-simulation", "local-simulation-gpu", "local-deployment")


def test_flwr_finds_the_shipped_connections_without_touching_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = subprocess_env(HOME=str(home))
    env.pop("FLWR_HOME", None)  # the venv itself must point flwr at the project (setup.sh)
    result = subprocess.run([str(VENV_BIN / "flwr"), "config", "ls"], capture_output=True, text=True,
                            env=env, cwd=PROJECT_ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(PROJECT_ROOT / ".flwr" / "config.toml") in result.stdout
    for name in CONNECTIONS:
        assert name in result.stdout
    assert list(home.iterdir()) == [], "flwr must not write to the user's home"


def flwr_env_for(tmp_path) -> tuple:
    """An isolated Flower home (the shipped connections), its own local SuperLink ports, one thread a site."""
    flwr_home = tmp_path / "flwr-home"
    env = isolated_flwr_env(flwr_home, subprocess_env(HOME=str(tmp_path)), PILOT_SITE_THREADS="1")
    return flwr_home, env


def test_a_simulation_run_trains_every_site_with_persistent_trainers(tmp_path, text_shards, tiny_tokenizer):
    """Three sites, every round: the same trainer processes throughout; Redis is killed and restarted
    mid-run, and the run carries on with nothing lost that was acknowledged."""
    run_dir = tmp_path / "run"
    r = connect(run_dir=run_dir)  # the run's embedded Redis, shared with the server and the sites
    events_key = protocol.server_events_key("sim")
    flwr_home, env = flwr_env_for(tmp_path)
    run_config = " ".join([
        'run-id="sim"', f'run-dir="{run_dir}"', f'data-dir="{text_shards}"', f'tokenizer-dir="{tiny_tokenizer}"',
        'curtailment="always"', "round-duration=2", "token-budget=98304", "depth=2", "max-seq-len=128",
        "device-batch-size=4", "total-batch-size=1024", "eval-tokens=2048"])
    server = subprocess.Popen([str(VENV_BIN / "flwr"), "run", ".", "local-simulation", "--stream", "--run-config",
                               run_config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=PROJECT_ROOT)
    try:
        deadline = time.monotonic() + 150
        while not [f for _, f in r.xrange(events_key) if f["kind"] == "round-end" and int(f["tokens"]) > 0]:
            assert time.monotonic() < deadline and server.poll() is None, "no round trained"
            time.sleep(0.2)
        before = r.xrange(events_key)
        os.kill(EmbeddedRedis(run_dir).read_state().pid, signal.SIGKILL)
        time.sleep(1.0)
        restarted = subprocess.run([str(VENV_BIN / "pilot"), "redis", "start", "--run-dir", str(run_dir)],
                                   capture_output=True, text=True, env=subprocess_env(), timeout=60)
        assert restarted.returncode == 0, restarted.stderr
        r.ping()  # this process uses the restarted server too (so it is not stopped under our feet at the end)
        output, _ = server.communicate(timeout=200)
    finally:
        if server.poll() is None:
            server.kill()
        stop_local_superlink(flwr_home)
    assert server.returncode == 0, output
    assert "pilot: sites connected=client_0,client_1,client_2" in output, output
    assert "finished outcome=horizon" in output, output
    assert (run_dir / "final_model.safetensors").exists()

    entries = r.xrange(events_key)
    assert entries[: len(before)] == before, "every event acknowledged before the restart is still there"
    release(r, run_dir)
    ends = [f for _, f in entries if f["kind"] == "round-end"]
    assert len(ends) >= 2 and int(ends[-1]["round"]) > int(before[-1][1].get("round", 0) or 0)
    # every round that trained, trained at all three sites (a request that reaches a trainer still starting
    # after its round was stopped trains no step: the first 2-second round may pass while the trainers load)
    trained = [e for e in ends if int(e["tokens"]) > 0]
    assert all(e["regime"] == "federated" and e["sites"] == "client_0,client_1,client_2" for e in trained)
    trainers = [json.loads(e["trainers"]) for e in ends]
    for site in ("client_0", "client_1", "client_2"):
        pids = {t[site][0] for t in trainers}
        steps = [t[site][1] for t in trainers]
        assert len(pids) == 1, f"{site}'s trainer must be one process across rounds: {pids}"
        assert steps == sorted(steps) and steps[-1] > steps[0], f"{site}'s step counter must continue: {steps}"
    assert float(trained[-1]["val_bpb"]) < float(trained[0]["val_bpb"])


def test_site_name_from_node_config():
    assert site_name({"name": "client_7", "partition-id": 0}) == "client_7"
    assert site_name({"partition-id": 2, "num-partitions": 3}) == "client_2"
    try:
        site_name({})
    except ValueError as error:
        assert "--node-config" in str(error)
    else:
        raise AssertionError("a node with no name and no partition must be refused")
