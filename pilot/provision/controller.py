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

`render` and `validate` are the Kubernetes path (pilot/provision/kubernetes.py); docs/provisioning.md has
every command for both.
"""


from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from pilot.settings import BY_KEY

# ------------------------------------------------------------------ settings
OPEN_TIMEOUT_S = float(BY_KEY["provision-open-timeout"].default)   # a node not connected this long after its start has failed
CLOSE_TIMEOUT_S = 120.0     # a close that takes longer has failed (it is retried)
BACKOFF_BASE_S = float(BY_KEY["provision-backoff"].default)     # first retry after a failure; doubles with each further failure
BACKOFF_MAX_S = 300.0
HEALTH_INTERVAL_S = float(BY_KEY["provision-health-interval"].default)   # how often an open site is checked (a crashed node is reopened)
MAX_PARALLEL = 8            # sites provisioned at the same time
DRAIN_TIMEOUT_S = 60.0      # a closing site's trainer may finish its step and hand in its work this long
STOP_TIMEOUT_S = 10.0       # a process asked to exit gets this long before SIGKILL
READY_MARKER = b"SuperNode ID:"  # what flower-supernode logs once the SuperLink has accepted it (Flower 1.41)

# a site's state, as the controller sees it
DOWN, OPENING, UP, CLOSING = "down", "opening", "up", "closing"
# what the controller does next to a site
OPEN, CLOSE, CHECK = "open", "close", "check"


class ProvisionError(RuntimeError):
    """A site could not be opened or closed (the controller retries it)."""


class ProvisionCancelled(ProvisionError):
    """An open was given up because the site's window closed meanwhile."""


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


