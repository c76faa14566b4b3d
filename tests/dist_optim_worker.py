"""Run under torchrun (gloo): DistMuon/DistAdamW against Muon/AdamW on the averaged gradient.

Every rank draws the same initial parameters and its own gradients (seeded by rank), so rank 0 can replay the
single-process optimizers on the exact average. Writes a JSON report to argv[1] from rank 0.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from nanochat.adamw import AdamW, DistAdamW
from nanochat.muon import DistMuon, Muon

STEPS = 4
# Three matrices of one shape (ws=2: the second chunk is padded), a tall one, and for AdamW tensors whose
# element counts do not divide by the world size.
MATRIX_SHAPES = {"a0": (16, 24), "a1": (16, 24), "a2": (16, 24), "tall": (40, 8)}
ADAM_SHAPES = {"emb": (37, 8), "head": (8, 37), "scalar": (1,)}


def make_params(shapes: dict[str, tuple]) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen))) for n, s in shapes.items()]


def grads_for(rank: int, step: int, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return {n: torch.randn(s, generator=gen) for n, s in shapes.items()}


def run(opt, named, shapes, ranks, steps, momentum_schedule=False):
    """Step `opt` with the mean of the given ranks' gradients (one rank: its own)."""
    for step in range(steps):
        gs = [grads_for(r, step, shapes) for r in ranks]
        for n, p in named:
            p.grad = torch.stack([g[n] for g in gs]).mean(0) if len(gs) > 1 else gs[0][n]
        if momentum_schedule:
            for group in opt.param_groups:
                group["momentum"] = 0.85 + 0.02 * step
        opt.step()


def reset_momentum(opt) -> None:
    for group in opt.param_groups:
        if "momentum" in group:
            group["momentum"] = 0.95


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    report = {}
    for kind, shapes, single_cls, dist_cls, make in (
        ("muon", MATRIX_SHAPES, Muon, DistMuon, lambda named, cls: cls(named, lr=0.05)),
        ("adamw", ADAM_SHAPES, AdamW, DistAdamW,
         lambda named, cls: cls([{"named": named[:2], "lr": 0.01}, {"named": named[2:], "lr": 0.003}],
                                weight_decay=0.1)),
    ):
        named_d = make_params(shapes)
        opt_d = make(named_d, dist_cls)
        run(opt_d, named_d, shapes, [rank], STEPS, momentum_schedule=kind == "muon")
        state_d = opt_d.state_tensors()  # collective
        # resume: a fresh distributed optimizer loads the gathered state and continues
        named_r = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named_d]
        opt_r = make(named_r, dist_cls)
        opt_r.load_state_tensors(state_d)
        for opt, named in ((opt_d, named_d), (opt_r, named_r)):
            reset_momentum(opt)  # hyperparameters belong to the schedule, not to the saved state
            for step in range(STEPS, STEPS + 2):
                g = grads_for(rank, step, shapes)
                for n, p in named:
                    p.grad = g[n]
                opt.step()
        if rank == 0:
            named_s = make_params(shapes)
            opt_s = make(named_s, single_cls)
            run(opt_s, named_s, shapes, list(range(ws)), STEPS, momentum_schedule=kind == "muon")
            state_s = opt_s.state_tensors()
            reset_momentum(opt_s)
            params_after_state = {n: p.detach().clone() for n, p in named_s}
            for step in range(STEPS, STEPS + 2):
                gs = [grads_for(r, step, shapes) for r in range(ws)]
                for n, p in named_s:
                    p.grad = torch.stack([g[n] for g in gs]).mean(0)
                opt_s.step()
            report[kind] = {
                "state_keys_equal": sorted(state_d) == sorted(state_s),
                "state_diff": max_diff(state_d, state_s),
                "param_diff": max_diff({n: p.detach() for n, p in named_d}, {n: p.detach() for n, p in named_s}),
                "resumed_vs_uninterrupted": max_diff({n: p.detach() for n, p in named_r},
                                                     {n: p.detach() for n, p in named_d}),
                "moved": max_diff({n: p.detach() for n, p in named_s}, params_after_state),
                "ranks_agree": True,
            }
        # every rank holds the same parameters after the all-gathers
        flat = torch.cat([p.detach().reshape(-1) for _, p in named_d])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        same = torch.tensor([int(torch.equal(flat, ref))])
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        if rank == 0:
            report[kind]["ranks_agree"] = bool(same.item())
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
