"""Shared fixtures: real servers on free ports, isolated per test session."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from pilot.coordination import find_redis_server, free_port

pytest_plugins = ["tests.fixtures_data"]  # real-text shards and a tokenizer, shared by data and training tests

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# runs that a test does not place itself land here, never in the user's ~/.cache/pilot
os.environ["PILOT_HOME"] = tempfile.mkdtemp(prefix="pilot-home-")
VENV_BIN = Path(sys.executable).parent  # flwr, flower-superlink, pilot live beside the interpreter
SLOW_ENV = "PILOT_SLOW_TESTS"   # =1: also the `slow` scenarios (each one's promise has a faster test in CI)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`slow` scenarios are skipped, saying how to run them, unless PILOT_SLOW_TESTS=1."""
    if os.environ.get(SLOW_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"slow scenario: {SLOW_ENV}=1 runs it (the full suite, before a release)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@dataclass
class RedisServer:
    port: int
    password: str
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server of its own, password-protected, on a free loopback port, for the session."""
    data_dir = tmp_path_factory.mktemp("redis")
    password = secrets.token_hex(8)
    port = free_port()
    process = subprocess.Popen(
        [find_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--requirepass", password,
         "--dir", str(data_dir), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port, password, process)
    client = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise
            time.sleep(0.05)
    yield server
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the session's server, on an empty database."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child process of the test: this venv first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    env.update(extra)
    return env
