"""AdamW for the embedding, the head and any other non-matrix parameters, single-process and distributed.

Both classes run the same elementwise update (torch's functional AdamW, fused where the device has it), so a
DistAdamW that updates 1/world_size of every tensor on each rank is exact against AdamW on the averaged
gradient. DistAdamW shards by flat element: reduce-scatter the gradients (average), update the local shard
and its moments, all-gather the parameters back. Optimizer state (moments, step) is sharded across ranks too;
`state_tensors()` gathers it into the same full, world-size-independent form that AdamW produces, so a
checkpoint written under 4 ranks loads under 1 and vice versa.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw as adamw_functional

BETAS = (0.8, 0.95)   # nanochat: a short first-moment memory suits the embeddings' sparse updates
EPS = 1e-10


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _fused_ok(p: torch.Tensor) -> bool:
    return p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) and p.device.type in ("cpu", "cuda")


def _adamw_update(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], group: dict) -> None:
    """One AdamW step on parallel lists; `states` hold exp_avg, exp_avg_sq and a float32 step tensor."""
    if not params:
        return
    beta1, beta2 = group["betas"]
    adamw_functional(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                     [s["step"] for s in states], foreach=False, fused=all(_fused_ok(p) for p in params),
                     amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                     weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def _new_state(like: torch.Tensor) -> dict:
    return {"step": torch.zeros((), dtype=torch.float32, device=like.device),
            "exp_avg": torch.zeros_like(like), "exp_avg_sq": torch.zeros_like(like)}


STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


class AdamW(torch.optim.Optimizer):
    """groups: [{"named": [(name, param), ...], "lr": ..., ...}]; names key the saved state."""

    def __init__(self, groups: list[dict], lr: float = 1e-3, betas: tuple[float, float] = BETAS,
                 eps: float = EPS, weight_decay: float = 0.0):
        param_groups = []
        for g in groups:
            g = dict(g)
            named = g.pop("named")
            param_groups.append({**g, "params": [p for _, p in named], "names": [n for n, _ in named]})
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def named_params(self):
        for group in self.param_groups:
            for name, p in zip(group["names"], group["params"], strict=True):
                yield group, name, p

    def reduce_grads(self) -> list:
        """The first half of step() for a caller that needs the averaged gradient before any update (global-norm
        clipping): the gradients as this optimizer will apply them, to hand back as step(reduced=...). One
        process: the gradients as they are (DistAdamW: the averaged shards, after the collective)."""
        return [(group, p, p.grad) for group in self.param_groups for p in group["params"] if p.grad is not None]

    def held_grads(self, reduced: list) -> list[torch.Tensor]:
        """The gradient tensors of `reduced` that this rank holds: disjoint across ranks, together the whole
        averaged gradient (so the squared norms summed over ranks are the global squared norm)."""
        return [grad for _, _, grad in reduced]

    @torch.no_grad()
    def step(self, closure=None, *, reduced: list | None = None, grad_scale: torch.Tensor | float | None = None):
        """One update. reduced: from reduce_grads() (else taken now); grad_scale: multiplies the gradients
        first, in place (the clipping coefficient)."""
        grads_of = {id(p): grad for _, p, grad in (self.reduce_grads() if reduced is None else reduced)}
        for group in self.param_groups:
            params, grads, states = [], [], []
            for p in group["params"]:
                grad = grads_of.get(id(p))
                if grad is None:
                    continue
                if grad_scale is not None:
                    grad.mul_(grad_scale)
                if p not in self.state or not self.state[p]:
                    self.state[p] = _new_state(p)
                params.append(p)
                grads.append(grad)
                states.append(self.state[p])
            _adamw_update(params, grads, states, group)

    # ------------------------------------------------------------------ state save/restore
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Full optimizer state as {"<param name>.<key>": CPU tensor}; params never stepped are absent."""
        out = {}
        for _, name, p in self.named_params():
            st = self.state.get(p)
            if st:
                for key in STATE_KEYS:
                    out[f"{name}.{key}"] = st[key].detach().to("cpu", copy=True)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        full = _split_state(tensors, {name: p for _, name, p in self.named_params()}, STATE_KEYS)
        self.state.clear()
        for _, name, p in self.named_params():
            if name in full:
                self.state[p] = {k: v.to(p.device, dtype=torch.float32 if k == "step" else p.dtype, copy=True)
                                 for k, v in full[name].items()}


def _split_state(tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
                 keys: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Group "<name>.<key>" tensors by parameter, checking names, keys and shapes."""
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for full_key, t in tensors.items():
        name, _, key = full_key.rpartition(".")
        if name not in params or key not in keys:
            raise ValueError(f"optimizer state has {full_key!r}, which matches no parameter/key of this optimizer "
                             f"(parameters {sorted(params)[:4]}..., keys {keys})")
        by_param.setdefault(name, {})[key] = t
    for name, st in by_param.items():
        if set(st) != set(keys):
            raise ValueError(f"optimizer state for {name} has keys {sorted(st)}, expected {sorted(keys)}")
        for key, t in st.items():
            expected = () if key == "step" else tuple(params[name].shape)
            if tuple(t.shape) != expected:
                raise ValueError(f"optimizer state {name}.{key} has shape {tuple(t.shape)}, expected {expected}")
    return by_param


class DistAdamW(AdamW):
    """AdamW with gradient averaging and the update sharded across the ranks of the default process group.

    Call it where AdamW would be called, after backward on every rank (there is no DDP wrapper: this optimizer
    does the gradient all-reduce, as a reduce-scatter, itself). Any tensor shape works: tensors are sharded
    by flat element and padded to a multiple of the world size.
    """

    def _shard(self, p: torch.Tensor) -> tuple[int, int, int]:
        rank, ws = world()
        chunk = math.ceil(p.numel() / ws)
        lo = min(rank * chunk, p.numel())
        hi = min(lo + chunk, p.numel())
        return chunk, lo, hi

    def _reduce_scatter(self) -> list:
        """Starts the averaging reduce-scatter of every gradient: [(group, p, chunk, lo, hi, grad_shard, work)]."""
        rank, ws = world()
        pending = []
        for group, name, p in self.named_params():
            if p.grad is None:
                raise RuntimeError(f"DistAdamW: {name} has no gradient on rank {rank}; every rank must "
                                   f"produce every gradient or the collectives would mismatch")
            chunk, lo, hi = self._shard(p)
            grad = p.grad.reshape(-1)
            if grad.numel() != chunk * ws:
                grad = torch.cat([grad, grad.new_zeros(chunk * ws - grad.numel())])
            grad_shard = grad.new_empty(chunk)
            work = dist.reduce_scatter_single(grad_shard, grad, op=dist.ReduceOp.AVG, async_op=True)
            pending.append((group, p, chunk, lo, hi, grad_shard, work))
        return pending

    def reduce_grads(self) -> list:
        """The averaging collective of step(), completed: every rank holds its shard of the averaged gradient."""
        pending = self._reduce_scatter()
        for *_, work in pending:
            work.wait()
        return [(*entry[:-1], None) for entry in pending]

    def held_grads(self, reduced: list) -> list[torch.Tensor]:
        return [grad_shard[:hi - lo] for _, _, _, lo, hi, grad_shard, _ in reduced]

    @torch.no_grad()
    def step(self, closure=None, *, reduced: list | None = None, grad_scale: torch.Tensor | float | None = None):
        # without `reduced`, each update waits only for its own reduce-scatter (communication overlaps updates)
        rank, ws = world()
        pending = self._reduce_scatter() if reduced is None else reduced
        gathers = []
        for group, p, chunk, lo, hi, grad_shard, work in pending:
            if work is not None:
                work.wait()
            if grad_scale is not None:
                grad_shard.mul_(grad_scale)
            flat = p.detach().view(-1)
            st = self.state.get(p)
            if not st:
                st = self.state[p] = _new_state(flat[lo:hi])
            if hi > lo:
                _adamw_update([flat[lo:hi]], [grad_shard[:hi - lo]], [st], group)
            else:  # a tensor smaller than the world: this rank owns none of it, but counts the step
                st["step"] += 1
            if p.numel() == chunk * ws:
                work = dist.all_gather_single(flat, flat[lo:lo + chunk], async_op=True)
                gathers.append((work, None, None))
            else:
                mine = flat.new_zeros(chunk)
                mine[:hi - lo] = flat[lo:hi]
                full = flat.new_empty(chunk * ws)
                work = dist.all_gather_single(full, mine, async_op=True)
                gathers.append((work, flat, full))
        for work, flat, full in gathers:
            work.wait()
            if flat is not None:
                flat.copy_(full[:flat.numel()])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Gathers every rank's shards (a collective: call it on all ranks) into AdamW's full form."""
        rank, ws = world()
        out = {}
        for _, name, p in self.named_params():
            st = self.state.get(p)
            have = torch.tensor([1 if st else 0], dtype=torch.int64, device=p.device)
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
            if not have.item():
                continue
            chunk, lo, hi = self._shard(p)
            out[f"{name}.step"] = st["step"].detach().to("cpu", copy=True)
            for key in ("exp_avg", "exp_avg_sq"):
                mine = p.new_zeros(chunk)
                mine[:hi - lo] = st[key]
                full = p.new_empty(chunk * ws)
                dist.all_gather_single(full, mine)
                out[f"{name}.{key}"] = full[:p.numel()].view_as(p).to("cpu", copy=True)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        full = _split_state(tensors, {name: p for _, name, p in self.named_params()}, STATE_KEYS)
        self.state.clear()
        for _, name, p in self.named_params():
            if name not in full:
                continue
            _, lo, hi = self._shard(p)
            st = full[name]
            self.state[p] = {
                "step": st["step"].to(p.device, torch.float32, copy=True),
                "exp_avg": st["exp_avg"].reshape(-1)[lo:hi].to(p.device, p.dtype).clone(),
                "exp_avg_sq": st["exp_avg_sq"].reshape(-1)[lo:hi].to(p.device, p.dtype).clone(),
            }
