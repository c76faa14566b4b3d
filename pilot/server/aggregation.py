"""Averaging the sites' work into the global model, and the outer optimizer (DiLoCo).

A site starts a round from the global weights G and trains them to L; it hands in its pseudo-gradient
D = G - L and the number of tokens it trained. The server averages the pseudo-gradients weighted by tokens
and applies an outer step:

    none:      G <- G - mean(D)                       (plain federated averaging of the weights)
    nesterov:  m <- mu * m + mean(D);  G <- G - lr * (mean(D) + mu * m)     (DiLoCo's outer Nesterov)

An update with NaN/Inf, a missing or unknown tensor, or a wrong shape is rejected (and logged by the
caller), never averaged in; a site that trained no tokens carries no weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

OUTER_OPTIMIZERS = ("none", "nesterov")
DEFAULT_OUTER_LR = 0.7
DEFAULT_OUTER_MOMENTUM = 0.9

Tensors = Mapping[str, torch.Tensor]


class RejectedUpdate(ValueError):
    """An update that must not be averaged in; the message says why."""


def check_update(update: Tensors, reference: Tensors, tokens: int) -> None:
    """Raise RejectedUpdate unless `update` matches `reference` tensor for tensor and is finite."""
    if tokens < 0:
        raise RejectedUpdate(f"negative token count {tokens}")
    missing = sorted(set(reference) - set(update))
    unknown = sorted(set(update) - set(reference))
    if missing or unknown:
        raise RejectedUpdate(f"tensor names differ: missing {missing[:5]}, unknown {unknown[:5]}")
    for name, ref in reference.items():
        got = update[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise RejectedUpdate(f"{name}: shape {list(got.shape)}, expected {list(ref.shape)}")
        if not got.is_floating_point():
            raise RejectedUpdate(f"{name}: dtype {got.dtype} is not floating point")
        if not bool(torch.isfinite(got).all()):
            raise RejectedUpdate(f"{name}: contains NaN or Inf")


def token_weights(tokens: Mapping[str, int]) -> dict[str, float]:
    """Each site's share of the average: its tokens over all tokens (sites with 0 tokens drop out)."""
    total = sum(t for t in tokens.values() if t > 0)
    if total == 0:
        return {}
    return {site: t / total for site, t in tokens.items() if t > 0}


def average_updates(updates: Mapping[str, Tensors], tokens: Mapping[str, int], reference: Tensors) -> dict[str, torch.Tensor]:
    """Token-weighted mean of the pseudo-gradients, in fp32 (a bf16 update is widened first)."""
    weights = token_weights(tokens)
    if not weights:
        raise ValueError("no update carries any tokens: nothing to average")
    mean = {name: torch.zeros(ref.shape, dtype=torch.float32) for name, ref in reference.items()}
    for site, weight in weights.items():
        for name, delta in updates[site].items():
            mean[name].add_(delta.to(torch.float32), alpha=weight)
    return mean


@dataclass
class OuterOptimizer:
    """The server's optimizer over pseudo-gradients; its momentum is part of the global state."""

    kind: str = "none"
    lr: float = DEFAULT_OUTER_LR
    momentum: float = DEFAULT_OUTER_MOMENTUM
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # momentum buffers, fp32

    def __post_init__(self) -> None:
        if self.kind not in OUTER_OPTIMIZERS:
            raise ValueError(f"outer optimizer {self.kind!r} unknown; choose one of {OUTER_OPTIMIZERS}")
        if not (0 < self.lr and math.isfinite(self.lr)) or not (0 <= self.momentum < 1):
            raise ValueError(f"outer optimizer needs lr > 0 and 0 <= momentum < 1, got {self.lr}, {self.momentum}")

    def step(self, global_weights: dict[str, torch.Tensor], mean_delta: Tensors) -> dict[str, torch.Tensor]:
        """The new global weights (new tensors: blobs of the old ones may still be served)."""
        new = {}
        for name, weight in global_weights.items():
            delta = mean_delta[name]
            if self.kind == "nesterov":
                buf = self.state.get(name)
                buf = delta.clone() if buf is None else buf.mul_(self.momentum).add_(delta)
                self.state[name] = buf
                step = (delta + self.momentum * buf) * self.lr
            else:
                step = delta
            new[name] = (weight.to(torch.float32) - step).to(weight.dtype)
        return new
