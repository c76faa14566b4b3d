"""The pretraining loop as an object that can be driven one optimizer step at a time.

`scripts/base_train.py` runs it start to finish; a federated site trainer keeps one Trainer alive across
rounds: it calls `step()` as long as its window lasts, stops between any two steps, hands out and takes in
weights (`get_weights` / `set_weights`, optimizer state untouched), and checkpoints (`save_checkpoint` /
`load_checkpoint`: model, optimizer state, step, tokens and every rank's data cursor).

Policy lives in small pure functions, tested alone: `lr_multiplier` (warm-up, constant, linear warm-down that
ends exactly at the horizon and stays at its floor past it), `muon_momentum`, `plan_training` (model size,
horizon, gradient accumulation; every inconsistency is a ValueError before any work starts).

Under torchrun every rank runs the same Trainer; gradients are averaged by the distributed optimizers (no
DDP wrapper), and once per step a single all-reduce carries the loss, "a rank ran out of data" and "stop
requested", so every rank takes the same decision at the same step boundary.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat import checkpoint as ckpt
from nanochat.adamw import AdamW, DistAdamW
from nanochat.common import print0
from nanochat.distributed import DistInfo, all_gather_json
from nanochat.gpt import GPT, GPTConfig, build_model, config_from_depth, count_params
from nanochat.muon import DistMuon, Muon


@dataclass
class TrainConfig:
    """Hyperparameters of a run (nanochat's defaults; the d20 baseline needs none changed but the depth)."""
    # model
    depth: int = 20
    aspect_ratio: int = 64          # width = aspect_ratio x depth
    head_dim: int = 128
    num_kv_heads: int = 0           # 0: as many as query heads (no grouped-query attention)
    max_seq_len: int = 2048
    # horizon: num_iterations if > 0, else target_param_data_ratio x parameters tokens (Chinchilla ~20)
    num_iterations: int = -1
    target_param_data_ratio: float = 20.0
    # batch: total_batch_size tokens per optimizer step, split over ranks and gradient-accumulation micro-steps
    device_batch_size: int = 32
    total_batch_size: int = 524288
    # optimizers (AdamW learning rates are for width 768 and scale with width^-0.5; Muon's do not)
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    weight_decay: float = 0.0
    # schedule
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0      # the floor: the multiplier at and past the horizon
    muon_momentum_start: float = 0.85
    muon_momentum_end: float = 0.95
    muon_momentum_warmup_steps: int = 300
    grad_clip: float = 1.0          # clip the global gradient norm (all ranks, Muon and AdamW) to this; 0: off
    # runtime
    seed: int = 42
    compile: str = "auto"           # auto: on CUDA only; on; off
    data_sharding: str = "documents"  # documents: each rank reads its own documents; rows: see RowShardedBatches
    # BENCHMARKS ONLY (bench/utilisation.py; run setting emulate-step-s): > 0 makes every optimizer step an
    # emulated GPU step of exactly this many seconds: no forward/backward, no optimizer (none is built), the data
    # loader still advances one step's batch, every floating-point weight still changes (Trainer._emulated_step)
    emulate_step_s: float = 0.0

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


AUTOCAST_DTYPE = torch.bfloat16
# BENCHMARKS ONLY: an emulated step adds EMULATE_DELTA x (1 + step % 3) to one EMULATE_SLICES-th of every
# floating-point tensor (slice step % EMULATE_SLICES): every tensor changes at every step, every weight within
# EMULATE_SLICES steps, at 1/EMULATE_SLICES of the memory traffic of touching all of it (a d20 model is 2.24 GB:
# touching all of it costs ~0.35 s of one CPU core, most of a 0.48 s step)
EMULATE_DELTA = 1e-6
EMULATE_SLICES = 8
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # bf16 dense


# ----------------------------------------------------------------------------------------- pure policy
def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                  final_lr_frac: float = 0.0) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based) of a run of `num_iterations` steps.

    Linear warm-up over the first warmup_ratio of the run, 1.0, then a linear warm-down that reaches
    final_lr_frac exactly at step == num_iterations, and stays there for any later step (never below it, so
    never negative).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step >= num_iterations:
        return final_lr_frac
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown   # in (0, 1): 1 at warm-down start, 0 at the horizon
    return max(final_lr_frac, progress + (1 - progress) * final_lr_frac)


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, warmup_steps: int = 300) -> float:
    """Muon's momentum warms up linearly from `start` to `end` over `warmup_steps` steps."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


def validate_config(cfg: TrainConfig, world_size: int = 1) -> GPTConfig:
    """Check everything that does not need the tokenizer; returns the model config (with a placeholder vocab)."""
    for name in ("device_batch_size", "total_batch_size", "max_seq_len"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    model_config = config_from_depth(cfg.depth, sequence_len=cfg.max_seq_len, aspect_ratio=cfg.aspect_ratio,
                                     head_dim=cfg.head_dim, n_kv_head=cfg.num_kv_heads or None)
    per_micro = cfg.device_batch_size * cfg.max_seq_len * world_size
    if cfg.total_batch_size % per_micro:
        lo = max(per_micro, cfg.total_batch_size // per_micro * per_micro)
        raise ValueError(
            f"--total_batch_size {cfg.total_batch_size:,} tokens is not divisible by the tokens of one "
            f"micro-step, device_batch_size x max_seq_len x world_size = {cfg.device_batch_size} x "
            f"{cfg.max_seq_len} x {world_size} = {per_micro:,}; use a multiple of {per_micro:,} "
            f"(e.g. {lo:,} or {lo + per_micro:,}) or change --device_batch_size")
    if cfg.num_iterations <= 0 and not cfg.target_param_data_ratio > 0:
        raise ValueError("set a horizon: --num_iterations N (> 0) or --target_param_data_ratio R (> 0)")
    if not (math.isfinite(cfg.grad_clip) and cfg.grad_clip >= 0):
        raise ValueError(f"--grad_clip must be >= 0 (0: no clipping), got {cfg.grad_clip}")
    for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"--{name} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.warmup_ratio + cfg.warmdown_ratio > 1.0:
        raise ValueError(f"--warmup_ratio {cfg.warmup_ratio} + --warmdown_ratio {cfg.warmdown_ratio} exceed 1")
    if cfg.compile not in ("auto", "on", "off"):
        raise ValueError(f"--compile must be auto, on or off, got {cfg.compile!r}")
    if cfg.data_sharding not in ("documents", "rows"):
        raise ValueError(f"--data_sharding must be documents or rows, got {cfg.data_sharding!r}")
    if not (math.isfinite(cfg.emulate_step_s) and cfg.emulate_step_s >= 0):
        raise ValueError(f"emulate_step_s must be >= 0 (0: real training), got {cfg.emulate_step_s}")
    return model_config


@dataclass(frozen=True)
class TrainPlan:
    model_config: GPTConfig
    num_params: int
    flops_per_token: float
    num_iterations: int
    total_batch_size: int          # tokens per optimizer step, all ranks
    grad_accum_steps: int
    world_size: int
    device_batch_size: int

    @property
    def total_tokens(self) -> int:
        return self.num_iterations * self.total_batch_size

    def describe(self) -> str:
        c = self.model_config
        return "\n".join([
            f"model: d{c.n_layer}, width {c.n_embd}, {c.n_head} heads ({c.n_kv_head} kv) of "
            f"{c.n_embd // c.n_head}, vocab {c.vocab_size:,}, context {c.sequence_len:,}",
            f"parameters: {self.num_params:,}",
            f"FLOPs per token: {self.flops_per_token:.3e}",
            f"batch: {self.total_batch_size:,} tokens per step = {self.world_size} rank(s) x "
            f"{self.device_batch_size} x {c.sequence_len} x {self.grad_accum_steps} accumulation step(s)",
            f"horizon: {self.num_iterations:,} steps, {self.total_tokens:,} tokens "
            f"(tokens : params = {self.total_tokens / self.num_params:.2f})",
            f"total training FLOPs: {self.flops_per_token * self.total_tokens:.3e}",
        ])


def plan_training(cfg: TrainConfig, vocab_size: int, world_size: int = 1) -> TrainPlan:
    """Model size, horizon and accumulation of a run; ValueError for any inconsistency."""
    model_config = validate_config(cfg, world_size)
    model_config = GPTConfig(**{**model_config.to_dict(), "vocab_size": vocab_size})
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    with torch.device("meta"):
        meta_model = GPT(model_config)
    num_params = meta_model.num_params()
    assert num_params == count_params(model_config)
    if cfg.num_iterations > 0:
        num_iterations = cfg.num_iterations
    else:
        num_iterations = int(cfg.target_param_data_ratio * num_params) // cfg.total_batch_size
        if num_iterations < 1:
            raise ValueError(f"--target_param_data_ratio {cfg.target_param_data_ratio} x {num_params:,} parameters "
                             f"is less than one step of {cfg.total_batch_size:,} tokens")
    grad_accum = cfg.total_batch_size // (cfg.device_batch_size * cfg.max_seq_len * world_size)
    return TrainPlan(model_config=model_config, num_params=num_params, flops_per_token=meta_model.estimate_flops(),
                     num_iterations=num_iterations, total_batch_size=cfg.total_batch_size,
                     grad_accum_steps=grad_accum, world_size=world_size, device_batch_size=cfg.device_batch_size)


def build_optimizers(model: GPT, cfg: TrainConfig, world_size: int = 1) -> dict[str, torch.optim.Optimizer]:
    """AdamW (embedding, head) and Muon (block matrices), distributed variants when world_size > 1."""
    groups = model.param_groups()
    width_scale = (model.config.n_embd / 768) ** -0.5   # nanochat tuned the AdamW rates at width 768
    adamw_cls, muon_cls = (DistAdamW, DistMuon) if world_size > 1 else (AdamW, Muon)
    adamw = adamw_cls([{"named": groups["unembedding"], "lr": cfg.unembedding_lr * width_scale},
                       {"named": groups["embedding"], "lr": cfg.embedding_lr * width_scale}],
                      weight_decay=cfg.weight_decay)
    muon = muon_cls(groups["matrix"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum_start)
    for opt in (adamw, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return {"adamw": adamw, "muon": muon}


# ----------------------------------------------------------------------------------------- data
class RowShardedBatches:
    """World-size-independent batches: every rank reads the same stream of whole optimizer steps and trains on
    its own rows of each.

    `step_batches` yields [rows_per_step, T] per optimizer step (rows_per_step = total_batch_size / T); for
    micro-step k, rank r takes slice k * world_size + r of device_batch_size rows. One process with 2
    accumulation steps and two processes with one then see the same global batch, so their losses agree, and
    a run can resume on a different number of ranks. Costs world_size x the tokenization of "documents".
    """

    def __init__(self, step_batches, rank: int, world_size: int, device_batch_size: int, grad_accum_steps: int):
        self.step_batches = step_batches
        self.rank, self.world_size = rank, world_size
        self.b, self.accum = device_batch_size, grad_accum_steps
        self._k = 0
        self._step = None

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._k == 0:
            self._step = next(self.step_batches)
        x, y = self._step
        i = (self._k * self.world_size + self.rank) * self.b
        self._k = (self._k + 1) % self.accum
        return x[i:i + self.b], y[i:i + self.b]

    def state_dict(self) -> dict:
        if self._k:
            raise RuntimeError("RowShardedBatches cursor asked for in the middle of an optimizer step")
        return self.step_batches.state_dict()

    def close(self) -> None:
        if hasattr(self.step_batches, "close"):
            self.step_batches.close()


def make_train_batches(tokenizer, cfg: TrainConfig, plan: TrainPlan, rank: int, world_size: int,
                       device: torch.device | str, files: list[Path], state: dict | None = None, **loader_kwargs):
    """The training batch iterator of this rank for `cfg.data_sharding`, resumed at `state` if given."""
    from nanochat.dataloader import DataLoader

    T = cfg.max_seq_len
    if cfg.data_sharding == "documents":
        return DataLoader(tokenizer, cfg.device_batch_size, T, split="train", device=device, files=files,
                          rank=rank, world_size=world_size, state=state, **loader_kwargs)
    step_rows = plan.total_batch_size // T
    loader = DataLoader(tokenizer, step_rows, T, split="train", device=device, files=files, rank=0,
                        world_size=1, state=state, **loader_kwargs)
    return RowShardedBatches(loader, rank, world_size, cfg.device_batch_size, plan.grad_accum_steps)


# ----------------------------------------------------------------------------------------- the trainer
class DataExhausted(Exception):
    """A rank's training data ran out; the step that hit it was not taken (on any rank)."""


@dataclass
class StepResult:
    step: int                 # optimizer steps done, after this one
    loss: float               # mean training loss of the step over all ranks and micro-steps
    lr_multiplier: float
    tokens: int               # tokens trained so far (all ranks)
    dt: float                 # seconds of this step
    tokens_per_sec: float
    stop: bool = False        # every rank agreed to stop at this step boundary
    grad_norm: float | None = None  # global norm of the averaged gradient before clipping (None: grad_clip 0)


@dataclass
class Trainer:
    """One training run on this rank. Build with `Trainer.create(cfg, plan, dist_info)`."""
    cfg: TrainConfig
    plan: TrainPlan
    dist_info: DistInfo
    model: GPT
    optimizers: dict[str, torch.optim.Optimizer]
    train_batches: Iterator | None = None
    step_count: int = 0               # optimizer steps taken: the schedule's clock
    tokens_trained: int = 0
    stop_event: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def create(cls, cfg: TrainConfig, plan: TrainPlan, dist_info: DistInfo, train_batches=None) -> Trainer:
        device = dist_info.device
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        model = build_model(plan.model_config, device=device, seed=cfg.seed)
        if dist.is_available() and dist.is_initialized():
            for p in model.parameters():   # identical start on every rank, whatever the init kernels did
                dist.broadcast(p.data, 0)
        # an emulated GPU step (benchmarks only) runs no optimizer: none is built (no optimizer state in memory)
        optimizers = {} if cfg.emulate_step_s > 0 else build_optimizers(model, cfg, plan.world_size)
        return cls(cfg=cfg, plan=plan, dist_info=dist_info, model=model, optimizers=optimizers,
                   train_batches=train_batches)

    def __post_init__(self):
        self._emulated_touch_s = 0.0   # benchmarks only: seconds the last emulated step spent changing the weights
        use_compile = self.cfg.compile == "on" or (self.cfg.compile == "auto" and self.device.type == "cuda")
        use_compile = use_compile and self.cfg.emulate_step_s <= 0   # an emulated step runs no forward
        self.forward_model = torch.compile(self.model, dynamic=False) if use_compile else self.model

    # -------------------------------------------------------------- small helpers
    @property
    def device(self) -> torch.device:
        return self.dist_info.device

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def autocast(self):
        if self.device.type == "cuda":
            return torch.amp.autocast(device_type="cuda", dtype=AUTOCAST_DTYPE)
        return nullcontext()

    def lr_multiplier(self, step: int | None = None) -> float:
        cfg = self.cfg
        return lr_multiplier(self.step_count if step is None else step, self.plan.num_iterations,
                             cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)

    def request_stop(self) -> None:
        """Ask to stop at the next step boundary (safe from a signal handler or another thread)."""
        self.stop_event.set()

    def agree(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (a collective; plain value without torchrun)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    # -------------------------------------------------------------- one optimizer step
    def step(self) -> StepResult:
        """Forward/backward over the accumulation micro-steps, then one step of every optimizer.

        Raises DataExhausted (on every rank, with no update taken) when any rank's data ran out.
        """
        if self.train_batches is None:
            raise RuntimeError("Trainer.step: no train_batches set")
        if self.cfg.emulate_step_s > 0:
            return self._emulated_step()
        t0 = time.perf_counter()
        lrm = self.lr_multiplier()
        momentum = muon_momentum(self.step_count, self.cfg.muon_momentum_start, self.cfg.muon_momentum_end,
                                 self.cfg.muon_momentum_warmup_steps)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if "momentum" in group:
                    group["momentum"] = momentum
        accum = self.plan.grad_accum_steps
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        exhausted = False
        for _ in range(accum):
            try:
                x, y = next(self.train_batches)
            except StopIteration:
                exhausted = True
                break
            with self.autocast():
                loss = self.forward_model(x, y)
            loss_sum += loss.detach().float()
            (loss / accum).backward()
        # one collective carries the loss and both stop conditions, before any optimizer collective
        flags = torch.stack([loss_sum / accum,
                             torch.tensor(float(exhausted), device=self.device),
                             torch.tensor(float(self.stop_event.is_set()), device=self.device)])
        if self.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        loss_value, any_exhausted, any_stop = (flags / torch.tensor([self.plan.world_size, 1, 1],
                                                                    device=self.device)).tolist()
        if any_exhausted:
            self.model.zero_grad(set_to_none=True)
            raise DataExhausted(f"training data ran out during step {self.step_count + 1}")
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training loss is {loss_value} at step {self.step_count + 1}; lower the "
                                     f"learning rates or check the data")
        grad_norm = None
        if self.cfg.grad_clip > 0:
            grad_norm = self._clipped_step(self.cfg.grad_clip)
        else:
            for opt in self.optimizers.values():
                opt.step()
        self.model.zero_grad(set_to_none=True)
        self.step_count += 1
        self.tokens_trained += self.plan.total_batch_size
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return StepResult(step=self.step_count, loss=loss_value, lr_multiplier=lrm, tokens=self.tokens_trained,
                          dt=dt, tokens_per_sec=self.plan.total_batch_size / dt, stop=any_stop > 0,
                          grad_norm=None if grad_norm is None else float(grad_norm))

    @torch.no_grad()
    def _emulated_step(self) -> StepResult:
        """BENCHMARKS ONLY (cfg.emulate_step_s > 0): a stand-in for a GPU step that takes exactly emulate_step_s.

        What stays real: the data loader advances by one optimizer step's batch (every micro-step of every rank,
        so cursors and the ledger's accounting are those of a real step); the one all-reduce of (loss, "a rank ran
        out of data", "stop requested") happens at the same place relative to the update as in a real step, so
        stops and exhaustion behave as they do in training; the schedule's clock and the token count advance.
        What is emulated: no forward/backward, no optimizer; instead every floating-point tensor gets a tiny
        step-dependent constant added to one slice of it (EMULATE_SLICES), so every round's update is a real,
        non-zero payload. The loss reported is 0.0 (a label, not a measurement). The step sleeps what remains of
        emulate_step_s: the stop flag is read when the step's remaining work is what the weight change costs,
        as a real step reads it before its optimizer step.
        """
        target = self.cfg.emulate_step_s
        t0 = time.perf_counter()
        lrm = self.lr_multiplier()
        exhausted = False
        for _ in range(self.plan.grad_accum_steps):
            try:
                next(self.train_batches)
            except StopIteration:
                exhausted = True
                break
        # the "compute": wait until only the weight change is left of the step
        remaining = target - self._emulated_touch_s - (time.perf_counter() - t0)
        if remaining > 0:
            time.sleep(remaining)
        flags = torch.tensor([0.0, float(exhausted), float(self.stop_event.is_set())], device=self.device)
        if self.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        _, any_exhausted, any_stop = flags.tolist()
        if any_exhausted:
            raise DataExhausted(f"training data ran out during step {self.step_count + 1}")
        t_touch = time.perf_counter()
        delta = EMULATE_DELTA * (1 + self.step_count % 3)
        part = self.step_count % EMULATE_SLICES
        for p in self.model.parameters():
            if p.is_floating_point():
                flat = p.data.view(-1)
                size = -(-flat.numel() // EMULATE_SLICES)
                chunk = flat[part * size:(part + 1) * size]
                # a tensor with fewer elements than slices: its first element where its slice is empty
                (chunk if chunk.numel() else flat[:1]).add_(delta)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._emulated_touch_s = time.perf_counter() - t_touch
        remaining = target - (time.perf_counter() - t0)
        if remaining > 0:
            time.sleep(remaining)
        self.step_count += 1
        self.tokens_trained += self.plan.total_batch_size
        dt = time.perf_counter() - t0
        return StepResult(step=self.step_count, loss=0.0, lr_multiplier=lrm, tokens=self.tokens_trained, dt=dt,
                          tokens_per_sec=self.plan.total_batch_size / dt, stop=any_stop > 0)

    def _clipped_step(self, max_norm: float) -> torch.Tensor:
        """Every optimizer's step with the gradient scaled to global norm <= max_norm; returns the norm before.

        The norm is that of the gradient the optimizers apply: averaged over ranks, across Muon and AdamW
        together (as torch.nn.utils.clip_grad_norm_ over all parameters in one process). Under torchrun the
        averaging happens inside DistMuon/DistAdamW (a reduce-scatter: each rank then holds the averaged
        gradient of the matrices / flat shards it updates, disjoint across ranks). Clipping p.grad before
        step() would clip each rank's local gradient by its own norm, which differs between ranks and is not
        the averaged gradient's. So the step is split: reduce_grads() completes each optimizer's collective,
        every rank sums the squares of the averaged pieces it holds, one scalar all-reduce gives the global
        squared norm (the same value on every rank), and step(reduced=..., grad_scale=...) updates with the
        scaled pieces. No extra gradient traffic; the cost is that updates no longer overlap the reduce-scatter.
        A non-finite norm raises FloatingPointError on every rank with no update taken.
        """
        reduced = {name: opt.reduce_grads() for name, opt in self.optimizers.items()}
        norms = [torch.linalg.vector_norm(g.detach(), dtype=torch.float32)
                 for name, opt in self.optimizers.items() for g in opt.held_grads(reduced[name])]
        sq = torch.stack(norms).square().sum() if norms else torch.zeros((), device=self.device)
        if self.distributed:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM)
        norm = sq.sqrt()
        if not math.isfinite(norm.item()):
            self.model.zero_grad(set_to_none=True)
            raise FloatingPointError(f"gradient norm is {norm.item()} at step {self.step_count + 1}; no update "
                                     f"taken")
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for name, opt in self.optimizers.items():
            opt.step(reduced=reduced[name], grad_scale=scale)
        return norm

    # -------------------------------------------------------------- evaluation
    def evaluate_bpb(self, val_batches, steps: int, token_bytes: torch.Tensor) -> float:
        from nanochat.loss_eval import evaluate_bpb

        self.model.eval()
        try:
            with self.autocast():
                return evaluate_bpb(self.forward_model, val_batches, steps, token_bytes)
        finally:
            self.model.train()

    def mfu(self, tokens_per_sec: float) -> float | None:
        """Model FLOPs utilisation in percent on a known GPU, None elsewhere."""
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        if peak is None:
            return None
        return 100.0 * self.plan.flops_per_token * tokens_per_sec / (peak * self.plan.world_size)

    # -------------------------------------------------------------- weights (for a federated site)
    def get_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the model's parameters, by name."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Overwrite the model's parameters in place (optimizer state, step and data cursor are kept)."""
        own = self.model.state_dict()
        if set(weights) != set(own):
            missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
            raise ValueError(f"set_weights: names differ from the model's (missing {missing[:3]}, extra {extra[:3]})")
        for k, v in weights.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"set_weights: {k} has shape {tuple(v.shape)}, the model's is {tuple(own[k].shape)}")
        for k, v in weights.items():
            own[k].copy_(v)

    # -------------------------------------------------------------- checkpoints
    def data_cursors(self) -> list[dict] | None:
        """Every rank's data cursor, in rank order (a collective); None if the batches have none."""
        mine = self.train_batches.state_dict() if hasattr(self.train_batches, "state_dict") else None
        if not self.distributed:
            return None if mine is None else [mine]
        device = self.device if dist.get_backend() == "nccl" else "cpu"
        everyone = all_gather_json(mine, device)   # JSON, never pickle, between ranks
        return None if any(c is None for c in everyone) else everyone

    def save_checkpoint(self, checkpoint_dir: Path | str, keep: int | None = None,
                        extra_meta: dict | None = None) -> Path:
        """Write step_NNNNNN under checkpoint_dir (a collective: every rank calls it, rank 0 writes)."""
        optim_state = {}
        for name, opt in self.optimizers.items():
            for key, t in opt.state_tensors().items():
                optim_state[f"{name}/{key}"] = t
        cursors = self.data_cursors()
        path = Path(checkpoint_dir) / ckpt.step_dir_name(self.step_count)
        if self.dist_info.rank == 0:
            meta = {
                "step": self.step_count,
                "tokens": self.tokens_trained,
                "model_config": self.plan.model_config.to_dict(),
                "train_config": asdict(self.cfg),
                "num_iterations": self.plan.num_iterations,
                "world_size": self.plan.world_size,
                "data_sharding": self.cfg.data_sharding,
                "data_cursors": cursors,
                **(extra_meta or {}),
            }
            path = ckpt.save_checkpoint(checkpoint_dir, self.step_count, self.model.state_dict(), optim_state,
                                        meta, keep=keep)
        if self.distributed:
            dist.barrier()
        return path

    def load_checkpoint(self, path: Path | str) -> dict:
        """Restore model, optimizer state, step and tokens (every rank reads); returns the meta. The caller
        rebuilds the data iterator from `data_cursor_for_rank(meta)`."""
        model_state, optim_state, meta = ckpt.load_checkpoint(path, device=self.device)
        if meta["model_config"] != self.plan.model_config.to_dict():
            raise ValueError(f"{path}: checkpoint model {meta['model_config']} differs from this run's "
                             f"{self.plan.model_config.to_dict()}")
        self.model.load_state_dict(model_state, strict=True)
        for name, opt in self.optimizers.items():
            prefix = f"{name}/"
            opt.load_state_tensors({k[len(prefix):]: v for k, v in optim_state.items() if k.startswith(prefix)})
        unknown = [k for k in optim_state if k.split("/", 1)[0] not in self.optimizers]
        if unknown:
            raise ValueError(f"{path}: optimizer state for unknown optimizers: {unknown[:3]}")
        self.step_count, self.tokens_trained = int(meta["step"]), int(meta["tokens"])
        return meta

    def data_cursor_for_rank(self, meta: dict) -> dict | None:
        """This rank's data cursor from a checkpoint's meta (ValueError if it cannot resume exactly here)."""
        cursors = meta.get("data_cursors")
        if not cursors:
            return None
        if meta.get("data_sharding", "documents") != self.cfg.data_sharding:
            raise ValueError(f"checkpoint used --data_sharding {meta.get('data_sharding')}, this run "
                             f"{self.cfg.data_sharding}: resume with the same sharding")
        if self.cfg.data_sharding == "rows":
            return cursors[0]
        if len(cursors) != self.plan.world_size:
            raise ValueError(f"checkpoint was written by {len(cursors)} rank(s) reading their own documents; "
                             f"resume with {len(cursors)} rank(s) (or use --data_sharding rows runs, which resume "
                             f"on any number)")
        return cursors[self.dist_info.rank]


@dataclass
class LoopOutcome:
    reason: str               # "horizon", "data" (ran out), "stop" (stop requested) or "done" (nothing to do)
    step: int
    last_loss: float | None
    val_bpb: float | None
    checkpoint: Path | None


def train_loop(trainer: Trainer, checkpoint_dir: Path | str | None, save_every: int = -1, keep: int | None = 2,
               eval_every: int = -1, evaluate=None, on_step=None, log=print0) -> LoopOutcome:
    """Train until the horizon, the end of the data or an agreed stop; checkpoint every `save_every` steps and
    at the end (any of the three). `evaluate()` -> val bpb runs at step 0 of a fresh run, every `eval_every`
    steps and at the horizon; `on_step(result, val_bpb)` sees every step (metrics, wandb)."""
    plan = trainer.plan
    horizon = plan.num_iterations
    reason, last_loss, val_bpb, path = "done", None, None, None
    if trainer.step_count >= horizon:
        log(f"step {trainer.step_count} is at the horizon ({horizon}): nothing to train")
        return LoopOutcome(reason, trainer.step_count, None, None, None)
    if evaluate is not None and eval_every > 0 and trainer.step_count == 0:
        val_bpb = evaluate()
        log(f"step {0:05d} | val bpb {val_bpb:.4f}")
    dts: list[float] = []
    while trainer.step_count < horizon:
        try:
            result = trainer.step()
        except DataExhausted as e:
            reason = "data"
            log(f"{e}: stopping at step {trainer.step_count}")
            break
        last_loss = result.loss
        dts.append(result.dt)
        recent = dts[-20:] if len(dts) > 1 else dts
        eta = (sum(recent) / len(recent)) * (horizon - result.step)
        log(format_progress(result, horizon, eta, trainer.mfu(result.tokens_per_sec)))
        step_bpb = None
        at_horizon = result.step == horizon
        if evaluate is not None and eval_every > 0 and not result.stop and (result.step % eval_every == 0 or at_horizon):
            step_bpb = val_bpb = evaluate()
            log(f"step {result.step:05d} | val bpb {val_bpb:.4f}")
        if on_step is not None:
            on_step(result, step_bpb)
        if result.stop:
            reason = "stop"
            log(f"stop requested: stopping at the step {result.step} boundary")
            break
        if at_horizon:
            reason = "horizon"
        elif checkpoint_dir is not None and save_every > 0 and result.step % save_every == 0:
            path = trainer.save_checkpoint(checkpoint_dir, keep=keep)
            log(f"saved {path}")
    if checkpoint_dir is not None:
        path = trainer.save_checkpoint(checkpoint_dir, keep=keep)
        log(f"saved {path}")
    return LoopOutcome(reason, trainer.step_count, last_loss, val_bpb, path)


def format_progress(result: StepResult, num_iterations: int, eta_s: float | None, mfu: float | None) -> str:
    pct = 100.0 * result.step / num_iterations
    parts = [f"step {result.step:05d}/{num_iterations:05d} ({pct:5.1f}%)", f"loss {result.loss:.6f}",
             f"lrm {result.lr_multiplier:.3f}", f"dt {result.dt * 1000:.0f}ms", f"tok/s {result.tokens_per_sec:,.0f}"]
    if result.grad_norm is not None:
        parts.append(f"gnorm {result.grad_norm:.3f}")
    if mfu is not None:
        parts.append(f"mfu {mfu:.1f}%")
    if eta_s is not None:
        parts.append(f"eta {eta_s / 60:.1f}m")
    return " | ".join(parts)


__all__ = ["TrainConfig", "TrainPlan", "Trainer", "StepResult", "DataExhausted", "RowShardedBatches",
           "lr_multiplier", "muon_momentum", "validate_config", "plan_training", "build_optimizers",
           "make_train_batches", "format_progress", "train_loop", "LoopOutcome", "print0"]
