"""Process setup: under torchrun a process group (NCCL on CUDA, gloo on CPU), otherwise a plain process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())

    @property
    def master(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


GPU_DEPTH = 12   # from this depth on, a model is a GPU job (d12: ~180M parameters; the seed trains d20, 561M)
CPU_EXAMPLE = ("python -m scripts.base_train --depth 2 --max_seq_len 128 --device_batch_size 8 "
               "--total_batch_size 2048 --num_iterations 100 --eval_every 50 --run tiny")


def gpu_job_without_gpu(device_type: str, depth: int, world_size: int | None = None) -> str | None:
    """What to say when a run that is clearly meant for GPUs starts where torch sees no CUDA device: a model
    of depth >= GPU_DEPTH (the seed's torchrun d20 command, say) or --device_type cuda, without --device_type
    cpu. None when the run may go ahead: a GPU is there, the CPU was asked for, or the model is small (several
    small ranks on a CPU train with gloo, as the tests do)."""
    if device_type == "cpu" or torch.cuda.is_available():
        return None
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    why = ["--device_type cuda"] if device_type == "cuda" else []
    if depth >= GPU_DEPTH:
        why.append(f"--depth {depth}" + (f" under torchrun with {world_size} ranks" if world_size > 1 else ""))
    if not why:
        return None
    return (f"no GPU found (torch {torch.__version__} sees no CUDA device), but this is a GPU job "
            f"({', '.join(why)}). Without a GPU, train a small model on the CPU instead:\n    {CPU_EXAMPLE}\n"
            f"or add --device_type cpu to run this one on the CPU anyway (d20 on a CPU: seconds per sequence, "
            f"weeks for a run; several ranks train with gloo).")


def init_distributed(device_type: str = "") -> DistInfo:
    """Set up this process: the device, and under torchrun the default process group.

    device_type: "cuda", "cpu", or "" to pick CUDA when present. Idempotent: a second call returns the same.
    """
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type {device_type!r}: expected 'cuda' or 'cpu'")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device_type 'cuda' was asked for but torch sees no CUDA device")
    if not under_torchrun():
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(device)
        return DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} but only {torch.cuda.device_count()} CUDA devices: "
                               f"--nproc_per_node must not exceed the GPUs of this host")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_json(obj: object, device: torch.device | str = "cpu") -> list:
    """Every rank's `obj` (JSON-serialisable), in rank order: JSON bytes in tensors, so nothing is unpickled
    (torch's all_gather_object pickles). `device`: where the collective's tensors live (the rank's GPU under
    NCCL, the CPU under gloo)."""
    import json  # noqa: PLC0415

    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(int(s.item()) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return [json.loads(bytes(g[: int(s.item())].cpu().numpy()).decode()) for g, s in zip(gathered, sizes, strict=True)]
