"""The project's Flower connections (.flwr/config.toml) are what `flwr` uses, without the user's home."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess

import psutil

from pilot import protocol
from pilot.coordination import connect, free_port, release
from pilot.sites import site_name
from tests.conftest import PROJECT_ROOT, VENV_BIN, subprocess_env

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


def stop_local_superlink(flwr_home) -> None:
    """`flwr run` leaves its local SuperLink running in the background: stop ours (and its children)."""
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(flwr_home) in part for part in proc.info["cmdline"] or []):
                for child in proc.children(recursive=True) + [proc]:
                    with contextlib.suppress(psutil.Error):
                        child.kill()


def flwr_env_for(tmp_path) -> tuple:
    """An isolated Flower home (the shipped connections), its own local SuperLink ports, one thread a site."""
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    shutil.copy(PROJECT_ROOT / ".flwr" / "config.toml", flwr_home / "config.toml")
    env = subprocess_env(HOME=str(tmp_path), FLWR_HOME=str(flwr_home),
                         FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
                         FLWR_LOCAL_CONTROL_API_PORT=str(free_port()), PILOT_SITE_THREADS="1")
    return flwr_home, env


def run_simulation(tmp_path, run_config: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`flwr run . local-simulation` with an isolated Flower home and local SuperLink ports."""
    flwr_home, env = flwr_env_for(tmp_path)
    try:
        return subprocess.run([str(VENV_BIN / "flwr"), "run", ".", "local-simulation", "--stream",
                               "--run-config", run_config], capture_output=True, text=True, env=env,
                              cwd=PROJECT_ROOT, timeout=timeout)
    finally:
        stop_local_superlink(flwr_home)


def test_a_simulation_run_trains_every_site_with_persistent_trainers(tmp_path, text_shards, tiny_tokenizer):
    run_dir = tmp_path / "run"
    result = run_simulation(tmp_path, " ".join([
        'run-id="sim"', f'run-dir="{run_dir}"', f'data-dir="{text_shards}"', f'tokenizer-dir="{tiny_tokenizer}"',
        'curtailment="always"', "round-duration=6", "token-budget=24576", "depth=2", "max-seq-len=128",
        "device-batch-size=4", "total-batch-size=1024", "eval-tokens=2048"]))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "pilot: sites connected=client_0,client_1,client_2" in output, output
    assert "finished outcome=horizon" in output, output
    assert (run_dir / "final_model.safetensors").exists()

    # the run's event log survives in its embedded Redis (append-only file in the run dir)
    r = connect(run_dir=run_dir)
    try:
        ends = [f for _, f in r.xrange(protocol.server_events_key("sim")) if f["kind"] == "round-end"]
    finally:
        release(r, run_dir)
    assert len(ends) >= 2, ends
    assert all(e["regime"] == "federated" and e["sites"] == "client_0,client_1,client_2" for e in ends)
    trainers = [json.loads(e["trainers"]) for e in ends]
    for site in ("client_0", "client_1", "client_2"):
        pids = {t[site][0] for t in trainers}
        steps = [t[site][1] for t in trainers]
        assert len(pids) == 1, f"{site}'s trainer must be one process across rounds: {pids}"
        assert steps == sorted(steps) and steps[-1] > steps[0], f"{site}'s step counter must continue: {steps}"
    assert float(ends[-1]["val_bpb"]) < float(ends[0]["val_bpb"])


def test_site_name_from_node_config():
    assert site_name({"name": "client_7", "partition-id": 0}) == "client_7"
    assert site_name({"partition-id": 2, "num-partitions": 3}) == "client_2"
    try:
        site_name({})
    except ValueError as error:
        assert "--node-config" in str(error)
    else:
        raise AssertionError("a node with no name and no partition must be refused")
