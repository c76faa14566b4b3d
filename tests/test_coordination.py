"""The coordination plane: a configured Redis from a URL, and the embedded server of a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import redis

from pilot import coordination
from pilot.coordination import EmbeddedRedis, RedisUnavailable, connect, free_port
from tests.conftest import subprocess_env


def test_connect_to_configured_url_with_password_and_db(redis_server):
    url = f"redis://:{redis_server.password}@127.0.0.1:{redis_server.port}/3"
    client = connect(url)
    client.set("pilot-test", "x")
    assert client.connection_pool.connection_kwargs["db"] == 3
    assert redis.Redis.from_url(url).get("pilot-test") == b"x"


def test_url_from_environment(redis_server, monkeypatch, tmp_path):
    monkeypatch.setenv(coordination.REDIS_URL_ENV, redis_server.url)
    client = connect(run_dir=tmp_path)
    assert client.connection_pool.connection_kwargs["port"] == redis_server.port
    assert not (tmp_path / "redis").exists(), "a configured URL must not start an embedded server"


def test_wrong_password_is_a_clear_error(redis_server):
    with pytest.raises(RedisUnavailable) as info:
        connect(f"redis://:not-the-password@127.0.0.1:{redis_server.port}/0")
    message = str(info.value)
    assert f"127.0.0.1:{redis_server.port}" in message
    assert "refused the password" in message
    assert "not-the-password" not in message, "the password must never be printed"


def test_missing_password_is_a_clear_error(redis_server):
    with pytest.raises(RedisUnavailable, match="requires a password"):
        connect(f"redis://127.0.0.1:{redis_server.port}/0")


def test_unreachable_server_names_host_and_port():
    port = free_port()  # nothing listens there
    with pytest.raises(RedisUnavailable) as info:
        connect(f"redis://:secret@127.0.0.1:{port}/0")
    assert f"Cannot reach Redis at 127.0.0.1:{port}" in str(info.value)
    assert "secret" not in str(info.value)


def test_not_a_redis_url():
    with pytest.raises(RedisUnavailable, match="Not a Redis URL"):
        connect("http://127.0.0.1:6379")


def test_redact_url():
    assert coordination.redact_url("rediss://user:pw@h:6380/2") == "rediss://user:***@h:6380/2"
    assert coordination.redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_keys_are_namespaced_per_run():
    assert coordination.key("r1", "site", "client_0") == "pilot:r1:site:client_0"
    assert coordination.key("r1", "x") != coordination.key("r2", "x")


# ------------------------------------------------------------------ the embedded server
# A child process joins the run's embedded server, counts itself in, waits until `expect` processes
# have, and lets go: the last one out must stop the server.
CHILD = textwrap.dedent("""
    import sys, time
    from pilot.coordination import connect, release
    run_dir, expect = sys.argv[1], int(sys.argv[2])
    r = connect(run_dir=run_dir)
    r.incr("joined")
    deadline = time.monotonic() + 30
    while int(r.get("joined")) < expect:
        assert time.monotonic() < deadline, "the other process never joined the same server"
        time.sleep(0.05)
    print(r.connection_pool.connection_kwargs["port"], r.info("server")["process_id"], flush=True)
    release(r, run_dir)
""")


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_embedded_redis_serves_two_processes_then_stops_and_keeps_data(tmp_path):
    run_dir = tmp_path / "run"
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), "2"], stdout=subprocess.PIPE,
                                 text=True, env=subprocess_env()) for _ in range(2)]
    servers = [child.communicate(timeout=60)[0].split() for child in children]
    assert [child.returncode for child in children] == [0, 0]
    assert servers[0] == servers[1], "both processes must share one embedded server (port, pid)"

    assert not (run_dir / "redis" / "state.json").exists(), "the last process out must shut the server down"
    assert not _pid_alive(int(servers[0][1]))
    assert "ready to exit" in (run_dir / "redis" / "redis.log").read_text().lower()

    # A new server of the same run finds what was acknowledged before (append-only file in the run dir).
    again = connect(run_dir=run_dir)
    assert again.get("joined") == "2"
    assert coordination.release(again, run_dir) is True


def test_embedded_redis_outlives_a_crashed_user_but_not_the_last_one(tmp_path):
    run_dir = tmp_path / "run"
    with coordination.embedded_redis(run_dir) as url:
        state = json.loads((run_dir / "redis" / "state.json").read_text())
        assert url.startswith("redis://:") and f":{state['port']}/" in url
        assert oct((run_dir / "redis" / "state.json").stat().st_mode & 0o777) == "0o600"
        # a process that joins and is killed without letting go
        crasher = subprocess.Popen(
            [sys.executable, "-c", "import time; from pilot.coordination import connect; "
             f"r = connect(run_dir={str(run_dir)!r}); r.set('crasher', 1); print('up', flush=True); "
             "time.sleep(60)"], stdout=subprocess.PIPE, text=True, env=subprocess_env())
        assert crasher.stdout.readline().strip() == "up"
        observer = redis.Redis.from_url(url, decode_responses=True)  # unnamed: not counted as a user
        assert EmbeddedRedis(run_dir).users(observer) == {f"pilot-{os.getpid()}", f"pilot-{crasher.pid}"}
        os.kill(crasher.pid, signal.SIGKILL)
        crasher.wait()
        assert observer.get("crasher") == "1"
        deadline = time.monotonic() + 10
        while len(EmbeddedRedis(run_dir).users(observer)) != 1:  # the server notices the closed socket
            assert time.monotonic() < deadline
            time.sleep(0.05)
    # the holder let go last: the crashed process did not keep the server alive
    assert not (run_dir / "redis" / "state.json").exists()
    assert not _pid_alive(state["pid"])


def test_pilot_redis_start_status_stop(tmp_path):
    run_dir = str(tmp_path / "run")

    def pilot(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pilot.cli", *args, "--run-dir", run_dir],
                              capture_output=True, text=True, env=subprocess_env(), timeout=60)

    started = pilot("redis", "start")
    assert started.returncode == 0, started.stderr
    url = started.stdout.split(f"{coordination.REDIS_URL_ENV}=")[1].strip().strip("'")
    assert connect(url).ping()
    assert "running: pid" in pilot("redis", "status").stdout
    assert pilot("redis", "stop").stdout.strip() == "stopped"
    status = pilot("redis", "status")
    assert status.returncode == 1 and "not running" in status.stdout


def test_a_killed_embedded_server_comes_back_at_the_same_address_with_every_acknowledged_write(tmp_path):
    run_dir = tmp_path / "run"
    client = connect(run_dir=run_dir)
    state = EmbeddedRedis(run_dir).read_state()
    for i in range(200):
        client.xadd("log", {"i": i})  # acknowledged: fsynced to the append-only file before the reply
    os.kill(state.pid, signal.SIGKILL)
    restarted = threading.Timer(1.0, lambda: EmbeddedRedis(run_dir).ensure())
    restarted.start()
    # the client waits out the outage (retries with backoff) and finds everything on the restarted server
    assert client.xlen("log") == 200
    restarted.join()
    again = EmbeddedRedis(run_dir).read_state()
    assert again.pid != state.pid and (again.port, again.password) == (state.port, state.password)
    assert coordination.release(client, run_dir) is True


def test_release_leaves_a_configured_server_alone(redis_server, tmp_path):
    client = connect(redis_server.url)
    assert coordination.release(client, tmp_path) is False
    assert client.ping()
