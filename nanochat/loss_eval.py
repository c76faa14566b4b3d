"""Bits per byte: a loss that does not depend on the vocabulary, so tokenizers and models compare fairly.

bpb = (sum of the losses, in nats, of every target token that is ordinary text)
      / (ln 2 * the UTF-8 bytes of those target tokens)

Targets that are special tokens (byte length 0, e.g. <|bos|>) and ignored targets (-1) count in neither sum.
Under torch.distributed the sums are added over all ranks, so every rank returns the same number.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int,
                 token_bytes: torch.Tensor) -> float:
    """Bits per byte of `model` over the next `steps` batches (fewer if `batches` runs out first).

    `model(x, y, loss_reduction="none")` returns per-token losses ([B*T] or [B, T]); `token_bytes` is the
    int64 [vocab] tensor from `nanochat.tokenizer.get_token_bytes`.
    """
    total_nats, total_bytes, device = None, None, None
    for _, (x, y) in zip(range(steps), batches, strict=False):
        loss = model(x, y, loss_reduction="none").reshape(-1).float()
        y = y.reshape(-1)
        if device is None:
            device = loss.device
            total_nats = torch.zeros((), dtype=torch.float64, device=device)
            total_bytes = torch.zeros((), dtype=torch.int64, device=device)
        if loss.numel() != y.numel():
            raise ValueError(f"model returned {loss.numel()} losses for {y.numel()} targets: "
                             "expected one per target with loss_reduction='none'")
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes.to(y.device)[y.clamp(min=0)], 0)
        counted = nbytes > 0
        total_nats += torch.where(counted, loss, 0.0).sum(dtype=torch.float64)
        total_bytes += nbytes.sum()
    if device is None:
        raise ValueError("evaluate_bpb got no batches")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        raise ValueError("no target bytes to evaluate (every target was ignored or special)")
    return total_nats.item() / (math.log(2) * total_bytes.item())
