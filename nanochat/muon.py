"""Muon: momentum SGD whose update is orthogonalised by a Newton-Schulz iteration, for 2-D matrices.

Muon keeps one momentum buffer per matrix, takes the (Nesterov) momentum direction, replaces it by the
nearest semi-orthogonal matrix (approximately: all singular values pushed towards 1 by five steps of a quintic
Newton-Schulz iteration) and steps along it, scaled up for tall matrices. DistMuon averages gradients and
splits the orthogonalisation work: matrices of one shape are taken world_size at a time, a reduce-scatter
gives each rank the averaged gradient of the one matrix it owns, the owner updates it, and an all-gather
hands every rank the result. Same arithmetic as Muon on the averaged gradient, so the two agree exactly up
to the order of the gradient sum.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nanochat.adamw import world

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic coefficients that maximise the slope at zero (Keller Jordan)
NS_STEPS = 5
MOMENTUM = 0.95


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = NS_STEPS,
                                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately orthogonalise G [..., m, n] (U V^T of its SVD, singular values ~[0.7, 1.2]).

    Runs in bf16 on CUDA (fast, and the iteration tolerates it) and fp32 elsewhere (CPUs without native bf16
    are slower in it, not faster). Returns a tensor of the compute dtype.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: X @ X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X


def muon_update(grad: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool, ns_steps: int) -> torch.Tensor:
    """Advance the momentum buffer in place and return the orthogonalised update direction."""
    buf.lerp_(grad, 1 - momentum)
    direction = grad.lerp(buf, momentum) if nesterov else buf
    return zeropower_via_newtonschulz5(direction, steps=ns_steps)


def _apply(p: torch.Tensor, update: torch.Tensor, group: dict) -> None:
    lr, wd = group["lr"], group["weight_decay"]
    if wd:
        p.mul_(1 - lr * wd)
    scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5  # tall matrices: keep the per-element RMS of the step
    p.add_(update.to(p.dtype), alpha=-lr * scale)


class Muon(torch.optim.Optimizer):
    """named: [(name, matrix)]; matrices are grouped by shape (DistMuon batches each shape across ranks)."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], lr: float = 0.02, momentum: float = MOMENTUM,
                 nesterov: bool = True, ns_steps: int = NS_STEPS, weight_decay: float = 0.0):
        for name, p in named:
            if p.ndim != 2:
                raise ValueError(f"Muon takes 2-D matrices; {name} has shape {tuple(p.shape)}")
        shapes: dict[tuple, list] = {}
        for name, p in named:
            shapes.setdefault(tuple(p.shape), []).append((name, p))
        groups = [{"params": [p for _, p in ps], "names": [n for n, _ in ps]} for ps in shapes.values()]
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))

    def named_params(self):
        for group in self.param_groups:
            for name, p in zip(group["names"], group["params"], strict=True):
                yield group, name, p

    def _buffer(self, p: torch.Tensor) -> torch.Tensor:
        st = self.state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p)
        return st["momentum_buffer"]

    def reduce_grads(self) -> list:
        """The first half of step() for a caller that needs the averaged gradient before any update (global-norm
        clipping), to hand back as step(reduced=...). One process: the gradients as they are (DistMuon: each
        owner's averaged matrices, after the collective)."""
        return [(group, p, p.grad) for group in self.param_groups for p in group["params"] if p.grad is not None]

    def held_grads(self, reduced: list) -> list[torch.Tensor]:
        """The gradient tensors of `reduced` that this rank holds: disjoint across ranks, together the whole
        averaged gradient (so the squared norms summed over ranks are the global squared norm)."""
        return [grad for _, _, grad in reduced]

    @torch.no_grad()
    def step(self, closure=None, *, reduced: list | None = None, grad_scale: torch.Tensor | float | None = None):
        """One update. reduced: from reduce_grads() (else taken now); grad_scale: multiplies the gradients
        first, in place (the clipping coefficient)."""
        for group, p, grad in (self.reduce_grads() if reduced is None else reduced):
            if grad_scale is not None:
                grad.mul_(grad_scale)
            update = muon_update(grad, self._buffer(p), group["momentum"], group["nesterov"], group["ns_steps"])
            _apply(p, update, group)

    # ------------------------------------------------------------------ state save/restore
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """{"<param name>.momentum_buffer": CPU tensor} for every matrix that has stepped."""
        return {f"{name}.momentum_buffer": self.state[p]["momentum_buffer"].detach().to("cpu", copy=True)
                for _, name, p in self.named_params() if "momentum_buffer" in self.state.get(p, {})}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        params = {name: p for _, name, p in self.named_params()}
        self.state.clear()
        for key, t in tensors.items():
            name, _, what = key.rpartition(".")
            if name not in params or what != "momentum_buffer":
                raise ValueError(f"Muon state has {key!r}, which matches no matrix of this optimizer")
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(f"Muon state {key} has shape {tuple(t.shape)}, expected {tuple(params[name].shape)}")
            if self._owns(name):
                p = params[name]
                self.state[p]["momentum_buffer"] = t.to(p.device, p.dtype).clone()

    def _owns(self, name: str) -> bool:
        return True


class DistMuon(Muon):
    """Muon with gradient averaging and the orthogonalisation split across the ranks of the default group.

    Matrix i of a shape group (in order) belongs to rank i % world_size: only the owner keeps its momentum
    buffer and runs its Newton-Schulz iteration.
    """

    def _owner(self) -> dict[str, int]:
        _, ws = world()
        return {name: i % ws for group in self.param_groups for i, name in enumerate(group["names"])}

    def _owns(self, name: str) -> bool:
        return self._owner()[name] == world()[0]

    def _reduce_scatter(self) -> list:
        """Starts the averaging reduce-scatter of every chunk: [(group, chunk, mine, work)]."""
        rank, ws = world()
        scatters = []
        for group in self.param_groups:
            params = group["params"]
            for base in range(0, len(params), ws):
                chunk = params[base:base + ws]
                for j, p in enumerate(chunk):
                    if p.grad is None:
                        raise RuntimeError(f"DistMuon: {group['names'][base + j]} has no gradient on rank {rank}; "
                                           f"every rank must produce every gradient")
                grads = [p.grad for p in chunk] + [torch.zeros_like(chunk[0]) for _ in range(ws - len(chunk))]
                mine = torch.empty_like(chunk[0])
                work = dist.reduce_scatter(mine, grads, op=dist.ReduceOp.AVG, async_op=True)
                scatters.append((group, chunk, mine, work))
        return scatters

    def reduce_grads(self) -> list:
        """The averaging collective of step(), completed: each rank holds the averaged matrices it owns."""
        scatters = self._reduce_scatter()
        for *_, work in scatters:
            work.wait()
        return [(group, chunk, mine, None) for group, chunk, mine, _ in scatters]

    def held_grads(self, reduced: list) -> list[torch.Tensor]:
        rank, _ = world()
        return [mine for _, chunk, mine, _ in reduced if rank < len(chunk)]   # padding slots hold zeros

    @torch.no_grad()
    def step(self, closure=None, *, reduced: list | None = None, grad_scale: torch.Tensor | float | None = None):
        # without `reduced`, each update waits only for its own reduce-scatter (communication overlaps updates)
        rank, ws = world()
        scatters = self._reduce_scatter() if reduced is None else reduced
        gathers = []
        for group, chunk, mine, work in scatters:
            if work is not None:
                work.wait()
            if rank < len(chunk):
                p = chunk[rank]
                if grad_scale is not None:
                    mine.mul_(grad_scale)
                update = muon_update(mine, self._buffer(p), group["momentum"], group["nesterov"], group["ns_steps"])
                _apply(p, update, group)
                src = p.detach()
            else:  # padding slot: this rank owns no matrix in this chunk
                src = torch.zeros_like(chunk[0])
            outs = [p.detach() for p in chunk] + [torch.empty_like(chunk[0]) for _ in range(ws - len(chunk))]
            gathers.append(dist.all_gather(outs, src, async_op=True))
        for work in gathers:
            work.wait()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Gathers each owner's buffers (a collective: call it on all ranks) into Muon's full form."""
        rank, ws = world()
        out = {}
        for group in self.param_groups:
            params, names = group["params"], group["names"]
            for base in range(0, len(params), ws):
                chunk = params[base:base + ws]
                have = torch.tensor([1 if rank >= len(chunk) or "momentum_buffer" in self.state.get(chunk[rank], {})
                                     else 0], device=chunk[0].device)
                dist.all_reduce(have, op=dist.ReduceOp.MIN)
                if not have.item():
                    continue
                src = (self.state[chunk[rank]]["momentum_buffer"] if rank < len(chunk)
                       else torch.zeros_like(chunk[0]))
                outs = [torch.empty_like(chunk[0]) for _ in range(ws)]
                dist.all_gather(outs, src)
                for j in range(len(chunk)):
                    out[f"{names[base + j]}.momentum_buffer"] = outs[j].to("cpu", copy=True)
        return out
