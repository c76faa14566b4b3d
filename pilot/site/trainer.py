"""The site trainer: one persistent training job per site, alive across rounds.

    python -m pilot.site.trainer --site client_0 --run-id R --redis-url URL            # one process
    torchrun --nproc_per_node=4 -m pilot.site.trainer --site client_0 --run-id R ...   # the site's GPUs

It keeps the model, the optimizer state, the compiled graph and the data cursor for the whole run; the
ClientApp process (which Flower may start afresh for every message) only hands it round requests through
Redis and waits for the result (pilot/protocol.py). For each round: fetch the global weights (skipped when
they are the very weights this site handed in last), train step by step until told to stop, upload the
weights, report tokens, loss and data cursors.

Stopping: rank 0 watches, on a thread, the round's stop key (set by the server) and its own site's energy
state (so a site stops when its window closes even if the server is down, and when the curtailment signal
goes stale or Redis stops answering: watchers.py); it raises the trainer's stop flag, and the trainer's
per-step all-reduce makes every rank stop at the same step boundary: within one optimizer step of the
signal, no rank left waiting in a collective.

Overlapped rounds (round-mode "overlap"; Streaming DiLoCo's overlapped outer step, DiLoCoX's one-round delay).
The site keeps the view S: the global model as the server sent it, which its weights W descend from. At a
round's end it encodes its pseudo-gradient as the round's payload asks, D~ = enc(S - W) (bf16, or int8/4/2),
keeps D~, and a background thread uploads it and hands the result in; the site trains on (W keeps moving: the
next round's work, "carried") while the server averages. Its weights now descend from S - D~: the model as the
server sees this site. When the next global model G arrives (on a background thread too: the bf16 delta to S,
applied to S there and checked, S' == G bit for bit; or G whole), it is folded in at a step boundary:

    W <- W + (G - S) + D~;   S <- G;   D~ let go of

that is W <- G + (W - (S - D~)): the site keeps the progress it made since the boundary on top of the new global
model, and its next pseudo-gradient S' - W_end is again measured from a global model, as the outer optimizer
expects. What the payload left out of the true pseudo-gradient (its bf16 rounding or quantization error) stays in
W and goes out with the next pseudo-gradient: error feedback with no residual buffer (an overlapping boundary does
not use the site's separate one). The fold is one round late: the steps taken before it were computed on weights
that did not yet hold the last average, which is the delay the overlapped outer step accepts to keep the
accelerators busy. A lone site hands in its weights (weights-fp32): they are copied into the view's memory and the
server adopts them as the global model, so G == S and nothing is fetched or folded. The carried steps count in
the next round's result (tokens, steps, data cursors), and only if that round continues this site's data exactly
where it stopped (the ledger committed what the site reported); otherwise they are dropped: the exact global
weights are loaded and the loader rebuilt at the request's cursors, so no row is counted twice. A closed window,
a stale signal or a replaced server stops carrying at once; carrying also stops after one round's worth of steps
without a new request. Memory at rank 0: W, S and, while a round's update and the next global model travel, the
bf16 D~ (half a model); the bf16 delta waits in an unnamed file of the site's directory and is read back tensor by
tensor (applied, checked, folded): two and a half model copies (a global model fetched whole, with
global-payload "weights-fp32", takes a whole copy of its own: three and a half).

Failing: whatever one rank cannot do (fetch, check the weights, open its shards, read a row group, upload)
the ranks learn together (`agreed`: one all-reduce of a flag, then the failing rank's reason as JSON), and
every rank ends the round with the same error. A non-finite loss ends the round before its update (the
trainer raises on every rank). After any failed round the site forgets which global weights it holds, so
the next round fetches them again; the process, its optimizer state and compiled model live on. A result
(ok or error) is handed in once Redis answers again: no work is lost to an outage.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
import torch
import torch.distributed as dist

from nanochat.dataloader import DataLoader, ShardError
from nanochat.distributed import DistInfo, cleanup_distributed, init_distributed
from nanochat.tokenizer import Tokenizer
from nanochat.trainer import DataExhausted, TrainConfig, Trainer, plan_training
from pilot import coordination, procmem, protocol, signing
from pilot.dataplane import payload
from pilot.dataplane.blob import BlobError, TensorBlob, spool_file
from pilot.dataplane.client import fetch_blob, site_tls, upload_blob
from pilot.dataplane.payload import QUANTIZED, update_blob
from pilot.dataplane.quantize import ErrorFeedback
from pilot.protocol import RoundRequest, RoundResult
from pilot.site.watchers import Heartbeat, MetricsPusher, StopWatcher, log

INBOX_BLOCK_MS = 1000     # wait for work this long between heartbeats
REDIS_RETRY_S = 1.0       # Redis away: try again this often (a result waits to be handed in, never dropped)
# what a rank may fail with inside a round (anything else is a bug, and ends the process)
ROUND_ERRORS = (BlobError, ShardError, ValueError, RuntimeError, OSError, FloatingPointError)


@dataclass
class Carry:
    """Overlap mode: the work done since the last round's end, counted in the next round's result."""

    cursors: list[dict] | None       # the data position the site reported at that end (what the ledger commits)
    cap: int                         # carry at most this many steps without a new request (the last round's)
    steps: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    training_s: float = 0.0
    wall_start: float = field(default_factory=time.time)


@torch.no_grad()
def fold_global(live: dict[str, torch.Tensor], view: dict[str, torch.Tensor],
                sent: tuple[str, dict[str, torch.Tensor]] | None, *, weights: dict[str, torch.Tensor] | None = None,
                delta: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Fold a new global model G into weights W that descend from the view S less the update as sent, D~
    (overlap mode, the module's docstring): W <- W + (G - S) + D~, in place, tensor by tensor, block by block.
    G - S is -fp32(delta) when the bf16 delta came (`view` is S' already: applied as it was fetched), G - S
    itself when G came whole (`weights`), nothing when G is the view. Returns the new view."""
    if weights is not None:
        for name, tensor in live.items():
            if tensor.is_floating_point():
                payload.add_into(tensor, plus=weights[name], minus=view[name])
            else:
                tensor.copy_(weights[name])
        view = weights
    elif delta is not None:
        for name, tensor in live.items():
            if tensor.is_floating_point():
                payload.add_into(tensor, minus=delta[name])
            else:
                tensor.copy_(delta[name])
    if sent is not None:
        kind, tensors = sent
        for name, d in payload.sent_deltas(tensors, kind):
            if live[name].is_floating_point():
                payload.add_into(live[name], plus=d)
    return view


class RoundFailed(Exception):
    """The round failed at this site, the same way on every rank; `shard` names an unreadable shard file."""

    def __init__(self, reason: str, shard: str | None = None):
        super().__init__(reason)
        self.reason, self.shard = reason, shard


# ------------------------------------------------------------------ collectives on small JSON
def _collective_device(info: DistInfo) -> torch.device:
    """Where small collective tensors live: NCCL moves only GPU tensors, gloo CPU ones."""
    return torch.device(info.device) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_json(obj: object, info: DistInfo, src: int = 0) -> object:
    """Rank `src`'s `obj` on every rank (JSON bytes in a tensor: nothing is unpickled)."""
    if info.world_size == 1:
        return obj
    device = _collective_device(info)
    data = json.dumps(obj).encode() if info.rank == src else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if info.rank == src:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src)
    return json.loads(bytes(buf.cpu().numpy()).decode())


def agreed(info: DistInfo, what: str, action, *args):
    """`action(*args)` on this rank, then every rank learns whether any rank failed (one all-reduce of the lowest
    failing rank): if one did, every rank raises the same RoundFailed with that rank's reason. So the ranks fail
    a round together and none is left waiting in a collective that the others skipped."""
    value, failure = None, None
    try:
        value = action(*args)
    except ROUND_ERRORS as error:
        failure = {"reason": f"{what}: {error}", "shard": getattr(error, "file", None)}
    if info.world_size == 1:
        if failure is not None:
            raise RoundFailed(failure["reason"], failure["shard"])
        return value
    first = torch.tensor([info.rank if failure is not None else info.world_size], dtype=torch.int64,
                         device=_collective_device(info))
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    src = int(first.item())
    if src == info.world_size:
        return value
    failure = broadcast_json(failure, info, src=src)
    raise RoundFailed(f"rank {src}: {failure['reason']}", failure["shard"])


def check_finite(weights: dict[str, torch.Tensor], digest: str) -> None:
    """Global weights holding a NaN or an infinity are refused before a single step trains on them."""
    bad = [name for name, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"global weights {digest[:12]} hold non-finite values in {len(bad)} tensor(s) "
                         f"({', '.join(bad[:3])}): refused before training")


def drop_nonfinite_moments(optimizers: dict[str, torch.optim.Optimizer]) -> int:
    """Forget the optimizer state of every parameter whose state holds a NaN or an infinity; returns how many.

    Finite moments are kept: they are what a persistent trainer exists to keep (restarting it lost them, which
    is the failure this replaces), and a NaN loss is caught before its update, so it leaves them as they
    were. Non-finite ones (an update that overflowed) would turn every later update into NaN; the optimizers
    start such a parameter's state afresh at its next step."""
    dropped = 0
    for opt in optimizers.values():
        for param, state in list(opt.state.items()):
            if any(torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())
                   for v in state.values()):
                del opt.state[param]
                dropped += 1
    return dropped


class RoundBatches:
    """The loader as the trainer sees it: a read error ends this rank's data (StopIteration, so every rank
    leaves the step together through the trainer's "exhausted" flag, with no update taken) and is kept in
    `error`, for the round to report as what it is."""

    def __init__(self, loader: DataLoader):
        self.loader, self.error = loader, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.error is not None:
            raise StopIteration
        try:
            return next(self.loader)
        except StopIteration:
            raise
        except Exception as error:  # noqa: BLE001 - whatever the read failed with is reported by the round
            self.error = error
            raise StopIteration from error

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def train_config_from(spec: dict) -> TrainConfig:
    names = set(TrainConfig.field_names())
    return TrainConfig(**{k: v for k, v in spec.items() if k in names})


# ------------------------------------------------------------------ the site trainer
class SiteTrainer:
    def __init__(self, site: str, run: str, client: redis.Redis | None, info: DistInfo, spec: dict,
                 spool_dir: Path | None = None):
        self.site, self.run, self.r, self.info = site, run, client, info
        # the next global model's bf16 delta waits in an unnamed file here, read back tensor by tensor (None: in
        # memory): the site holds W, the view and its update as sent, never the delta as well
        self.spool_dir = spool_dir
        self.spec = spec
        self.cfg = train_config_from(spec)
        self.data_dir = Path(spec["data_dir"])
        self.tokenizer = Tokenizer.from_directory(Path(spec["tokenizer_dir"]))
        plan = plan_training(self.cfg, self.tokenizer.get_vocab_size(), info.world_size)
        self.trainer = Trainer.create(self.cfg, plan, info)
        self.loader: DataLoader | None = None
        self.loader_shards: list[str] = []
        self.last_digest = ""       # digest of the global weights the model holds now ("" = not known: fetch)
        self.round_start: dict[str, torch.Tensor] | None = None   # rank 0: the round's start weights (one buffer)
        # rank 0, sync rounds: the global weights this site was last sent, kept past the upload, so that the next
        # global model arrives as a bf16 delta to them (payload.GLOBAL_DELTA: half the bytes)
        self.view: dict[str, torch.Tensor] | None = None
        self.view_digest = ""
        self.fetched = ("held", 0)   # rank 0: how this round's global weights came: held / delta / whole, and bytes
        self.steps_total = 0        # optimizer steps this process has taken, across rounds
        # overlap mode (see the module's docstring): the view is the global model S the weights descend from,
        # less the last update as it was sent (its payload, kept until the next global model is folded in)
        self.sent: tuple[str, dict[str, torch.Tensor]] | None = None   # rank 0: (payload kind, its tensors)
        self.carry: Carry | None = None
        self.incoming: dict | None = None        # rank 0: the fetcher's {"delta" | "weights", "digest", "error"}
        self.fetcher: threading.Thread | None = None
        self.handing_in: threading.Thread | None = None     # rank 0: the last round's upload and result
        self.boundary_failed = False             # that upload failed: the next round loads the exact weights
        self.inbox_id = ""                       # the inbox entry of the round being trained (its result's receipt)
        self.via = ""                            # who put it there: "server" (direct) or "clientapp" (Flower's relay)
        self.leased: list[str] = []              # spare shards leased this round (server/ledger.py), in order
        self.feedback: ErrorFeedback | None = None   # rank 0: quantized payloads' residual (what was not sent)
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
        staging = agreed(self.info, "fetching the global weights", self._fetch, request)
        if self.info.rank == 0:
            self.trainer.set_weights(staging)
            self.round_start = staging  # kept: a pseudo-gradient update is measured from it
        if self.info.world_size > 1:
            for tensor in self.trainer.model.state_dict().values():
                dist.broadcast(tensor, 0)
        self.last_digest = request.weights_digest

    def _fetch(self, request: RoundRequest) -> dict[str, torch.Tensor] | None:
        """Rank 0: the global weights, fetched into a staging buffer and checked (the model is not touched):
        as a bf16 delta to the weights this site holds when the server sent one for them, else whole."""
        if self.info.rank != 0:
            return None
        staging = self._from_delta(request)
        if staging is None:
            staging = self.trainer.get_weights()
            blob = fetch_blob(request.blob_url, request.weights_digest, token=request.blob_token, into=staging,
                              ssl_context=site_tls(request.blob_ca))
            self.fetched = ("whole", blob.size)
        check_finite(staging, request.weights_digest)
        return staging

    def _from_delta(self, request: RoundRequest) -> dict[str, torch.Tensor] | None:
        """Rank 0: the round's global weights made from the ones this site holds and the server's bf16 delta to
        them, checked against the request's digest (bit for bit the server's view); None when this site holds
        no base for a delta (or the delta fails: then the weights are fetched whole)."""
        view, self.view, digest, self.view_digest = self.view, None, self.view_digest, ""
        base = request.delta_base
        if not request.delta_digest or not base:
            return None
        if view is None or digest != base:
            if self.last_digest != base:
                return None
            view = self.trainer.get_weights()   # the model holds the base itself (it trained no step since)
        return view if self._apply_delta(request, view) is not None else None

    def _apply_delta(self, request: RoundRequest, view: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Rank 0: fetch the round's bf16 global delta and apply it to `view` (the request's delta base) in place,
        checked against the request's digest. Returns the delta's tensors; None when it could not be fetched or
        did not make the right weights (then `view` is put back, up to one rounding, and the weights are to be
        fetched whole)."""
        base = request.delta_base
        try:
            delta = fetch_blob(request.blob_url, request.delta_digest, token=request.blob_token,
                               ssl_context=site_tls(request.blob_ca), spool=self._spool_file)
            if delta.metadata.get("payload") != payload.GLOBAL_DELTA or delta.metadata.get("base") != base:
                raise ValueError(f"blob {request.delta_digest[:12]} is not a global delta to {base[:12]}")
            payload.apply_global_delta(view, delta.tensors)   # checks every tensor before it writes any
        except (BlobError, ValueError) as error:
            log(f"round {request.round}: the global delta did not apply ({error}); fetching the weights whole")
            return None
        self.fetched = ("delta", delta.size)
        made = TensorBlob(view).digest
        if made != request.weights_digest:
            log(f"round {request.round}: the weights made from the global delta hash to {made[:12]}, not "
                f"{request.weights_digest[:12]}; fetching the weights whole")
            for name, tensor in view.items():
                if tensor.is_floating_point():
                    payload.add_into(tensor, plus=delta.tensors[name])
            return None
        return delta.tensors

    def _spool_file(self):
        return spool_file(self.spool_dir) if self.spool_dir is not None else None

    def forget(self) -> None:
        """After a failed round: the model may no longer hold the global weights it was sent (steps taken, or a
        fetch cut short), so the next round fetches them; the round's gradients and any non-finite optimizer
        state go; the loader is rebuilt from the next request's cursors. Optimizer moments that are finite,
        the compiled model and the process stay."""
        self.last_digest = ""
        self.round_start = None
        self.view, self.view_digest = None, ""
        self.sent, self.carry, self.incoming, self.leased = None, None, None, []
        if self.feedback is not None:   # its residual was measured against weights this site no longer holds
            self.feedback.reset()
        self.trainer.model.zero_grad(set_to_none=True)   # a step that raised may have left its gradients
        dropped = drop_nonfinite_moments(self.trainer.optimizers)
        if dropped:
            log(f"optimizer state of {dropped} parameter(s) was not finite: started afresh")
        if self.loader is not None:
            self.loader.close()
        self.loader, self.loader_shards = None, []

    def _set_data(self, request: RoundRequest, carried: bool = False) -> None:
        """Keep the current loader when the request continues exactly where it is; else build a new one. With
        carried steps (overlap) the loader is where those steps left it: kept, or rebuilt there over the
        request's shard list (the ledger dropped a finished shard or added a new one)."""
        start = request.cursors[self.info.rank] if request.cursors else None
        if carried and self.loader is not None:
            if request.shards == self.loader_shards:
                return
            start = self.loader.state_dict()
        elif self.loader is not None and request.shards == self.loader_shards:
            here = self.loader.state_dict()
            if start is None or all(here.get(k) == start.get(k) for k in ("file", "row", "offset")):
                return
        if self.loader is not None:
            self.loader.close()
        self.loader, self.loader_shards = None, []
        files = [self.data_dir / name for name in request.shards]
        self.loader = agreed(self.info, "opening the round's shards", DataLoader, self.tokenizer,
                             self.cfg.device_batch_size, self.cfg.max_seq_len, "train", self.info.device, files,
                             self.info.rank, self.info.world_size, start)
        self.loader_shards = list(request.shards)
        self.trainer.train_batches = RoundBatches(self.loader)

    def _lease_spare(self, request: RoundRequest) -> bool:
        """The site's shards ran out mid-round: lease the next spare shard from its own list (rank 0 pops it,
        every rank learns it) and go on over it, each rank from where it stands (a rank with rows left in its
        file trains them first)."""
        name = None
        if self.info.rank == 0 and self.r is not None:
            try:
                name = self.r.lpop(protocol.spare_key(self.run, self.site))
            except redis.RedisError as error:
                log(f"leasing a spare shard: Redis unavailable ({error})")
        name = broadcast_json(name, self.info)
        if not name:
            return False
        here = self.loader.state_dict()
        files = [*self.loader_shards, name]
        self.loader.close()
        self.loader = agreed(self.info, f"opening the leased shard {name}", DataLoader, self.tokenizer,
                             self.cfg.device_batch_size, self.cfg.max_seq_len, "train", self.info.device,
                             [self.data_dir / f for f in files], self.info.rank, self.info.world_size, here)
        self.loader_shards = files
        self.trainer.train_batches = RoundBatches(self.loader)
        self.leased.append(name)
        log(f"round {request.round}: its shards ran out; leased {name}")
        return True

    def _upload(self, request: RoundRequest) -> str:
        if self.info.rank != 0:
            return ""
        return upload_blob(request.blob_url, self.update_blob(request), token=request.blob_token,
                           ssl_context=site_tls(request.blob_ca))

    def update_blob(self, request: RoundRequest) -> TensorBlob:
        """The round's update as the server asked for it, written over the round's start buffer when there is
        one (no third copy of the model)."""
        start = self.round_start
        if start is None and request.update_payload == "weights-fp32":
            start = self.trainer.get_weights()
        # the round's start weights are the global model the next one comes as a delta to: kept (the bf16
        # payload then takes half a model of its own), unless the update is the weights themselves
        keep = request.update_payload != "weights-fp32" and start is not None
        blob = update_blob(start, self.trainer.model.state_dict(), request.update_payload,
                           feedback=self._feedback(request.update_payload), reuse_start=not keep)
        self.view, self.view_digest = (start, request.weights_digest) if keep else (None, "")
        return blob

    def _feedback(self, kind: str) -> ErrorFeedback | None:
        """The site's error feedback for a quantized payload kind (its residual lives across rounds)."""
        if kind not in QUANTIZED:
            return None
        if self.feedback is None or self.feedback.kind != kind:
            self.feedback = ErrorFeedback(kind)
        return self.feedback

    def run_round(self, request: RoundRequest) -> RoundResult:
        try:
            return self._run_round(request)
        except RoundFailed:
            if self.watcher is not None:
                self.watcher.disarm()
            self.forget()
            raise

    def _run_round(self, request: RoundRequest) -> RoundResult:
        started, wall_start = time.perf_counter(), time.time()
        trainer = self.trainer
        self.fetched = ("held", 0)
        overlap = request.round_mode == "overlap"
        self._wait_handed_in()
        carry = self._take_carry(request) if overlap else None
        # the watcher armed for this round while the site carried steps into it, and read nothing against it a
        # moment ago: that reading stands (no Redis round trip on the path between two carried steps)
        fresh = carry is not None and self.watcher is not None and self.watcher.recent_clear(request.round,
                                                                                            request.server_id)
        trainer.stop_event.clear()
        if self.watcher is not None:
            self.watcher.arm(request.round, request.server_id)
        # a request that waited in the inbox past its window (or its signal's freshness) trains no step at all
        reason = broadcast_json(self.watcher.check() if self.watcher is not None and not fresh else None,
                                self.info) or ""
        if reason and carry is not None:
            # no step may train now, so the new global model is not folded in: the carried steps are dropped
            # (the weights are fetched exact next time), and their rows stay uncommitted for whoever trains them next
            log(f"round {request.round}: {reason}: {carry.steps} carried step(s) dropped")
            carry, self.sent, self.last_digest = None, None, ""
        setting_up = time.perf_counter()
        if not reason:
            if carry is not None:
                self._fetch_in_background(request)
            else:
                self._load_weights(request)
                if overlap and self.info.rank == 0:   # the view: the global model the weights descend from
                    self.view = self.round_start if self.round_start is not None else self.trainer.get_weights()
                    self.view_digest, self.round_start = request.weights_digest, None
            self._set_data(request, carried=carry is not None)
        set_up_s = time.perf_counter() - setting_up   # the weights fetch (on the path in sync mode) and the data
        trainer.step_count = request.schedule_step + (carry.steps if carry else 0)
        steps = carry.steps if carry else 0
        tokens = carry.tokens if carry else 0
        loss_sum = carry.loss_sum if carry else 0.0
        training_s = carry.training_s if carry else 0.0
        wall_start = carry.wall_start if carry else wall_start
        exhausted = False
        while not reason:
            if overlap:
                self._fold_if_arrived(request)
            if steps >= request.max_steps:
                reason = "horizon"
                break
            if request.round_steps and steps >= request.round_steps:
                reason = "round steps"    # the federation's reason: in overlap mode the site trains on
                break
            try:
                result = trainer.step()
            except DataExhausted:
                # a rank whose shard could not be read ran out of data too: the round fails, naming the file
                agreed(self.info, "reading the round's shards", trainer.train_batches.raise_error)
                if self._lease_spare(request):
                    continue   # the next shard, leased mid-round: data does not run out while a spare is left
                reason, exhausted = "data exhausted", True
                break
            except FloatingPointError as error:   # raised on every rank, before the step's update
                raise RoundFailed(f"non-finite training: {error} (round {request.round}, its step {steps + 1}); "
                                  f"the update was not applied") from error
            steps += 1
            self.steps_total += 1
            tokens += trainer.plan.total_batch_size
            loss_sum += result.loss
            training_s += result.dt
            self._push_metrics(request.round, result)
            if result.stop:
                reason = (self.watcher.reason if self.watcher else "") or "stop"
                break
        if overlap and carry is not None:
            self._fold_if_arrived(request, wait=True)   # the update is measured from this round's global model
        stopped_at = time.time()  # every rank leaves the loop at the same step boundary
        if self.watcher is not None:
            self.watcher.disarm()
        cursors = trainer.data_cursors()
        spares, self.leased = self.leased, []
        result = RoundResult(
            round=request.round, site=self.site, status="ok", server_id=request.server_id, reason=reason,
            tokens=tokens, steps=steps, loss=loss_sum / steps if steps else float("nan"), cursors=cursors,
            world_size=self.info.world_size, exhausted=exhausted, trainer_pid=os.getpid(),
            seconds_training=training_s,
            extra={"stopped_at": stopped_at, "wall_start": wall_start, "carried_steps": carry.steps if carry else 0,
                   "spares": spares, "set_up_s": round(set_up_s, 3),
                   "fetch": self.fetched[0], "fetch_bytes": self.fetched[1], "via": self.via})
        if overlap and steps > 0 and broadcast_json(self.view is not None and self._may_carry_on(reason), self.info):
            # hand the update in on a thread and train on: the result reaches the outbox once it is uploaded
            self._hand_in_in_background(request, result, started)
            self.carry = Carry(cursors=cursors, cap=max(1, steps))
            # carried steps are the next round's: they take the schedule's positions (learning rate, Muon momentum)
            # from where the global schedule will be then (every site of the round took about `steps`), not
            # from this site's own count, which lags it by (sites - 1) x steps
            trainer.step_count = request.schedule_step + max(1, request.sites) * steps
            trainer.stop_event.clear()     # the round's stop is handled; carried steps obey the next signals
            if self.watcher is not None:   # (the window, the signal, the server) like any other step
                self.watcher.arm(request.round + 1, request.server_id)
            return dataclasses.replace(result, status="pending")   # the serve loop: the thread hands it in
        if steps > 0:  # with no step taken the model still holds the global weights it was sent
            if overlap and self.info.rank == 0 and self.view is not None:
                self.round_start = self.view   # the sync path hands in from the view (kept as the view again)
            uploading = time.perf_counter()
            digest = agreed(self.info, "uploading the round's update", self._upload, request)
            result.extra["upload_s"] = round(time.perf_counter() - uploading, 3)   # encode + upload, on the path
            self.round_start = None
            self.last_digest = broadcast_json(digest, self.info)
        result.weights_digest = self.last_digest
        result.trainer_step = self.steps_total
        if self.metrics is not None:
            self.metrics.deliver()  # the round's steps are in Redis before its result is (waits out an outage)
        result.seconds_total = time.perf_counter() - started
        result.extra["wall_end"] = time.time()
        return result

    def _push_metrics(self, round_number: int, result) -> None:
        if self.metrics is not None:
            self.metrics.push(round=round_number, step=self.steps_total, loss=f"{result.loss:.6f}",
                              tokens=self.trainer.plan.total_batch_size, seconds=f"{result.dt:.6f}",
                              wall_ts=f"{time.time():.3f}")

    # -------------------------------------------------------------- overlap mode
    def _take_carry(self, request: RoundRequest) -> Carry | None:
        """The carried work, if this request continues exactly where the site's data stopped; else None, and
        the carried steps are dropped (exact global weights, loader at the request's cursors)."""
        carry, self.carry = self.carry, None
        failed, self.boundary_failed = self.boundary_failed, False
        here = self.loader.state_dict() if self.loader is not None else {}
        same_data = carry is not None and not failed and (request.cursors or None) == (carry.cursors or None) \
            and (request.shards == self.loader_shards or here.get("file") in request.shards)
        if all(bool(x) for x in self._gather_flags(bool(same_data))):
            return carry
        if carry is not None or failed:
            if carry is not None and carry.steps:
                log(f"round {request.round}: {carry.steps} carried step(s) dropped (the round does not continue "
                    f"this site's data, or its last update was not handed in); loading the exact global weights")
            self.last_digest, self.sent = "", None   # the view stays: a delta to it still serves
        return None

    def _gather_flags(self, flag: bool) -> list[bool]:
        """Every rank's flag (one all-reduce of the minimum: all true or not)."""
        if self.info.world_size == 1:
            return [flag]
        t = torch.tensor([int(flag)], dtype=torch.int64, device=_collective_device(self.info))
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return [bool(t.item())]

    def _fetch_in_background(self, request: RoundRequest) -> None:
        """Rank 0 fetches the round's global model on a thread: nothing when it is the view itself (a lone site's
        upload adopted as it was, or nothing aggregated); the bf16 delta to the view, applied to the view there
        and then (checked against the digest); else the weights whole."""
        self.incoming = None
        if self.info.rank != 0:
            return
        if request.weights_digest == self.view_digest:
            self.incoming = {"delta": None, "weights": None, "digest": request.weights_digest, "error": ""}
            return

        def fetch() -> None:
            incoming = {"delta": None, "weights": None, "digest": request.weights_digest, "error": ""}
            try:
                if request.delta_digest and request.delta_base and request.delta_base == self.view_digest:
                    incoming["delta"] = self._apply_delta(request, self.view)
                if incoming["delta"] is None:
                    staging = {k: torch.empty_like(v) for k, v in self.view.items()}
                    blob = fetch_blob(request.blob_url, request.weights_digest, token=request.blob_token,
                                      into=staging, ssl_context=site_tls(request.blob_ca))
                    self.fetched = ("whole", blob.size)
                    incoming["weights"] = staging
                check_finite(incoming["weights"] or self.view, request.weights_digest)
            except ROUND_ERRORS as error:
                incoming["error"] = f"fetching the global weights: {error}"
            self.incoming = incoming

        self.fetcher = threading.Thread(target=fetch, name="fetch-global", daemon=True)
        self.fetcher.start()

    def _fold_if_arrived(self, request: RoundRequest, wait: bool = False) -> None:
        """At a step boundary: fold the new global model in (the module's docstring), on every rank together."""
        if self.info.rank == 0 and wait and self.fetcher is not None:
            self.fetcher.join()
        ready = self.info.rank == 0 and self.incoming is not None
        state = broadcast_json({"ready": True, "error": self.incoming["error"]} if ready else None, self.info)
        if state is None:
            return
        if state["error"]:
            self.incoming = None
            raise RoundFailed(state["error"])
        if self.info.rank == 0:
            incoming, self.incoming, self.fetcher = self.incoming, None, None
            self.view = fold_global(self.trainer.model.state_dict(), self.view, self.sent,
                                    weights=incoming["weights"], delta=incoming["delta"])
            self.sent = None
            self.view_digest = self.last_digest = incoming["digest"]
        if self.info.world_size > 1:
            for tensor in self.trainer.model.state_dict().values():
                dist.broadcast(tensor, 0)
        self.last_digest = broadcast_json(self.last_digest if self.info.rank == 0 else "", self.info)

    def _hand_in_in_background(self, request: RoundRequest, result: RoundResult, started: float) -> None:
        """Rank 0: the round's update is encoded now (D~ = bf16(S - W), kept as sent; or for weights-fp32, W
        copied into the view's memory, which it becomes), and a thread uploads it and then hands the result in;
        the other ranks go on at once."""
        if self.info.rank != 0:
            return
        live = self.trainer.model.state_dict()
        if request.update_payload == "weights-fp32":
            with torch.no_grad():
                for name, tensor in live.items():
                    self.view[name].copy_(tensor.detach())
            self.view_digest, self.sent = "", None   # named once uploaded: the blob's digest
            blob = TensorBlob(self.view, {"payload": "weights-fp32"})
        else:
            blob = payload.delta_blob(self.view, live, request.update_payload)
            self.sent = (request.update_payload, blob.tensors)
        site, metrics = self, self.metrics

        def hand() -> None:
            try:
                digest = upload_blob(request.blob_url, blob, token=request.blob_token,
                                     ssl_context=site_tls(request.blob_ca))
                result.weights_digest = digest
                # a weights-fp32 upload is what the server adopts as the global model: the site holds it (the view)
                if request.update_payload == "weights-fp32":
                    site.view_digest = site.last_digest = digest
                else:
                    site.last_digest = ""
            except BlobError as error:
                result.status, result.reason = "error", f"uploading the round's update: {error}"
                site.boundary_failed, site.last_digest = True, ""
            result.trainer_step = site.steps_total
            if metrics is not None:
                metrics.deliver()
            result.seconds_total = time.perf_counter() - started
            result.extra["wall_end"] = time.time()
            if site.r is not None:
                hand_in(site.r, site.run, site.site, result, inbox_id)
                log(f"round {result.round}: {result.steps} steps, {result.tokens} tokens handed in while training "
                    f"on ({result.status}{': ' + result.reason if result.status != 'ok' else ''})")

        inbox_id = self.inbox_id
        self.handing_in = threading.Thread(target=hand, name="hand-in", daemon=True)
        self.handing_in.start()

    def _may_carry_on(self, reason: str) -> bool:
        """Rank 0: train on past this round's end? When it ended for the federation's reasons (its clock, another
        site's window) and nothing stops this site (its own window, its signal, its server): the watcher's own
        reading says. Not when no next round will come (the horizon, the data, the simulation's end)."""
        if any(word in reason for word in ("horizon", "data exhausted", "energy simulation finished")):
            return False
        return self.watcher is not None and self.watcher.check() is None

    def _wait_handed_in(self) -> None:
        if self.handing_in is not None:
            self.handing_in.join()
            self.handing_in = None

    def can_carry_on(self) -> bool:
        """Between rounds in overlap mode: take another carried step? (every rank gets rank 0's answer) The
        watcher's thread reads the window, the signal and the server for the armed next round and raises the
        stop flag, as during a round; no Redis round trip here (over a WAN one costs a good part of a step)."""
        go = False
        if self.info.rank == 0 and self.carry is not None and self.carry.steps < self.carry.cap \
                and not self.trainer.stop_event.is_set() and self.watcher is not None:
            go = not self.watcher.reason
        return bool(broadcast_json(go, self.info))

    def carry_step(self, next_round: int) -> None:
        """One step of the next round's work while the last one's update travels (overlap mode)."""
        carry = self.carry
        try:
            result = self.trainer.step()
        except (DataExhausted, FloatingPointError) as error:
            log(f"carrying stopped: {type(error).__name__}: {error}")
            self.carry = Carry(cursors=carry.cursors, cap=0, steps=carry.steps, tokens=carry.tokens,
                               loss_sum=carry.loss_sum, training_s=carry.training_s, wall_start=carry.wall_start)
            if isinstance(error, FloatingPointError):
                self.boundary_failed = True
            return
        carry.steps += 1
        self.steps_total += 1
        carry.tokens += self.trainer.plan.total_batch_size
        carry.loss_sum += result.loss
        carry.training_s += result.dt
        self._push_metrics(next_round, result)
        if result.stop:
            carry.cap = carry.steps   # the watcher saw a closed window or a stale signal: no more carried steps


class InboxReader:
    """Rank 0: reads the site's inbox on a thread (a blocking XREAD), so that no step waits for a Redis round
    trip (over a WAN that is a good part of a step while carried steps run between rounds); the serve loop takes
    the entries from a queue, in order. Redis unavailable: it says so once, and tries again."""

    def __init__(self, client: redis.Redis, key: str, last_id: str):
        self.r, self.key, self.last_id = client, key, last_id
        self.entries: queue.Queue[dict] = queue.Queue()
        self.error: redis.RedisError | None = None     # the last failed read, until a read succeeds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inbox", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                found = self.r.xread({self.key: self.last_id}, block=INBOX_BLOCK_MS, count=16)
            except Exception as error:
                if self._stop.is_set():
                    return   # shutting down: the connection was closed under a blocking read
                if not isinstance(error, redis.RedisError):
                    raise
                if self.error is None:
                    log(f"inbox: Redis unavailable ({error})")
                self.error = error
                self._stop.wait(REDIS_RETRY_S)
                continue
            self.error = None
            for _, entries in found or []:
                for entry_id, fields in entries:
                    self.last_id = entry_id
                    self.entries.put(dict(fields, id=entry_id))

    def take(self, timeout: float | None) -> dict | None:
        """The next entry: at once (timeout None or 0) or within `timeout` seconds; None if there is none."""
        try:
            return self.entries.get(timeout=timeout) if timeout else self.entries.get_nowait()
        except queue.Empty:
            return None

    def stop(self) -> None:
        self._stop.set()


def hand_in(client: redis.Redis, run: str, site: str, result: RoundResult, inbox_id: str) -> None:
    """Append the result to the site's outbox and mark its request handled, waiting out a Redis outage: the
    work of a round is never lost to one (the server finds the result in the outbox when it looks again)."""
    waited = 0.0
    while True:
        try:
            pipe = client.pipeline(transaction=True)
            pipe.xadd(protocol.outbox_key(run, site), {"round": result.round, "result": result.to_json()})
            pipe.hset(protocol.trainer_key(run, site), "inbox_id", inbox_id)
            pipe.execute()
            if waited:
                log(f"round {result.round}: result handed in after {waited:.0f} s without Redis")
            return
        except redis.RedisError as error:
            if not waited:
                log(f"round {result.round}: Redis unavailable ({error}); the result waits for it")
            time.sleep(REDIS_RETRY_S)
            waited += REDIS_RETRY_S


def heartbeat_round(heartbeat: Heartbeat | None) -> int:
    return int(heartbeat.fields.get("round", 0)) if heartbeat is not None else 0


def wait_for_train_config(client: redis.Redis, run: str) -> dict:
    while True:
        raw = client.get(protocol.train_config_key(run))
        if raw:
            return json.loads(raw)
        time.sleep(0.2)


def serve(args: argparse.Namespace) -> int:
    procmem.return_freed_memory()   # a long-lived process that frees model-sized tensors every round
    info = init_distributed(args.device if args.device != "auto" else "")
    if os.environ.get("PILOT_SITE_THREADS"):  # several sites sharing one small machine (tests, demos)
        torch.set_num_threads(int(os.environ["PILOT_SITE_THREADS"]))
    torch.manual_seed(0)
    client = coordination.connect(args.redis_url or None, run_dir=args.run_dir, wait=True) if info.rank == 0 else None
    heartbeat = Heartbeat(client, args.run_id, args.site) if client is not None else None
    spec = broadcast_json(wait_for_train_config(client, args.run_id) if client is not None else None, info)
    site = SiteTrainer(args.site, args.run_id, client, info, spec,
                       spool_dir=Path(args.run_dir) / "sites" / args.site / "spool" if args.run_dir else None)
    reader: InboxReader | None = None
    orphan_timeout = float(os.environ.get(protocol.ORPHAN_TIMEOUT_ENV) or protocol.ORPHAN_TIMEOUT_S)
    server_seen = time.monotonic()
    taken = ("", 0)   # (server, round) of the last request taken: a second copy of it is skipped
    if client is not None:
        # work written before this process started is still there: start after the last handled entry
        last_id = client.hget(protocol.trainer_key(args.run_id, args.site), "inbox_id") or "0-0"
        reader = InboxReader(client, protocol.inbox_key(args.run_id, args.site), last_id)
        heartbeat.update(status="idle")
        log(f"site {args.site}: ready (pid {os.getpid()}, {info.world_size} rank(s) on {info.device})")
    while True:
        message = None
        carrying = site.carry is not None and site.can_carry_on()   # overlap: train on while the update travels
        if reader is not None:
            message = reader.take(None if carrying else INBOX_BLOCK_MS / 1000)
            # idle with Redis answering: is there still a server to wait for? (an outage is not its absence)
            if message is None and not carrying and reader.error is None:
                try:
                    server_alive = client.exists(protocol.server_alive_key(args.run_id))
                except redis.RedisError:
                    server_alive = False
                if server_alive:
                    server_seen = time.monotonic()
                elif time.monotonic() - server_seen > orphan_timeout:
                    log(f"site {args.site}: no server for {orphan_timeout:.0f} s: exiting")
                    message = {"kind": "shutdown"}
        message = broadcast_json(message, info)
        if message is None:
            if carrying:
                site.carry_step(next_round=heartbeat_round(heartbeat) + 1)
            continue
        if message.get("kind") == "shutdown":
            log(f"site {args.site}: shutdown requested")
            break
        # only a request signed by the server whose key this trainer was launched with (pilot/signing.py)
        request = signing.accept(message, on_refusal=log, site=args.site)
        if request is None:
            continue
        try:   # (the round a site carried steps into: its watcher read the current server a moment ago)
            current = client.get(protocol.server_current_key(args.run_id)) if client is not None and not (
                site.carry is not None and site.watcher.recent_clear(request.round, request.server_id)) else None
        except redis.RedisError:
            current = None   # the request just came through Redis; the stop watcher judges an outage
        if broadcast_json(current is not None and current != request.server_id, info):
            log(f"round {request.round}: asked by a server that was replaced; skipped")
            continue
        if request.server_id == taken[0] and request.round <= taken[1]:
            # the same round twice (the server's direct copy and the ClientApp's relay), or an older one relayed
            # late: taken once, whichever copy came first (a server's rounds only go up)
            log(f"round {request.round}: taken already (round {taken[1]} was the last); this copy skipped")
            if client is not None:
                with contextlib.suppress(redis.RedisError):
                    client.hset(protocol.trainer_key(args.run_id, args.site), "inbox_id", message["id"])
            continue
        taken = (request.server_id, request.round)
        if heartbeat is not None:
            heartbeat.update(status="training", round=request.round)
        site.inbox_id = message["id"]
        site.via = str(message.get("via") or "")
        try:
            result = site.run_round(request)
        except RoundFailed as error:
            log(f"round {request.round} failed: {error.reason}")
            result = RoundResult(round=request.round, site=args.site, status="error", reason=error.reason,
                                 server_id=request.server_id, trainer_pid=os.getpid(), trainer_step=site.steps_total,
                                 extra={"shard": error.shard} if error.shard else {})
        except ROUND_ERRORS as error:   # a failure outside `agreed` (a bug to fix there): still a result
            log(f"round {request.round} failed outside an agreed step: {error}")
            site.forget()
            result = RoundResult(round=request.round, site=args.site, status="error", reason=str(error),
                                 server_id=request.server_id, trainer_pid=os.getpid(), trainer_step=site.steps_total)
        if result.status == "pending":
            continue   # overlap: a thread hands the result in once its update is uploaded; training goes on
        if client is not None:
            hand_in(client, args.run_id, args.site, result, message["id"])
            heartbeat.update(status="idle", step=site.steps_total)
            log(f"round {request.round}: {result.steps} steps, {result.tokens} tokens, loss {result.loss:.4f}, "
                f"stopped: {result.reason or '-'}")
    if reader is not None:
        reader.stop()
    site._wait_handed_in()   # a result still on its way is handed in before the process ends
    if site.loader is not None:
        site.loader.close()  # its reader thread may be mid-read (carried steps): stop it before the interpreter does
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
