"""Elastic site provisioning: a site's compute comes up when its curtailment window opens and goes away
when it closes.

    provisioner = LocalProvisioner(sites, superlink="127.0.0.1:8000", run_id=RUN, redis_client=r, log_dir=DIR)
    controller = ProvisionController(provisioner, [s.name for s in sites], on_event=report)
    controller.reconcile(curtailed)     # every server-loop tick (returns at once; the work runs on threads)
    controller.close()                  # at the end: every site down, nothing left running

A `Provisioner` does one thing to one site and blocks until it is done: `open_site` (the site's SuperNode
is connected to the SuperLink), `close_site` (its SuperNode, site trainer and every process they started
are gone), `status`. The `ProvisionController` decides what to do: it compares the sites that should be up
(the curtailed ones; the energy policy's hysteresis is already in Redis' `curtailed`) with what is up,
runs opens and closes of several sites in parallel on threads, cancels an open whose window closed
meanwhile, retries a failure (an error, a node that does not come up in time) with exponential back-off,
reports every step through `on_event(kind, fields)`, and never raises into its caller.

    python -m pilot.provision local --sites client_0:2,client_1:2,client_2:2 --superlink 127.0.0.1:8000 \\
        --run-id demo --insecure        # SuperNodes on this host, following the run's energy state
    python -m pilot.provision render --sites deploy/kubernetes/sites.toml --out deploy/kubernetes/rendered
    python -m pilot.provision validate deploy/kubernetes/rendered

`render` and `validate` are the Kubernetes path (pilot/provision_kubernetes.py); docs/provisioning.md has
every command for both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
import redis

from pilot import coordination, protocol

# ------------------------------------------------------------------ settings
OPEN_TIMEOUT_S = 300.0      # a node that is not connected this long after its start has failed
CLOSE_TIMEOUT_S = 120.0     # a close that takes longer has failed (it is retried)
BACKOFF_BASE_S = 5.0        # first retry after a failure; doubles with each further failure
BACKOFF_MAX_S = 300.0
HEALTH_INTERVAL_S = 10.0    # how often an open site is checked (a crashed node is reopened)
MAX_PARALLEL = 8            # sites provisioned at the same time
DRAIN_TIMEOUT_S = 60.0      # a closing site's trainer may finish its step and hand in its work this long
STOP_TIMEOUT_S = 10.0       # a process asked to exit gets this long before SIGKILL
READY_MARKER = b"SuperNode ID:"  # what flower-supernode logs once the SuperLink has accepted it (Flower 1.41)
SITE_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,38}[A-Za-z0-9])?$")

# a site's state, as the controller sees it
DOWN, OPENING, UP, CLOSING = "down", "opening", "up", "closing"
# what the controller does next to a site
OPEN, CLOSE, CHECK = "open", "close", "check"


class ProvisionError(RuntimeError):
    """A site could not be opened or closed (the controller retries it)."""


class ProvisionCancelled(ProvisionError):
    """An open was given up because the site's window closed meanwhile."""


class SiteSpecError(ValueError):
    """A bad site list: says which site, which key, what was expected."""


# ------------------------------------------------------------------ sites
@dataclass(frozen=True)
class SiteSpec:
    """One GPU site: its name (the SuperNode's node-config name), its data partition and its GPUs."""

    name: str
    partition_id: int
    gpus: int = 0                                   # GPUs of the site (0: CPU)
    gpu_ids: tuple[int, ...] = ()                   # local provisioner: which of this host's GPUs
    node_selector: dict[str, str] = field(default_factory=dict)   # Kubernetes: where the site's pod may run

    @property
    def k8s_name(self) -> str:
        """The site's name as a Kubernetes object name (DNS label: lower case, '-' for '_')."""
        return self.name.lower().replace("_", "-")


SITE_KEYS = {"name", "gpus", "gpu_ids", "node_selector", "partition_id"}


def site_from_table(table: dict[str, Any], index: int, where: str) -> SiteSpec:
    """A SiteSpec from one `[[sites]]` table (or inline entry); every mistake names the site and the key."""
    unknown = sorted(set(table) - SITE_KEYS)
    if unknown:
        raise SiteSpecError(f"{where}: unknown key(s) {unknown}; known: {sorted(SITE_KEYS)}")
    name = table.get("name")
    if not isinstance(name, str) or not SITE_NAME.match(name):
        raise SiteSpecError(f"{where}: name must be 1-40 letters, digits, '_' or '-' (starting and ending with a "
                            f"letter or digit), got {name!r}")
    where = f"{where} ({name})"
    gpu_ids = table.get("gpu_ids", [])
    if not isinstance(gpu_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                for i in gpu_ids):
        raise SiteSpecError(f"{where}: gpu_ids must be a list of GPU indices >= 0, got {gpu_ids!r}")
    if len(set(gpu_ids)) != len(gpu_ids):
        raise SiteSpecError(f"{where}: gpu_ids lists a GPU twice: {gpu_ids}")
    gpus = table.get("gpus", len(gpu_ids))
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
        raise SiteSpecError(f"{where}: gpus must be a whole number >= 0, got {gpus!r}")
    if gpu_ids and len(gpu_ids) != gpus:
        raise SiteSpecError(f"{where}: gpus = {gpus} but gpu_ids has {len(gpu_ids)} entries")
    selector = table.get("node_selector", {})
    if not isinstance(selector, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in selector.items()):
        raise SiteSpecError(f"{where}: node_selector must be a table of strings, got {selector!r}")
    partition = table.get("partition_id", index)
    if not isinstance(partition, int) or isinstance(partition, bool) or partition < 0:
        raise SiteSpecError(f"{where}: partition_id must be a whole number >= 0, got {partition!r}")
    return SiteSpec(name, partition, gpus, tuple(gpu_ids), dict(selector))


def check_sites(sites: Sequence[SiteSpec], where: str) -> list[SiteSpec]:
    """No two sites share a name, a Kubernetes name or a GPU."""
    if not sites:
        raise SiteSpecError(f"{where}: no sites")
    seen: dict[str, str] = {}
    gpu_owner: dict[int, str] = {}
    for site in sites:
        if site.k8s_name in seen:
            raise SiteSpecError(f"{where}: sites {seen[site.k8s_name]!r} and {site.name!r} have the same name "
                                f"once written as a Kubernetes name ({site.k8s_name!r})")
        seen[site.k8s_name] = site.name
        for gpu in site.gpu_ids:
            if gpu in gpu_owner:
                raise SiteSpecError(f"{where}: GPU {gpu} is given to both {gpu_owner[gpu]!r} and {site.name!r}")
            gpu_owner[gpu] = site.name
    return list(sites)


def parse_sites(text: str) -> list[SiteSpec]:
    """`client_0:2,client_1:2,client_2` (name[:GPU count], comma-separated) or the path of a sites TOML file."""
    if text.endswith(".toml") or Path(text).is_file():
        return load_sites(text)
    tables = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, gpus = item.partition(":")
        if gpus and not gpus.isdigit():
            raise SiteSpecError(f"--sites {item!r}: expected NAME or NAME:GPUS with GPUS a whole number")
        tables.append({"name": name, **({"gpus": int(gpus)} if gpus else {})})
    return check_sites([site_from_table(t, i, f"--sites entry {i + 1}") for i, t in enumerate(tables)], "--sites")


def load_sites(path: str | Path) -> list[SiteSpec]:
    """Sites from a TOML file of `[[sites]]` tables (keys: name, gpus, gpu_ids, node_selector, partition_id)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SiteSpecError(f"{path}: no such sites file") from None
    except tomllib.TOMLDecodeError as error:
        raise SiteSpecError(f"{path}: not valid TOML: {error}") from None
    unknown = sorted(set(data) - {"sites"})
    if unknown or not isinstance(data.get("sites"), list):
        raise SiteSpecError(f"{path}: expected only [[sites]] tables, found {sorted(data) or 'nothing'}")
    sites = [site_from_table(t, i, f"{path}: [[sites]] #{i + 1}") for i, t in enumerate(data["sites"])]
    return check_sites(sites, str(path))


def sites_toml(sites: Sequence[SiteSpec]) -> str:
    """The sites as a TOML file that `load_sites` reads back to the same specs."""
    def text(value: str) -> str:
        return json.dumps(value)   # a JSON string is a TOML basic string
    blocks = []
    for site in sites:
        lines = ["[[sites]]", f"name = {text(site.name)}", f"partition_id = {site.partition_id}", f"gpus = {site.gpus}"]
        if site.gpu_ids:
            lines.append(f"gpu_ids = [{', '.join(map(str, site.gpu_ids))}]")
        if site.node_selector:
            pairs = ", ".join(f"{text(k)} = {text(v)}" for k, v in site.node_selector.items())
            lines.append(f"node_selector = {{ {pairs} }}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def assign_gpu_sets(sites: Sequence[SiteSpec], first_gpu: int = 0) -> list[SiteSpec]:
    """Give each site without explicit gpu_ids the next `gpus` GPUs of the host, in site order
    (3 sites x 2 GPUs on an 8-GPU host: 0,1 / 2,3 / 4,5), skipping GPUs that another site names."""
    taken = {g for s in sites for g in s.gpu_ids}
    next_gpu, out = first_gpu, []
    for site in sites:
        if site.gpu_ids or site.gpus == 0:
            out.append(site)
            continue
        ids = []
        while len(ids) < site.gpus:
            if next_gpu not in taken:
                ids.append(next_gpu)
            next_gpu += 1
        out.append(SiteSpec(site.name, site.partition_id, site.gpus, tuple(ids), site.node_selector))
    return out


# ------------------------------------------------------------------ the interface
class Provisioner(Protocol):
    """Brings one site's compute up or down; each call blocks until done and raises ProvisionError if not."""

    def open_site(self, site: str, *, timeout_s: float = OPEN_TIMEOUT_S,
                  cancel: threading.Event | None = None) -> None: ...

    def close_site(self, site: str, *, timeout_s: float = CLOSE_TIMEOUT_S) -> None: ...

    def status(self, site: str) -> str: ...   # "up", "starting" or "down"


# ------------------------------------------------------------------ policy (pure)
@dataclass(frozen=True)
class RetryPolicy:
    open_timeout_s: float = OPEN_TIMEOUT_S
    close_timeout_s: float = CLOSE_TIMEOUT_S
    backoff_base_s: float = BACKOFF_BASE_S
    backoff_max_s: float = BACKOFF_MAX_S
    health_interval_s: float = HEALTH_INTERVAL_S


def backoff_delay(failures: int, base_s: float = BACKOFF_BASE_S, max_s: float = BACKOFF_MAX_S) -> float:
    """Seconds to wait before the next try after `failures` failures in a row: base, 2 base, 4 base, ..., max."""
    if failures <= 0:
        return 0.0
    return min(max_s, base_s * 2.0 ** min(failures - 1, 60))


def next_action(desired_up: bool, actual: str, now: float, retry_at: float, check_at: float) -> str | None:
    """What to do to a site: open it, close it, check that it is still up, or nothing (an operation is
    running, or a failed one waits for its back-off)."""
    if actual in (OPENING, CLOSING) or now < retry_at:
        return None
    if desired_up and actual == DOWN:
        return OPEN
    if not desired_up and actual == UP:
        return CLOSE
    if desired_up and actual == UP and now >= check_at:
        return CHECK
    return None


@dataclass
class SiteState:
    actual: str = DOWN
    failures: int = 0           # failed operations in a row (reset by a success or a change of window)
    retry_at: float = 0.0       # monotonic time before which nothing is tried again
    check_at: float = 0.0       # monotonic time of the next health check of an open site
    cancel: threading.Event | None = None


# ------------------------------------------------------------------ the controller
EventSink = Callable[[str, dict[str, Any]], None]


class ProvisionController:
    """Keeps the sites that should be up (curtailed) up and the others down; see the module docstring."""

    def __init__(self, provisioner: Provisioner, sites: Iterable[str], *, on_event: EventSink | None = None,
                 policy: RetryPolicy | None = None, max_parallel: int = MAX_PARALLEL):
        self.provisioner = provisioner
        self.policy = policy or RetryPolicy()
        self.on_event = on_event
        self.sites = {name: SiteState() for name in sites}
        self.desired: set[str] = set()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=max(1, max_parallel), thread_name_prefix="provision")
        self.timers: list[threading.Timer] = []
        self.closed = False

    # -------------------------------------------------------------- the caller's side
    def reconcile(self, curtailed: Iterable[str]) -> None:
        """Make the sites in `curtailed` come up and the others go down. Returns at once; never raises."""
        try:
            with self.lock:
                if self.closed:
                    return
                desired = set(curtailed) & set(self.sites)
                for name in desired ^ self.desired:   # a window opened or closed: a fresh start, no back-off
                    state = self.sites[name]
                    state.failures, state.retry_at = 0, 0.0
                    if state.actual == OPENING and name not in desired and state.cancel is not None:
                        state.cancel.set()            # its window closed while it was coming up
                self.desired = desired
                self._act()
        except Exception as error:  # noqa: BLE001 - the server loop must not die of provisioning
            self._report("provision-error", error=repr(error))

    def states(self) -> dict[str, str]:
        with self.lock:
            return {name: state.actual for name, state in self.sites.items()}

    def settled(self) -> bool:
        """No operation running and every site as wanted."""
        with self.lock:
            return all(s.actual == (UP if n in self.desired else DOWN) for n, s in self.sites.items())

    def close(self, timeout_s: float | None = None) -> bool:
        """Bring every site down (retrying failures) and stop the threads; True if all went down in time."""
        timeout_s = self.policy.close_timeout_s * 2 if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        self.reconcile(())
        while not self.settled() and time.monotonic() < deadline:
            self.reconcile(())
            time.sleep(0.1)
        done = self.settled()
        with self.lock:
            self.closed = True
            for timer in self.timers:
                timer.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        if not done:
            self._report("provision-error", error=f"sites still up after {timeout_s:.0f} s: "
                         f"{sorted(n for n, s in self.states().items() if s != DOWN)}")
        return done

    # -------------------------------------------------------------- the work
    def _act(self) -> None:
        """Start what each site needs now (called with the lock held)."""
        now = time.monotonic()
        for name, state in self.sites.items():
            action = next_action(name in self.desired, state.actual, now, state.retry_at, state.check_at)
            if action == OPEN:
                state.actual, state.cancel = OPENING, threading.Event()
                self.pool.submit(self._run, name, OPEN, state.failures + 1, state.cancel)
            elif action == CLOSE:
                state.actual, state.cancel = CLOSING, None
                self.pool.submit(self._run, name, CLOSE, state.failures + 1, None)
            elif action == CHECK:
                state.check_at = now + self.policy.health_interval_s
                self.pool.submit(self._check, name)

    def _run(self, name: str, op: str, attempt: int, cancel: threading.Event | None) -> None:
        self._report("provision-start", site=name, op=op, attempt=attempt)
        started = time.monotonic()
        error: Exception | None = None
        try:
            if op == OPEN:
                self.provisioner.open_site(name, timeout_s=self.policy.open_timeout_s, cancel=cancel)
            else:
                self.provisioner.close_site(name, timeout_s=self.policy.close_timeout_s)
        except Exception as caught:  # noqa: BLE001 - every failure is reported and retried, none escapes
            error = caught
        seconds = round(time.monotonic() - started, 3)
        retry_in = 0.0
        with self.lock:
            state = self.sites[name]
            if error is None:
                state.actual = UP if op == OPEN else DOWN
                state.failures, state.retry_at = 0, 0.0
                state.check_at = time.monotonic() + self.policy.health_interval_s
            elif isinstance(error, ProvisionCancelled):
                state.actual = DOWN
            else:
                state.actual = DOWN if op == OPEN else UP   # a failed open cleans up; a failed close is retried
                state.failures += 1
                retry_in = backoff_delay(state.failures, self.policy.backoff_base_s, self.policy.backoff_max_s)
                state.retry_at = time.monotonic() + retry_in
        if error is None:
            self._report("provision-done", site=name, op=op, attempt=attempt, seconds=seconds)
            if op == OPEN:   # its health checks come due even if nobody calls reconcile meanwhile
                self._kick_later(self.policy.health_interval_s)
        elif isinstance(error, ProvisionCancelled):
            self._report("provision-cancelled", site=name, op=op, seconds=seconds)
        else:
            self._report("provision-failed", site=name, op=op, attempt=attempt, seconds=seconds,
                         retry_in=round(retry_in, 3), error=f"{type(error).__name__}: {error}"[:500])
            self._kick_later(retry_in)
        self._kick()

    def _check(self, name: str) -> None:
        try:
            status = self.provisioner.status(name)
        except Exception as error:  # noqa: BLE001 - a check that fails says nothing: try again later
            self._report("provision-error", site=name, error=f"status: {error!r}"[:500])
            self._kick_later(self.policy.health_interval_s)
            return
        lost = False
        with self.lock:
            state = self.sites[name]
            if state.actual == UP and status == "down":
                state.actual, lost = DOWN, True
        if lost:
            self._report("provision-lost", site=name)
            self._kick()
        else:
            self._kick_later(self.policy.health_interval_s)

    def _kick(self) -> None:
        try:
            with self.lock:
                if not self.closed:
                    self._act()
        except Exception as error:  # noqa: BLE001 - runs on worker and timer threads: report, never raise
            self._report("provision-error", error=repr(error))

    def _kick_later(self, delay_s: float) -> None:
        with self.lock:
            if self.closed:
                return
            self.timers = [t for t in self.timers if t.is_alive()]
            timer = threading.Timer(delay_s + 0.01, self._kick)
            timer.daemon = True
            self.timers.append(timer)
            timer.start()

    def _report(self, kind: str, **fields: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(kind, fields)
        except Exception:  # noqa: BLE001, S110 - a broken event sink must not stop provisioning
            pass


def follow_energy(controller: ProvisionController, client: redis.Redis, run_id: str,
                  stop: threading.Event, poll_s: float = 1.0) -> None:
    """Drive `controller` from the run's energy state in Redis until `stop` is set: reconcile with the
    curtailed sites at every energy event (XREAD wakes up at once) and at least every `poll_s`."""
    from pilot.energy.events import EnergyEvents, stream_key  # the energy package is not needed otherwise

    events = EnergyEvents(client, run_id, consumer="provisioner")
    last = client.xrevrange(stream_key(run_id), count=1)
    after = last[0][0] if last else "0-0"
    while not stop.is_set():
        try:
            news = events.read(after_id=after, block_ms=int(poll_s * 1000))
            if news:
                after = news[-1].id
            controller.reconcile(events.curtailed_sites())
        except redis.RedisError:  # Redis restarting: keep the sites as they are, try again
            stop.wait(poll_s)


def drain_trainer(client: redis.Redis, run_id: str, site: str, timeout_s: float) -> None:
    """Give a site trainer in the middle of a round up to `timeout_s` to stop at a step boundary and hand in
    its work before its compute goes away (it stops by itself when its window closes: pilot/site_trainer.py)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = client.hget(protocol.trainer_key(run_id, site), "status")
            if status != "training" or not client.exists(protocol.alive_key(run_id, site)):
                return
        except redis.RedisError:
            return
        time.sleep(0.2)


# ------------------------------------------------------------------ the server's side: run settings
SETTING_DEFAULTS: dict[str, Any] = {
    "provisioner": "none", "provision-sites": "", "provision-superlink": "127.0.0.1:8000",
    "provision-startup-delay": 0.0, "provision-open-timeout": OPEN_TIMEOUT_S, "provision-backoff": BACKOFF_BASE_S,
    "provision-root-certificates": "", "provision-auth-key-dir": "", "provision-namespace": "pilot",
    "provision-health-interval": HEALTH_INTERVAL_S,
}


class Provisioning:
    """A controller with its provisioner, driven for one run: by the run's energy state (a thread of its
    own, on its own Redis connection), or, with curtailment "always", every site up for the whole run."""

    def __init__(self, controller: ProvisionController, provisioner: Provisioner, redis_url: str, run_id: str,
                 follow: bool):
        self.controller, self.provisioner = controller, provisioner
        self.stop = threading.Event()
        self.client = coordination.client_from_url(redis_url) if follow else None
        self.thread = None
        if self.client is not None:
            self.thread = threading.Thread(target=follow_energy, args=(controller, self.client, run_id, self.stop),
                                           name="provision-follow", daemon=True)
            self.thread.start()
        else:
            controller.reconcile(controller.sites)

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop following, bring every site down; True if all went down. Never raises."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        done = self.controller.close(timeout_s)
        if isinstance(self.provisioner, LocalProvisioner):
            try:  # the last sweep: whatever a failed close left on this host
                self.provisioner.close()
            except Exception:  # noqa: BLE001 - closing must not raise into the server's shutdown
                done = False
        if self.client is not None:
            self.client.close()
        return done


def start_provisioning(cfg: dict[str, Any], redis_url: str, run_id: str, run_dir: str | Path,
                       on_event: EventSink | None = None, env: dict[str, str] | None = None) -> Provisioning | None:
    """The provisioning of a run from its settings (keys of SETTING_DEFAULTS; missing ones take the default),
    started; None with provisioner "none". Bad settings raise SiteSpecError / ValueError (at start-up, not
    later in the loop)."""
    get = lambda key: cfg.get(key, SETTING_DEFAULTS[key])  # noqa: E731
    kind = str(get("provisioner"))
    if kind == "none":
        return None
    if kind not in ("local", "kubernetes"):
        raise ValueError(f'provisioner must be "none", "local" or "kubernetes", got {kind!r}')
    if not get("provision-sites"):
        raise SiteSpecError('provision-sites is empty: name the sites, e.g. "client_0:2,client_1:2,client_2:2"')
    sites = parse_sites(str(get("provision-sites")))
    client = coordination.client_from_url(redis_url)
    provisioner: Provisioner
    if kind == "local":
        root = str(get("provision-root-certificates")) or None
        provisioner = LocalProvisioner(assign_gpu_sets(sites), str(get("provision-superlink")),
                                       log_dir=Path(run_dir) / "provision", run_id=run_id, redis_client=client,
                                       startup_delay_s=float(get("provision-startup-delay")), root_certificates=root,
                                       auth_key_dir=str(get("provision-auth-key-dir")) or None, env=env)
        if root is None and on_event is not None:
            on_event("provision-warning", {"detail": "SuperNodes start --insecure: no TLS, no authentication"})
    else:
        from pilot.provision_kubernetes import KubernetesProvisioner
        provisioner = KubernetesProvisioner(sites, str(get("provision-namespace")), run_id=run_id, redis_client=client)
    policy = RetryPolicy(open_timeout_s=float(get("provision-open-timeout")),
                         backoff_base_s=float(get("provision-backoff")),
                         health_interval_s=float(get("provision-health-interval")))
    controller = ProvisionController(provisioner, [s.name for s in sites], on_event=on_event, policy=policy)
    return Provisioning(controller, provisioner, redis_url, run_id, follow=cfg.get("curtailment") != "always")


# ------------------------------------------------------------------ processes
def is_trainer_of(cmdline: Sequence[str], site: str, run_id: str) -> bool:
    """Whether a command line is a site trainer of `site` in run `run_id` (plain, torchrun or one of its ranks)."""
    def value(flag: str) -> str | None:
        for i, arg in enumerate(cmdline):
            if arg == flag and i + 1 < len(cmdline):
                return cmdline[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
        return None
    return "pilot.site_trainer" in cmdline and value("--site") == site and value("--run-id") == run_id


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


@dataclass
class LocalNode:
    process: subprocess.Popen
    log_path: Path
    log_offset: int
    port: int
    ready: bool = False
    known: list[psutil.Process] = field(default_factory=list)   # its family when it came up (psutil checks
                                                                # a PID's start time: no PID-reuse mistakes)


class LocalProvisioner:
    """Each site is a `flower-supernode` process on this host (its own process group, its own ClientAppIo
    port, `CUDA_VISIBLE_DEVICES` = the site's GPU set, empty for CPU). Closing a site lets its trainer hand
    in its work, asks it to shut down (inbox "shutdown"), and stops the SuperNode, the trainer and every
    process either started (SIGTERM, then SIGKILL): nothing outlives the window."""

    def __init__(self, sites: Sequence[SiteSpec], superlink: str, *, log_dir: str | Path, run_id: str = "",
                 redis_client: redis.Redis | None = None, startup_delay_s: float = 0.0,
                 root_certificates: str | Path | None = None, auth_key_dir: str | Path | None = None,
                 supernode: Sequence[str] = ("flower-supernode",), env: dict[str, str] | None = None,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S, stop_timeout_s: float = STOP_TIMEOUT_S):
        self.sites = {s.name: s for s in check_sites(list(sites), "LocalProvisioner")}
        self.superlink = superlink
        self.log_dir = Path(log_dir)
        self.run_id = run_id
        self.r = redis_client
        self.startup_delay_s = startup_delay_s
        self.root_certificates = Path(root_certificates) if root_certificates else None
        self.auth_key_dir = Path(auth_key_dir) if auth_key_dir else None
        self.supernode = list(supernode)
        self.env = env
        self.drain_timeout_s = drain_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.nodes: dict[str, LocalNode] = {}
        self.lock = threading.Lock()

    # -------------------------------------------------------------- pure parts
    def command(self, site: str, port: int) -> list[str]:
        """The site's SuperNode command line (the seed's --node-config form, its own ClientAppIo port)."""
        spec = self.sites[site]
        if self.root_certificates is None:
            security = ["--insecure"]
        else:
            security = ["--root-certificates", str(self.root_certificates)]
            if self.auth_key_dir is not None:
                security += ["--auth-supernode-private-key", str(self.auth_key_dir / site)]
        return [*self.supernode, *security, "--superlink", self.superlink, "--port", str(port),
                "--node-config", f'name="{site}" partition-id={spec.partition_id}']

    def environment(self, site: str) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in self.sites[site].gpu_ids)   # "": no GPU (CPU)
        binary = shutil.which(self.supernode[0], path=env.get("PATH"))
        if binary:  # the SuperNode starts flower-superexec by name: it must find it beside itself
            env["PATH"] = os.pathsep.join([str(Path(binary).parent), env.get("PATH", "")])
        return env

    # -------------------------------------------------------------- the interface
    def open_site(self, site: str, *, timeout_s: float = OPEN_TIMEOUT_S,
                  cancel: threading.Event | None = None) -> None:
        if site not in self.sites:
            raise ProvisionError(f"unknown site {site!r}; known: {sorted(self.sites)}")
        cancel = cancel or threading.Event()
        with self.lock:
            node = self.nodes.get(site)
            if node is not None and node.process.poll() is None and node.ready:
                return
        if node is not None:
            self._stop_node(site)
        if cancel.wait(self.startup_delay_s):   # models a real machine's boot; a closed window stops the wait
            raise ProvisionCancelled(f"{site}: window closed before the node started")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{site}.supernode.log"
        port = coordination.free_port()
        with open(log_path, "ab") as log:
            offset = log.tell()
            try:
                process = subprocess.Popen(self.command(site, port), stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=self.environment(site),
                                           start_new_session=True)
            except OSError as error:
                raise ProvisionError(f"{site}: cannot start {self.supernode[0]}: {error}") from None
        node = LocalNode(process, log_path, offset, port)
        with self.lock:
            self.nodes[site] = node
        deadline = time.monotonic() + timeout_s
        while True:
            if READY_MARKER in self._log_since(node):
                node.ready, node.known = True, family(process.pid)
                return
            code = process.poll()
            if code is not None:
                tail = self._log_since(node).decode(errors="replace").strip().splitlines()[-3:]
                self._stop_node(site)
                raise ProvisionError(f"{site}: SuperNode exited with code {code}: {' | '.join(tail) or 'no output'}")
            if cancel.is_set():
                self._stop_node(site)
                raise ProvisionCancelled(f"{site}: window closed while the node was starting")
            if time.monotonic() > deadline:
                self._stop_node(site)
                raise ProvisionError(f"{site}: SuperNode not connected to {self.superlink} after {timeout_s:g} s "
                                     f"(log: {log_path})")
            time.sleep(0.1)

    def close_site(self, site: str, *, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        if site not in self.sites:
            raise ProvisionError(f"unknown site {site!r}; known: {sorted(self.sites)}")
        if self.r is not None and self.run_id:
            drain_trainer(self.r, self.run_id, site, min(self.drain_timeout_s, timeout_s / 2))
        self._stop_node(site)        # first: no ClientApp of it can start a new trainer afterwards
        self._stop_trainer(site)
        left = [p.pid for p in self.trainer_processes(site)]
        if left:
            raise ProvisionError(f"{site}: trainer processes {left} survived SIGKILL")

    def status(self, site: str) -> str:
        with self.lock:
            node = self.nodes.get(site)
        if node is None or node.process.poll() is not None:
            return "down"
        return "up" if node.ready else "starting"

    def pids(self, site: str) -> list[int]:
        """The site's processes now: its SuperNode with everything it started, and its trainer processes."""
        with self.lock:
            node = self.nodes.get(site)
        procs = family(node.process.pid) if node is not None and node.process.poll() is None else []
        return sorted({p.pid for p in procs} | {p.pid for p in self.trainer_processes(site)})

    def close(self) -> None:
        """Stop every site (for a shell that exits without a controller)."""
        for site in self.sites:
            self.close_site(site)

    # -------------------------------------------------------------- internals
    def _log_since(self, node: LocalNode) -> bytes:
        with open(node.log_path, "rb") as log:
            log.seek(node.log_offset)
            return log.read()

    def _stop_node(self, site: str) -> None:
        with self.lock:
            node = self.nodes.pop(site, None)
        if node is None:
            return
        # its family now, and what it had started when it came up (children of a SuperNode that died are
        # nobody's children anymore)
        procs = {p.pid: p for p in [*node.known, *family(node.process.pid)] if alive(p)}
        stop_processes(list(procs.values()), self.stop_timeout_s)
        try:
            node.process.wait(timeout=5)    # reap it: no zombie left behind
        except subprocess.TimeoutExpired:
            pass

    def trainer_processes(self, site: str) -> list[psutil.Process]:
        """The site's trainer processes on this host: the pid it registered in Redis, and any process whose
        command line is this site's trainer (one still starting has registered nothing yet)."""
        if not self.run_id:
            return []
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if proc.info["cmdline"] and is_trainer_of(proc.info["cmdline"], site, self.run_id) and alive(proc):
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def _stop_trainer(self, site: str) -> None:
        procs = self.trainer_processes(site)
        if not procs:
            return
        families = {p.pid: p for proc in procs for p in family(proc.pid)}
        shutdown_id = None
        if self.r is not None:
            try:  # the trainer's own way out: it finishes cleanly and releases what it holds
                from pilot.client_app import shutdown_trainer
                shutdown_trainer(self.r, self.run_id, site)
                last = self.r.xrevrange(protocol.inbox_key(self.run_id, site), count=1)
                shutdown_id = last[0][0] if last and last[0][1].get("kind") == "shutdown" else None
            except redis.RedisError:
                pass
        deadline = time.monotonic() + self.stop_timeout_s
        while any(alive(p) for p in families.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        stop_processes([p for p in families.values() if alive(p)], self.stop_timeout_s)
        if self.r is not None:
            try:  # the trainer is gone: no stale shutdown for its successor, no alive key or launch lock of it
                if shutdown_id is not None:
                    self.r.xdel(protocol.inbox_key(self.run_id, site), shutdown_id)
                self.r.delete(protocol.alive_key(self.run_id, site),
                              coordination.key(self.run_id, "site", site, "launch"))   # pilot/client_app.py
            except redis.RedisError:
                pass


# ------------------------------------------------------------------ CLI
def print_event(kind: str, fields: dict[str, Any]) -> None:
    print(f"[provision {time.strftime('%H:%M:%S')}] {kind} " + " ".join(f"{k}={v}" for k, v in fields.items()),
          flush=True)


def follow_until_done(controller: ProvisionController, client: redis.Redis, run_id: str,
                      exit_when_finished: bool) -> bool:
    """Drive `controller` from the run's energy state until SIGTERM / Ctrl-C (or, with `exit_when_finished`,
    until the energy simulation has finished); then close every site. True if all went down."""
    from pilot.energy.events import EnergyEvents

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    follower = threading.Thread(target=follow_energy, args=(controller, client, run_id, stop), daemon=True)
    follower.start()
    events = EnergyEvents(client, run_id)
    finished_said = False
    try:
        while not stop.wait(1.0):
            clock = events.clock()
            if clock is not None and clock.status == "finished" and not finished_said:
                finished_said = True
                print("the energy simulation finished: every window is closed", flush=True)
                if exit_when_finished:
                    break
    except KeyboardInterrupt:
        pass
    stop.set()
    follower.join(timeout=5)
    return controller.close()


def cmd_local(args: argparse.Namespace) -> int:
    sites = assign_gpu_sets(parse_sites(args.sites), args.first_gpu)
    if args.insecure == bool(args.root_certificates):
        raise SiteSpecError("give either --root-certificates (TLS) or --insecure (local development only)")
    if args.insecure:
        print("WARNING: --insecure: SuperNodes connect WITHOUT TLS or authentication; local development only",
              file=sys.stderr)
    run_dir = Path(args.run_dir) if args.run_dir else coordination.default_run_dir(args.run_id)
    client = coordination.connect(args.redis_url or None, run_dir=run_dir, wait=True)
    provisioner = LocalProvisioner(sites, args.superlink, log_dir=run_dir / "provision", run_id=args.run_id,
                                   redis_client=client, startup_delay_s=args.startup_delay,
                                   root_certificates=args.root_certificates, auth_key_dir=args.auth_key_dir)
    policy = RetryPolicy(open_timeout_s=args.open_timeout, backoff_base_s=args.backoff)
    controller = ProvisionController(provisioner, [s.name for s in sites], on_event=print_event, policy=policy)
    for site in sites:
        print(f"site {site.name}: partition {site.partition_id}, CUDA_VISIBLE_DEVICES="
              f"{','.join(map(str, site.gpu_ids)) or '(none: CPU)'}, log {run_dir / 'provision'}/{site.name}.*")
    done = follow_until_done(controller, client, args.run_id, exit_when_finished=True)
    provisioner.close()   # whatever a failed close left behind
    coordination.release(client, run_dir)
    return 0 if done else 1


def cmd_kubernetes(args: argparse.Namespace) -> int:
    from pilot import provision_kubernetes as k8s
    sites = parse_sites(args.sites)
    client = coordination.connect(args.redis_url or None, run_dir=args.run_dir, wait=True)
    provisioner = k8s.KubernetesProvisioner(sites, args.namespace, kubeconfig=args.kubeconfig, context=args.context,
                                            run_id=args.run_id, redis_client=client)
    policy = RetryPolicy(open_timeout_s=args.open_timeout, backoff_base_s=args.backoff)
    controller = ProvisionController(provisioner, [s.name for s in sites], on_event=print_event, policy=policy)
    print(f"scaling {', '.join(k8s.statefulset_name(s) for s in sites)} in namespace {args.namespace} with the "
          f"energy state of run {args.run_id}", flush=True)
    done = follow_until_done(controller, client, args.run_id, exit_when_finished=args.exit_when_finished)
    return 0 if done else 1


def cmd_render(args: argparse.Namespace) -> int:
    from pilot import provision_kubernetes as k8s
    cluster = k8s.ClusterConfig(namespace=args.namespace, image=args.image, run_id=args.run_id,
                                secure=not args.insecure, storage_class=args.storage_class,
                                shared_storage=args.shared_storage, scenario=args.scenario)
    docs = k8s.render_manifests(parse_sites(args.sites), cluster)
    try:
        k8s.validate_manifests(docs, args.kubernetes_version)
    except ModuleNotFoundError:
        print("warning: not validated (pip install kubernetes-validate, or the dev extra)", file=sys.stderr)
    for path in k8s.write_manifests(docs, Path(args.out)):
        print(path)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from pilot import provision_kubernetes as k8s
    count = 0
    for path in args.paths:
        files = k8s.read_manifests(Path(path))
        k8s.validate_manifests(files, args.kubernetes_version)
        count += sum(len(docs) for docs in files.values())
    print(f"{count} manifests valid against the Kubernetes {args.kubernetes_version} schemas")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pilot.provision", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sites_help = ("sites: NAME[:GPUS],... (e.g. client_0:2,client_1:2,client_2:2) or a TOML file of [[sites]] "
                  "tables (keys: name, gpus, gpu_ids, node_selector, partition_id)")

    p = sub.add_parser("local", help="run SuperNodes on this host, opened and closed with the run's energy state")
    p.add_argument("--sites", required=True, help=sites_help)
    p.add_argument("--superlink", default="127.0.0.1:8000", help="SuperLink Fleet API address HOST:PORT")
    p.add_argument("--run-id", default=os.environ.get("PILOT_RUN_ID", "default"),
                   help="run whose energy state opens and closes the sites")
    p.add_argument("--run-dir", default=None, help="run directory (default: the run's under $PILOT_HOME/runs)")
    p.add_argument("--redis-url", default=None,
                   help=f"Redis of the run (default: ${coordination.REDIS_URL_ENV}, else the run's embedded server)")
    p.add_argument("--first-gpu", type=int, default=0, help="first GPU index given out to sites without gpu_ids")
    p.add_argument("--startup-delay", type=float, default=0.0,
                   help="seconds before a site's SuperNode starts, to model a real machine's provisioning")
    p.add_argument("--open-timeout", type=float, default=OPEN_TIMEOUT_S,
                   help="seconds a SuperNode may take to connect before the open counts as failed")
    p.add_argument("--backoff", type=float, default=BACKOFF_BASE_S, help="first retry delay after a failure (s)")
    p.add_argument("--root-certificates", default=None, help="CA certificate of the SuperLink (TLS), e.g. certs/ca.crt")
    p.add_argument("--auth-key-dir", default=None,
                   help="directory of the sites' private keys (file = site name), e.g. certs/sites")
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication: local development only")
    p.set_defaults(func=cmd_local)

    p = sub.add_parser("kubernetes", help="scale the sites' SuperNode StatefulSets with the run's energy state "
                                          "(kubectl: kubeconfig, or the pod's ServiceAccount in the cluster)")
    p.add_argument("--sites", required=True, help=sites_help)
    p.add_argument("--namespace", default="pilot")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: kubectl's own choice)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("--run-id", default=os.environ.get("PILOT_RUN_ID", "default"),
                   help="run whose energy state opens and closes the sites")
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--redis-url", default=None,
                   help=f"Redis of the run (default: ${coordination.REDIS_URL_ENV})")
    p.add_argument("--open-timeout", type=float, default=OPEN_TIMEOUT_S,
                   help="seconds a site's pod may take to be ready (image pull, GPU node scale-up)")
    p.add_argument("--backoff", type=float, default=BACKOFF_BASE_S, help="first retry delay after a failure (s)")
    p.add_argument("--exit-when-finished", action="store_true",
                   help="exit once the energy simulation has finished (default: keep running, as a Deployment)")
    p.set_defaults(func=cmd_kubernetes)

    p = sub.add_parser("render", help="render the Kubernetes manifests of a deployment (validated before written)")
    p.add_argument("--sites", required=True, help=sites_help)
    p.add_argument("--out", required=True, help="directory for the manifests (one YAML file per component)")
    p.add_argument("--namespace", default="pilot")
    p.add_argument("--image", default="pilot:latest", help="container image with this project installed")
    p.add_argument("--run-id", default="default")
    p.add_argument("--storage-class", default="", help="storage class of the shared ReadWriteMany volume")
    p.add_argument("--shared-storage", default="100Gi", help="size of the shared volume (data, runs)")
    p.add_argument("--scenario", default=None, help="energy scenario TOML to ship in a ConfigMap (default: the "
                                                    "packaged scenario)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication (not for clusters)")
    p.add_argument("--kubernetes-version", default="1.31", help="Kubernetes version whose schemas validate")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("validate", help="validate manifests (files or directories) against the Kubernetes schemas")
    p.add_argument("paths", nargs="+")
    p.add_argument("--kubernetes-version", default="1.31")
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SiteSpecError, ProvisionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
