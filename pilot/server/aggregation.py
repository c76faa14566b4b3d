"""Averaging the sites' work into the global model, and the outer optimizer (DiLoCo).

A site starts a round from the global weights G and trains them to L; it hands in its pseudo-gradient
D = G - L and the number of tokens it trained. The server averages the pseudo-gradients weighted by tokens
and applies an outer step:

    none:      G <- G - mean(D)                       (plain federated averaging of the weights)
    nesterov:  m <- mu^f * m + mean(D);  G <- G - lr * (mean(D) + f * mu * m)     (DiLoCo's outer Nesterov)

Rounds end at every membership change, so their lengths vary. f is the round's length against a nominal
round (round-duration of simulated time; at a site's steady throughput that is its tokens against a full
round's; with round-steps H set, the sites' mean steps against H), capped at 1 (`round_fraction`). A full round (f = 1) is DiLoCo's step exactly. A round cut to a fraction f decays the
momentum by mu^f and moves along it by f * mu * m: a round moves the model along the momentum in proportion to
its length, and n rounds of 1/n length decay it as one full round does (mu) and move along it by about as much
(their own pseudo-gradients add up as they are). Without f, a round cut to 1% of its length moved the model
along the old momentum as far as a full round did.
Across a phase without federated rounds (nobody or one site training), the momentum is not applied; it decays
by mu per nominal round of that phase (mu^idle at the next federated round), because the direction it remembers
grows stale while the global model moves on without it.

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


def round_fraction(sim_seconds: float, round_duration: float, mean_steps: float = 0.0, round_steps: int = 0) -> float:
    """A federated round's length against a nominal one, in (0, 1]: its simulated seconds against
    round-duration, or with round-steps set its sites' mean steps against round-steps (a round of H steps is
    full however long it took)."""
    if round_steps:
        return min(1.0, max(mean_steps, 0.0) / round_steps) or 1.0 / round_steps
    return min(1.0, sim_seconds / round_duration) if sim_seconds > 0 else 1.0


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


class RunningMean:
    """The token-weighted mean of pseudo-gradients, built as they arrive: one fp32 model copy however many sites
    (a site's update is added, tensor by tensor, and can be let go of at once). Equal to `average_updates` up
    to float rounding (it sums tokens x delta and divides once)."""

    def __init__(self, reference: Tensors):
        self.reference = reference
        self.sum: dict[str, torch.Tensor] | None = None
        self.tokens = 0
        self.sites: list[str] = []

    def add(self, site: str, delta: Tensors, tokens: int) -> None:
        if tokens <= 0:
            return   # no tokens, no weight
        if self.sum is None:
            self.sum = {name: torch.zeros(ref.shape, dtype=torch.float32) for name, ref in self.reference.items()}
        for name, value in delta.items():
            self.sum[name].add_(value, alpha=float(tokens))   # a bf16 delta widened on the fly: no fp32 temporary
        self.tokens += tokens
        self.sites.append(site)

    def mean(self) -> dict[str, torch.Tensor]:
        """The mean (in the sum's own tensors: the running mean is used up)."""
        if self.sum is None or self.tokens == 0:
            raise ValueError("no update carries any tokens: nothing to average")
        out, self.sum = self.sum, None
        for tensor in out.values():
            tensor.div_(self.tokens)
        return out


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

    def step(self, global_weights: dict[str, torch.Tensor], mean_delta: Tensors, fraction: float = 1.0,
             idle: float = 0.0) -> dict[str, torch.Tensor]:
        """The new global weights, written into `mean_delta`'s own fp32 tensors (it is used up: the step
        allocates nothing model-sized but a new momentum buffer); the old weights are not written into (blobs
        and checkpoints of them may still be read).

        fraction: the round's length against a nominal round (0 < f <= 1); idle: nominal rounds since the
        last federated round during which the momentum was not applied (see the module's docstring)."""
        f = min(1.0, max(float(fraction), 0.0))
        decay = self.momentum ** (f + max(float(idle), 0.0))
        new = {}
        for name, weight in global_weights.items():
            delta = mean_delta[name]
            own = delta.dtype == torch.float32 and weight.dtype == torch.float32
            step = delta if own else delta.to(torch.float32)
            if self.kind == "nesterov":
                buf = self.state.get(name)
                # a new buffer, not written in place: a checkpoint of the last round may still be reading the old one
                buf = step.clone() if buf is None else buf.mul(decay).add_(step)
                self.state[name] = buf
                step = step.add_(buf, alpha=f * self.momentum).mul_(self.lr)
            new[name] = torch.sub(weight, step, out=step) if own else (weight.to(torch.float32) - step).to(weight.dtype)
        return new
