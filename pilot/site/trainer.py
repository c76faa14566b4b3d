"""The site trainer: one persistent training job per site, alive across rounds.

    python -m pilot.site.trainer --site client_0 --run-id R --redis-url URL            # one process
    torchrun --nproc_per_node=4 -m pilot.site.trainer --site client_0 --run-id R ...   # the site's GPUs

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
import sys
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
from pilot.dataplane.blob import BlobError, TensorBlob
from pilot.dataplane.client import fetch_blob, site_tls, upload_blob
from pilot.dataplane.payload import update_blob
from pilot.protocol import RoundRequest, RoundResult
from pilot.site.watchers import Heartbeat, MetricsPusher, StopWatcher, log

INBOX_BLOCK_MS = 1000     # wait for work this long between heartbeats


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
                       ssl_context=site_tls(request.blob_ca))
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
        """The round's update as the server asked for it, written over the round's start buffer when there is
        one (no third copy of the model)."""
        start = self.round_start
        if start is None and request.update_payload == "weights-fp32":
            start = self.trainer.get_weights()
        return update_blob(start, self.trainer.model.state_dict(), request.update_payload)

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
                                     ssl_context=site_tls(request.blob_ca))
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
