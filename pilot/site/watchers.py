"""Rank 0's helpers beside the training loop, each on its own thread, so that none of them delays a step.

    StopWatcher    raises the trainer's stop flag when the round's stop key appears, the site's window closes,
                   the server that asked was replaced, or the server has been gone too long
    Heartbeat      keeps the site's alive key fresh and its trainer hash current
    MetricsPusher  sends every optimizer step's figures to the site's metrics stream
"""

from __future__ import annotations

import os
import socket
import threading
import time

import redis

from nanochat.trainer import Trainer
from pilot import protocol
from pilot.energy.events import site_key

STOP_POLL_S = 0.05        # how often rank 0 looks at the stop key and the site's energy state


def log(*parts: object) -> None:
    print(f"[site-trainer {time.strftime('%H:%M:%S')}]", *parts, flush=True)


class StopWatcher:
    """Raises `trainer.request_stop()` when the round's stop key appears or the site's window closes."""

    def __init__(self, client: redis.Redis, run: str, site: str, trainer: Trainer):
        self.r, self.run, self.site, self.trainer = client, run, site, trainer
        self.round: int | None = None
        self.server_id = ""
        self.reason = ""
        self.orphan_timeout = float(os.environ.get(protocol.ORPHAN_TIMEOUT_ENV) or protocol.ORPHAN_TIMEOUT_S)
        self.server_seen = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="stop-watcher", daemon=True)
        self._thread.start()

    def arm(self, round_number: int, server_id: str) -> None:
        self.reason = ""
        self.server_id = server_id
        self.round = round_number

    def disarm(self) -> None:
        self.round = None

    def _watch(self) -> None:
        while True:
            round_number = self.round
            if round_number is not None and not self.trainer.stop_event.is_set():
                try:
                    pipe = self.r.pipeline(transaction=False)
                    pipe.get(protocol.stop_key(self.run, round_number))
                    pipe.hget(site_key(self.run, self.site), "curtailed")
                    pipe.get(protocol.server_current_key(self.run))
                    pipe.exists(protocol.server_alive_key(self.run))
                    reason, curtailed, server, server_alive = pipe.execute()
                except redis.RedisError as error:  # keep training; the server decides when Redis is back
                    log(f"stop watcher: Redis unavailable ({error})")
                    reason, curtailed, server, server_alive = None, None, None, True
                if server_alive:
                    self.server_seen = time.monotonic()
                elif reason is None and time.monotonic() - self.server_seen > self.orphan_timeout:
                    reason = "no server"
                if reason is None and curtailed == "0":
                    reason = "window closed"
                if reason is None and server is not None and server != self.server_id:
                    reason = "the server that asked for this round was replaced"
                if reason is not None and self.round == round_number:
                    self.reason = reason
                    self.trainer.request_stop()
            time.sleep(STOP_POLL_S)


class Heartbeat:
    """Keeps the site's alive key fresh and its trainer hash current."""

    def __init__(self, client: redis.Redis, run: str, site: str):
        self.r, self.run, self.site = client, run, site
        self.fields = {"pid": os.getpid(), "host": socket.gethostname(), "status": "starting", "round": -1,
                       "step": 0}
        self._stop = threading.Event()
        self.beat()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def update(self, **fields: object) -> None:
        self.fields.update(fields)
        self.beat()

    def beat(self) -> None:
        try:
            pipe = self.r.pipeline()
            pipe.hset(protocol.trainer_key(self.run, self.site), mapping={k: str(v) for k, v in self.fields.items()})
            pipe.set(protocol.alive_key(self.run, self.site), str(os.getpid()), ex=protocol.ALIVE_TTL_S)
            pipe.execute()
        except redis.RedisError as error:
            log(f"heartbeat: Redis unavailable ({error})")

    def _run(self) -> None:
        while not self._stop.wait(protocol.HEARTBEAT_S):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        self.update(status="stopped")
        self.r.delete(protocol.alive_key(self.run, self.site))


class MetricsPusher:
    """Sends every optimizer step's metrics to the site's Redis stream from a thread: a slow or restarting
    Redis delays the figures, never a training step."""

    def __init__(self, client: redis.Redis, run: str, site: str):
        self.r, self.key = client, protocol.metrics_key(run, site)
        self._pending: list[dict] = []
        self._lock = threading.Lock()
        self._sending = threading.Lock()  # one batch at a time, so entries reach the stream in step order
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()

    def push(self, **fields: object) -> None:
        with self._lock:
            self._pending.append({k: str(v) for k, v in fields.items()})
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
            for entry in batch:
                pipe.xadd(self.key, entry, maxlen=protocol.METRICS_MAXLEN, approximate=True)
            pipe.execute()
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

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self._send()


