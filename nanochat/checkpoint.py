"""Checkpoints: safetensors for tensors, JSON for everything else, never pickle; written atomically.

A training checkpoint is a directory `step_NNNNNN/` holding
    model.safetensors   the model's parameters (fp32, names as in model.state_dict())
    optim.safetensors   optimizer state, "<optimizer>/<param name>.<key>" (full, unsharded)
    meta.json           step, tokens, configs, data cursor(s), anything JSON
It is assembled under a temporary name beside its final place, every file fsync'ed, and renamed into place
in one step: a reader (or a resume after SIGKILL) sees a whole checkpoint or none. Old checkpoints are renamed
out of sight before they are deleted, for the same reason. A finished model can also
be written as one file (`save_model`): weights plus the model config in the safetensors header.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{6,})$")
MODEL_FILE, OPTIM_FILE, META_FILE = "model.safetensors", "optim.safetensors", "meta.json"
FORMAT = "pilot-nanochat-checkpoint/1"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _tensors_for_disk(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that own their memory (safetensors refuses shared or strided storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _hide(step_dir: Path) -> Path:
    """Rename a checkpoint out of sight in one step before deleting it: a deletion cut short (SIGKILL) must
    not leave a listed checkpoint with some of its files gone."""
    hidden = Path(tempfile.mkdtemp(prefix=f".{step_dir.name}.old-", dir=step_dir.parent))
    os.rename(step_dir, hidden / step_dir.name)
    return hidden


def delete_dir_atomically(path: Path) -> None:
    """Remove a checkpoint directory so that a reader never meets it half deleted: renamed out of sight in one
    step, then deleted (a deletion cut short leaves only a hidden leftover, pruned later)."""
    if path.exists():
        shutil.rmtree(_hide(path), ignore_errors=True)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


LEFTOVER = re.compile(r"^\..+\.(tmp|old)-")   # what a writer that died mid-save or mid-delete leaves behind


def prune_leftovers(directory: Path | str) -> list[str]:
    """Delete what writers that died mid-save or mid-delete left in `directory` (hidden .NAME.tmp-* / .old-*)."""
    pruned = []
    for stale in Path(directory).glob(".*"):
        if LEFTOVER.match(stale.name):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            pruned.append(stale.name)
    return pruned


def write_dir_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """The one checkpoint writer: `write(tmp)` fills a directory assembled under a hidden temporary name beside
    `final`; every file in it and the directory are fsynced, it is renamed into place in one step and the parent
    fsynced. An existing `final` is swapped out (renamed out of sight, then deleted). A crash at any moment
    leaves `final` as it was, whole, or absent, plus a leftover that `prune_leftovers` removes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide checkpoints from the rest of the team
        write(tmp)
        for path in tmp.iterdir():
            _fsync_file(path)
        fsync_dir(tmp)
        if final.exists():
            old = _hide(final)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_file_atomically(path: Path, data: bytes) -> None:
    """Replace a small file (a pointer such as LATEST) in one step, its bytes and the directory fsynced."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(checkpoint_dir: Path | str, step: int, model_state: dict[str, torch.Tensor],
                    optim_state: dict[str, torch.Tensor] | None, meta: dict, keep: int | None = None) -> Path:
    """Write checkpoint_dir/step_NNNNNN atomically; keep only the newest `keep` checkpoints (None: all)."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    prune_leftovers(checkpoint_dir)

    def write(tmp: Path) -> None:
        save_file(_tensors_for_disk(model_state), tmp / MODEL_FILE)
        save_file(_tensors_for_disk(optim_state or {}), tmp / OPTIM_FILE)
        (tmp / META_FILE).write_text(json.dumps({"format": FORMAT, "step": step, **meta}, indent=1) + "\n")

    # the same step saved again (e.g. stopped right after a resume) is swapped in place
    final = write_dir_atomically(checkpoint_dir / step_dir_name(step), write)
    if keep is not None:
        for old_step in list_checkpoints(checkpoint_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(_hide(checkpoint_dir / step_dir_name(old_step)), ignore_errors=True)
    return final


def list_checkpoints(checkpoint_dir: Path | str) -> list[int]:
    """Steps of the complete checkpoints in checkpoint_dir, ascending (temporaries are never listed)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    steps = []
    for entry in checkpoint_dir.iterdir():
        m = STEP_DIR.match(entry.name)
        if m and (entry / META_FILE).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_last_checkpoint(checkpoint_dir: Path | str) -> Path | None:
    steps = list_checkpoints(checkpoint_dir)
    return Path(checkpoint_dir) / step_dir_name(steps[-1]) if steps else None


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu",
                    load_optim: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(model_state, optim_state, meta) of one checkpoint directory."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    model_state = load_file(path / MODEL_FILE, device=str(device))
    optim_state = load_file(path / OPTIM_FILE, device=str(device)) if load_optim else {}
    return model_state, optim_state, meta


def model_file_metadata(model_config: dict, extra: dict | None = None) -> dict[str, str]:
    """The header metadata of a model file (save_model; a writer that streams the tensors writes the same)."""
    return {"format": FORMAT, "model_config": json.dumps(model_config), "extra": json.dumps(extra or {})}


def save_model(path: Path | str, model_state: dict[str, torch.Tensor], model_config: dict,
               extra: dict | None = None) -> Path:
    """One .safetensors file: weights, and the model config (JSON) in its header; atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file(_tensors_for_disk(model_state), tmp, metadata=model_file_metadata(model_config, extra))
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync_file(Path(tmp))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_model(path: Path | str, device: torch.device | str = "cpu"):
    """A GPT from a model file (save_model), a checkpoint directory, or a directory of checkpoints (the last)."""
    from nanochat.gpt import GPT, GPTConfig

    path = Path(path)
    if path.is_dir():
        ckpt = path if (path / META_FILE).is_file() else find_last_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"{path}: no checkpoint (step_NNNNNN/ with {META_FILE}) found")
        state, _, meta = load_checkpoint(ckpt, device=device, load_optim=False)
        config = GPTConfig.from_dict(meta["model_config"])
    elif path.is_file():
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if header.get("format") != FORMAT or "model_config" not in header:
            raise ValueError(f"{path}: not a nanochat model file (no model_config in its safetensors header)")
        config = GPTConfig.from_dict(json.loads(header["model_config"]))
        state = load_file(path, device=str(device))
    else:
        raise FileNotFoundError(f"{path}: no such model file or checkpoint directory")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # rotary tables; the weights are overwritten next
    model.load_state_dict(state, strict=True)
    return model
