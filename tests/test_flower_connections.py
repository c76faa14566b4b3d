"""The project's Flower connections (.flwr/config.toml) are what `flwr` uses, without the user's home."""

from __future__ import annotations

import contextlib
import shutil
import subprocess

import psutil

from pilot.coordination import free_port
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


def _stop_local_superlink(flwr_home) -> None:
    """`flwr run` leaves its local SuperLink running in the background: stop ours (and its children)."""
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(flwr_home) in part for part in proc.info["cmdline"] or []):
                for child in proc.children(recursive=True) + [proc]:
                    with contextlib.suppress(psutil.Error):
                        child.kill()


def test_a_simulation_run_identifies_every_site(tmp_path):
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    shutil.copy(PROJECT_ROOT / ".flwr" / "config.toml", flwr_home / "config.toml")
    env = subprocess_env(HOME=str(tmp_path), FLWR_HOME=str(flwr_home),
                         FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
                         FLWR_LOCAL_CONTROL_API_PORT=str(free_port()))
    try:
        result = subprocess.run([str(VENV_BIN / "flwr"), "run", ".", "local-simulation", "--stream"],
                                capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=240)
    finally:
        _stop_local_superlink(flwr_home)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "pilot: 3 site(s) connected: client_0, client_1, client_2" in output, output


def test_site_name_from_node_config():
    assert site_name({"name": "client_7", "partition-id": 0}) == "client_7"
    assert site_name({"partition-id": 2, "num-partitions": 3}) == "client_2"
    try:
        site_name({})
    except ValueError as error:
        assert "--node-config" in str(error)
    else:
        raise AssertionError("a node with no name and no partition must be refused")
