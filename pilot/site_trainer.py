"""The site trainer: one persistent training job per site, alive across rounds.

    python -m pilot.site_trainer --site client_0 --run-id R --redis-url URL            # one process
    torchrun --nproc_per_node=4 -m pilot.site_trainer --site client_0 --run-id R ...   # the site's GPUs

It keeps the model, the optimizer state, the compiled graph and the data cursor for the whole run; the
ClientApp process (which Flower may start afresh for every message) only hands it round requests through
Redis and waits for the result (pilot/protocol.py). For each round: fetch the global weights (skipped when
they are the very weights this site handed in last), train step by step until told to stop, upload the
weights, report tokens, loss and data cursors.

Stopping: rank 0 watches, on a thread, the round's stop key (set by the server) and its own site's energy
state (so a site stops when its window closes even if the server is down); it raises the trainer's stop
flag, and the trainer's per-step all-reduce makes every rank stop at the same step boundary: within one
optimizer step of the signal, no rank left waiting in a collective.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

import redis
import torch
import torch.distributed as dist

from nanochat.dataloader import DataLoader
from nanochat.distributed import DistInfo, cleanup_distributed, init_distributed
from nanochat.tokenizer import Tokenizer
from nanochat.trainer import DataExhausted, TrainConfig, Trainer, plan_training
from pilot import coordination, protocol
from pilot.blobs import BlobError, TensorBlob, fetch_blob, upload_blob
from pilot.energy.events import site_key
from pilot.payload import encode_update
from pilot.protocol import RoundRequest, RoundResult

STOP_POLL_S = 0.05        # how often rank 0 looks at the stop key and the site's energy state
INBOX_BLOCK_MS = 1000     # wait for work this long between heartbeats


def log(*parts: object) -> None:
    print(f"[site-trainer {time.strftime('%H:%M:%S')}]", *parts, flush=True)


# ------------------------------------------------------------------ collectives on small JSON
def broadcast_json(obj: object, info: DistInfo) -> object:
    """Rank 0's `obj` on every rank (JSON bytes in a tensor: nothing is unpickled)."""
    if info.world_size == 1:
        return obj
    data = json.dumps(obj).encode() if info.rank == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, 0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8)
    if info.rank == 0:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return json.loads(bytes(buf.numpy()).decode())


def train_config_from(spec: dict) -> TrainConfig:
    names = set(TrainConfig.field_names())
    return TrainConfig(**{k: v for k, v in spec.items() if k in names})


# ------------------------------------------------------------------ rank 0's watchers
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


def blob_ssl_context(request: RoundRequest) -> ssl.SSLContext | None:
    """Trust exactly the CA the server named for its weights server (it came over the authenticated channel)."""
    return ssl.create_default_context(cadata=request.blob_ca) if request.blob_ca else None


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


# ------------------------------------------------------------------ the site trainer
class SiteTrainer:
    def __init__(self, site: str, run: str, client: redis.Redis | None, info: DistInfo, spec: dict):
        self.site, self.run, self.r, self.info = site, run, client, info
        self.spec = spec
        self.cfg = train_config_from(spec)
        self.data_dir = Path(spec["data_dir"])
        self.tokenizer = Tokenizer.from_directory(Path(spec["tokenizer_dir"]))
        plan = plan_training(self.cfg, self.tokenizer.get_vocab_size(), info.world_size)
        self.trainer = Trainer.create(self.cfg, plan, info)
        self.loader: DataLoader | None = None
        self.loader_shards: list[str] = []
        self.last_digest = ""       # digest of the weights this site handed in last (= what its model holds)
        self.round_start: dict[str, torch.Tensor] | None = None   # rank 0: the round's start weights (one buffer)
        self.steps_total = 0        # optimizer steps this process has taken, across rounds
        self.watcher = StopWatcher(client, run, site, self.trainer) if info.rank == 0 else None
        self.metrics = MetricsPusher(client, run, site) if client is not None else None

    # -------------------------------------------------------------- per round
    def _load_weights(self, request: RoundRequest) -> None:
        self.round_start = None
        if request.weights_digest == self.last_digest:
            # the global model is this site's own last result: nothing to fetch
            if self.info.rank == 0 and request.update_payload != "weights-fp32":
                self.round_start = self.trainer.get_weights()
            return
        if self.info.rank == 0:
            staging = self.trainer.get_weights()
            fetch_blob(request.blob_url, request.weights_digest, token=request.blob_token, into=staging,
                       ssl_context=blob_ssl_context(request))
            self.trainer.set_weights(staging)
            self.round_start = staging  # kept: a pseudo-gradient update is measured from it
        if self.info.world_size > 1:
            for tensor in self.trainer.model.state_dict().values():
                dist.broadcast(tensor, 0)
        self.last_digest = request.weights_digest

    def _set_data(self, request: RoundRequest) -> None:
        """Keep the current loader when the request continues exactly where it is; else build a new one."""
        start = request.cursors[self.info.rank] if request.cursors else None
        if self.loader is not None and request.shards == self.loader_shards:
            here = self.loader.state_dict()
            if start is None or all(here.get(k) == start.get(k) for k in ("file", "row", "offset")):
                return
        if self.loader is not None:
            self.loader.close()
        files = [self.data_dir / name for name in request.shards]
        self.loader = DataLoader(self.tokenizer, self.cfg.device_batch_size, self.cfg.max_seq_len, split="train",
                                 device=self.info.device, files=files, rank=self.info.rank,
                                 world_size=self.info.world_size, state=start)
        self.loader_shards = list(request.shards)
        self.trainer.train_batches = self.loader

    def update_blob(self, request: RoundRequest) -> TensorBlob:
        """The round's update as the server asked for it: the site's weights, or bf16(start - end) written
        over the start buffer (no third copy of the model)."""
        kind = request.update_payload
        live = self.trainer.model.state_dict()
        if kind == "weights-fp32":
            # into the round's staging buffer when there is one: no third copy of the model
            weights = encode_update(self.round_start, live, kind, reuse_start=True) if self.round_start is not None \
                else self.trainer.get_weights()
            return TensorBlob(weights, {"payload": kind})
        if self.round_start is None:
            raise ValueError("a delta update needs the round's start weights, which this site did not keep")
        return TensorBlob(encode_update(self.round_start, live, kind, reuse_start=True), {"payload": kind})

    def run_round(self, request: RoundRequest) -> RoundResult:
        started, wall_start = time.perf_counter(), time.time()
        trainer = self.trainer
        trainer.stop_event.clear()
        if self.watcher is not None:
            self.watcher.arm(request.round, request.server_id)
        self._load_weights(request)
        self._set_data(request)
        trainer.step_count = request.schedule_step
        steps, tokens, loss_sum, training_s = 0, 0, 0.0, 0.0
        reason, exhausted = "", False
        while True:
            if steps >= request.max_steps:
                reason = "horizon"
                break
            try:
                result = trainer.step()
            except DataExhausted:
                reason, exhausted = "data exhausted", True
                break
            steps += 1
            tokens += trainer.plan.total_batch_size
            loss_sum += result.loss
            training_s += result.dt
            if self.metrics is not None:
                self.metrics.push(round=request.round, step=self.steps_total + steps, loss=f"{result.loss:.6f}",
                                  tokens=trainer.plan.total_batch_size, seconds=f"{result.dt:.6f}",
                                  wall_ts=f"{time.time():.3f}")
            if result.stop:
                reason = (self.watcher.reason if self.watcher else "") or "stop"
                break
        stopped_at = time.time()  # every rank leaves the loop at the same step boundary
        if self.watcher is not None:
            self.watcher.disarm()
        self.steps_total += steps
        cursors = trainer.data_cursors()
        if steps > 0:  # with no step taken the model still holds the global weights it was sent
            digest = ""
            if self.info.rank == 0:
                digest = upload_blob(request.blob_url, self.update_blob(request), token=request.blob_token,
                                     ssl_context=blob_ssl_context(request))
            self.round_start = None
            self.last_digest = broadcast_json(digest, self.info)
        weights_digest = self.last_digest
        if self.metrics is not None:
            self.metrics.flush()  # the round's steps are in Redis before its result is
        return RoundResult(
            round=request.round, site=self.site, status="ok", server_id=request.server_id, reason=reason,
            weights_digest=weights_digest,
            tokens=tokens, steps=steps, loss=loss_sum / steps if steps else float("nan"), cursors=cursors,
            world_size=self.info.world_size, exhausted=exhausted, trainer_pid=os.getpid(),
            trainer_step=self.steps_total, seconds_training=training_s,
            seconds_total=time.perf_counter() - started,
            extra={"stopped_at": stopped_at, "wall_start": wall_start, "wall_end": time.time()})


def wait_for_train_config(client: redis.Redis, run: str) -> dict:
    while True:
        raw = client.get(protocol.train_config_key(run))
        if raw:
            return json.loads(raw)
        time.sleep(0.2)


def serve(args: argparse.Namespace) -> int:
    info = init_distributed(args.device if args.device != "auto" else "")
    if os.environ.get("PILOT_SITE_THREADS"):  # several sites sharing one small machine (tests, demos)
        torch.set_num_threads(int(os.environ["PILOT_SITE_THREADS"]))
    torch.manual_seed(0)
    client = coordination.connect(args.redis_url or None, run_dir=args.run_dir, wait=True) if info.rank == 0 else None
    heartbeat = Heartbeat(client, args.run_id, args.site) if client is not None else None
    spec = broadcast_json(wait_for_train_config(client, args.run_id) if client is not None else None, info)
    site = SiteTrainer(args.site, args.run_id, client, info, spec)
    inbox, outbox = protocol.inbox_key(args.run_id, args.site), protocol.outbox_key(args.run_id, args.site)
    last_id = "$"
    orphan_timeout = float(os.environ.get(protocol.ORPHAN_TIMEOUT_ENV) or protocol.ORPHAN_TIMEOUT_S)
    server_seen = time.monotonic()
    if client is not None:
        # work written before this process started is still there: start after the last handled entry
        last_id = client.hget(protocol.trainer_key(args.run_id, args.site), "inbox_id") or "0-0"
        heartbeat.update(status="idle")
        log(f"site {args.site}: ready (pid {os.getpid()}, {info.world_size} rank(s) on {info.device})")
    while True:
        message = None
        if client is not None:
            entries = client.xread({inbox: last_id}, block=INBOX_BLOCK_MS, count=1)
            if entries:
                entry_id, fields_ = entries[0][1][0]
                last_id = entry_id
                message = dict(fields_, id=entry_id)
            elif client.exists(protocol.server_alive_key(args.run_id)):
                server_seen = time.monotonic()
            elif time.monotonic() - server_seen > orphan_timeout:
                log(f"site {args.site}: no server for {orphan_timeout:.0f} s: exiting")
                message = {"kind": "shutdown"}
        message = broadcast_json(message, info)
        if message is None:
            continue
        if message.get("kind") == "shutdown":
            log(f"site {args.site}: shutdown requested")
            break
        request = RoundRequest.from_json(message["request"])
        current = client.get(protocol.server_current_key(args.run_id)) if client is not None else None
        if broadcast_json(current is not None and current != request.server_id, info):
            log(f"round {request.round}: asked by a server that was replaced; skipped")
            continue
        if heartbeat is not None:
            heartbeat.update(status="training", round=request.round)
        try:
            result = site.run_round(request)
        except (BlobError, ValueError, RuntimeError) as error:
            log(f"round {request.round} failed: {error}")
            result = RoundResult(round=request.round, site=args.site, status="error", reason=str(error),
                                 server_id=request.server_id, trainer_pid=os.getpid(), trainer_step=site.steps_total)
        if client is not None:
            client.xadd(outbox, {"round": request.round, "result": result.to_json()})
            client.hset(protocol.trainer_key(args.run_id, args.site), "inbox_id", message["id"])
            heartbeat.update(status="idle", step=site.steps_total)
            log(f"round {request.round}: {result.steps} steps, {result.tokens} tokens, loss {result.loss:.4f}, "
                f"stopped: {result.reason or '-'}")
    if site.metrics is not None:
        site.metrics.stop()
    if heartbeat is not None:
        heartbeat.stop()
        coordination.release(client, args.run_dir)  # stops the run's embedded Redis if this was its last user
    cleanup_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", required=True, help="site name (the SuperNode's node-config name)")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--run-dir", default=None, help="run directory (for the embedded Redis)")
    parser.add_argument("--redis-url", default="",
                        help="Redis of the run (default: $PILOT_REDIS_URL; prefer the variable: a URL with a "
                             "password on the command line is visible to every user of the host)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
