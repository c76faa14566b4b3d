"""Rank 0's helpers beside the training loop, each on its own thread, so that none of them delays a step.

    StopWatcher    raises the trainer's stop flag when the round's stop key appears, the site's window closes,
                   the curtailment signal goes stale, Redis does not answer for SIGNAL_FRESH_S, the server that
                   asked was replaced, or the server has been gone too long
    Heartbeat      keeps the site's alive key fresh and its trainer hash current
    MetricsPusher  sends every optimizer step's figures to the site's metrics stream
"""

from __future__ import annotations

import os
import socket
import threading
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from nanochat.trainer import Trainer
from pilot import protocol
from pilot.energy import events as energy_events
from pilot.energy.events import SimClock

STOP_POLL_S = 0.05        # how often rank 0 looks at the stop key and the site's energy state
RECENT_CLEAR_S = 1.0      # a watcher's clear reading this recent stands for one taken now (recent_clear)
READ_TIMEOUT_S = 1.0      # a watcher read with no answer within this fails (a frozen Redis never answers)
# Without a successful read for this long the site stops at its next step boundary: no fresh signal (stop key,
# window, server) means no permission to train. The same bound as a stale energy signal (events.SIGNAL_FRESH_S).
SIGNAL_FRESH_S = energy_events.SIGNAL_FRESH_S

# what a client needs to reach the same server as another (the rest of a pool's kwargs is redis-py's own state)
_CONNECTION_KEYS = {"host", "port", "db", "username", "password", "path", "decode_responses", "encoding",
                    "encoding_errors", "client_name"}


def log(*parts: object) -> None:
    print(f"[site-trainer {time.strftime('%H:%M:%S')}]", *parts, flush=True)


def fail_fast_client(client: redis.Redis, timeout: float = READ_TIMEOUT_S) -> redis.Redis:
    """A client of the same server (address, credentials, TLS) whose commands fail within `timeout` instead of
    being retried for a minute (coordination's clients ride out outages; a watcher must see them)."""
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k in _CONNECTION_KEYS or k.startswith("ssl")}
    kwargs.update(socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))


def stop_reason(*, stop: str | None, curtailed: str | None, clock: SimClock | None, wall_now: float,
                server: str | None, own_server: str, server_gone_s: float, orphan_timeout: float) -> str | None:
    """Why the site must stop now, from one reading of Redis, or None to go on. Pure.

    A run with no energy clock (curtailment "always") is not governed by energy; one with a clock is, and a clock
    that is not fresh (events.staleness) stops the site like a closed window."""
    if stop is not None:
        return stop
    if clock is not None and (stale := energy_events.staleness(clock, wall_now)) is not None:
        return f"no fresh curtailment signal: {stale}"
    if curtailed == "0":
        return "window closed"
    if server is not None and server != own_server:
        return "the server that asked for this round was replaced"
    if server_gone_s > orphan_timeout:
        return "no server"
    return None


class StopWatcher:
    """Raises `trainer.request_stop()` when the round's stop key appears, the site's window closes, the
    curtailment signal goes stale, or Redis has not answered for SIGNAL_FRESH_S (see `stop_reason`)."""

    def __init__(self, client: redis.Redis, run: str, site: str, trainer: Trainer,
                 fresh_s: float = SIGNAL_FRESH_S):
        self.r, self.run, self.site, self.trainer = fail_fast_client(client), run, site, trainer
        self.fresh_s = fresh_s
        self.round: int | None = None
        self.server_id = ""
        self.reason = ""
        # a round ends sooner than the trainer exits: its work is handed in, the process stays warm
        self.orphan_timeout = min(protocol.ROUND_ORPHAN_S,
                                  float(os.environ.get(protocol.ORPHAN_TIMEOUT_ENV) or protocol.ORPHAN_TIMEOUT_S))
        self.server_seen = time.monotonic()
        self.read_ok = time.monotonic()     # the last successful read of Redis
        self.clear_at = (None, "", 0.0)     # (round, server, when its last reading began) that found nothing
        self.answered = 0                   # readings Redis answered
        self._logged = 0.0
        self._thread = threading.Thread(target=self._watch, name="stop-watcher", daemon=True)
        self._thread.start()

    def arm(self, round_number: int, server_id: str) -> None:
        self.reason = ""
        self.server_id = server_id
        self.read_ok = time.monotonic()     # the request itself came through Redis just now
        self.round = round_number

    def disarm(self) -> None:
        self.round = None

    def recent_clear(self, round_number: int, server_id: str, within_s: float = RECENT_CLEAR_S) -> bool:
        """The watcher's own thread, armed for this round of this server, found nothing against it in a reading
        begun within `within_s`: as fresh as what stops any step, so a round that starts now (the one a site
        carried steps into) needs no reading of its own on the caller's path."""
        armed, server, when = self.clear_at
        return (armed == round_number and server == server_id and not self.reason
                and time.monotonic() - when <= within_s)

    def check(self) -> str | None:
        """One reading now, on the caller's thread: the reason the armed round must not train at all, or None.
        The round's own stop key is not one: a request that reaches a trainer after its round was ended by the
        clock (a trainer still starting, a slow fetch) still takes its step; a closed window, a stale signal or
        a replaced server allow none."""
        round_number = self.round
        return None if round_number is None else self._read(round_number, own_stop=False)

    def _read(self, round_number: int, own_stop: bool = True) -> str | None:
        """One reading of the stop key, the site's energy state, the clock and the server; the reason to stop."""
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.get(protocol.stop_key(self.run, round_number))
            pipe.hget(energy_events.site_key(self.run, self.site), "curtailed")
            pipe.hgetall(energy_events.clock_key(self.run))
            pipe.get(protocol.server_current_key(self.run))
            pipe.exists(protocol.server_alive_key(self.run))
            stop, curtailed, clock, server, server_alive = pipe.execute()
        except redis.RedisError as error:   # no answer is no signal: after the bound, stop
            silent = time.monotonic() - self.read_ok
            if time.monotonic() - self._logged > 5.0:
                self._logged = time.monotonic()
                log(f"stop watcher: Redis unavailable for {silent:.1f} s ({error})")
            if silent > self.fresh_s:
                return (f"Redis unreachable for {silent:.1f} s: no fresh stop or curtailment signal "
                        f"(bound {self.fresh_s:g} s)")
            return None
        self.read_ok = time.monotonic()
        self.answered += 1
        if server_alive:
            self.server_seen = time.monotonic()
        return stop_reason(stop=stop if own_stop else None, curtailed=curtailed, clock=SimClock.from_fields(clock) if clock else None,
                           wall_now=time.time(), server=server, own_server=self.server_id,
                           server_gone_s=time.monotonic() - self.server_seen, orphan_timeout=self.orphan_timeout)

    def _watch(self) -> None:
        while True:
            round_number = self.round
            if round_number is not None and not self.trainer.stop_event.is_set():
                began, server, answered = time.monotonic(), self.server_id, self.answered
                reason = self._read(round_number)
                if reason is not None and self.round == round_number:
                    self.reason = reason
                    self.trainer.request_stop()
                elif reason is None and self.answered > answered:   # Redis answered: not an outage's None
                    self.clear_at = (round_number, server, began)
            time.sleep(STOP_POLL_S)


class Heartbeat:
    """Keeps the site's alive key fresh and its trainer hash current."""

    def __init__(self, client: redis.Redis, run: str, site: str):
        self.r, self.run, self.site = client, run, site
        self.fields = {"pid": os.getpid(), "host": socket.gethostname(), "status": "starting", "round": -1,
                       "step": 0}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.beat()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def update(self, **fields: object) -> None:
        """New fields, written by the heartbeat's thread at once (no Redis round trip on the caller's path: over
        a WAN one is a good part of a step)."""
        self.fields.update(fields)
        self._wake.set()

    def beat(self) -> None:
        try:
            pipe = self.r.pipeline()
            pipe.hset(protocol.trainer_key(self.run, self.site), mapping={k: str(v) for k, v in self.fields.items()})
            pipe.set(protocol.alive_key(self.run, self.site), str(os.getpid()), ex=protocol.ALIVE_TTL_S)
            pipe.execute()
        except redis.RedisError as error:
            log(f"heartbeat: Redis unavailable ({error})")

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(protocol.HEARTBEAT_S)
            self._wake.clear()
            if not self._stop.is_set():
                self.beat()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self.fields.update(status="stopped")
        self.beat()
        self.r.delete(protocol.alive_key(self.run, self.site))


def next_entry_id(last: tuple[int, int], wall_ms: int) -> tuple[int, int]:
    """A stream entry id after `last`: the wall millisecond, or `last`'s with the next sequence number when the
    clock has not moved on (or went back)."""
    return (wall_ms, 0) if wall_ms > last[0] else (last[0], last[1] + 1)


class MetricsPusher:
    """Sends every optimizer step's metrics to the site's Redis stream from a thread: a slow or restarting
    Redis delays the figures, never a training step.

    Each step gets its stream id when it is pushed, so a batch sent again (a reply lost to an outage, which the
    client retries) is refused by Redis for the entries that arrived the first time: each step is in the stream
    exactly once, and the tokens they count are the tokens trained."""

    def __init__(self, client: redis.Redis, run: str, site: str):
        self.r, self.key = client, protocol.metrics_key(run, site)
        self._pending: list[tuple[str, dict]] = []
        self._last_id = (0, 0)
        self._lock = threading.Lock()
        self._sending = threading.Lock()  # one batch at a time, so entries reach the stream in step order
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()

    def push(self, **fields: object) -> None:
        with self._lock:
            self._last_id = next_entry_id(self._last_id, int(time.time() * 1000))
            ms, seq = self._last_id
            self._pending.append((f"{ms}-{seq}", {k: str(v) for k, v in fields.items()}))
        self._wake.set()

    def _send(self) -> None:
        with self._sending:
            self._send_pending()

    def _send_pending(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            pipe = self.r.pipeline(transaction=False)
            for entry_id, entry in batch:
                pipe.xadd(self.key, entry, id=entry_id, maxlen=protocol.METRICS_MAXLEN, approximate=True)
            for (entry_id, entry), reply in zip(batch, pipe.execute(raise_on_error=False), strict=True):
                if not isinstance(reply, redis.ResponseError):
                    continue
                if "equal or smaller" not in str(reply):
                    raise reply
                if not self.r.xrange(self.key, entry_id, entry_id):
                    # not a duplicate: the stream is ahead of this id (a wall clock that went back across a
                    # restart of this trainer): the step goes in under an id Redis picks
                    self.r.xadd(self.key, entry, maxlen=protocol.METRICS_MAXLEN, approximate=True)
        except redis.RedisError as error:
            log(f"metrics: Redis unavailable ({error}); {len(batch)} step(s) kept for later")
            with self._lock:
                self._pending = batch + self._pending

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            self._send()

    def flush(self) -> None:
        """Everything pushed so far is in Redis (or Redis is down) when this returns."""
        self._send()

    def deliver(self, retry_s: float = 1.0) -> None:
        """Everything pushed so far is in Redis when this returns, waiting out an outage: a round's result must
        never reach the outbox before the steps it counts are in the metrics stream."""
        while True:
            self._send()
            with self._lock:
                if not self._pending:
                    return
            time.sleep(retry_s)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self._send()


