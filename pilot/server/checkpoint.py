"""The server's global state on disk: written atomically after every aggregation, the base of every resume.

    RUN_DIR/global/round_000012/weights.safetensors   global model weights
                              /outer.safetensors     outer-optimizer momentum (absent for "none")
                              /state.json            round, tokens, ledger snapshot, model config, ...
    RUN_DIR/global/LATEST                            name of the newest complete checkpoint

A checkpoint directory is written by the one checkpoint writer (nanochat/checkpoint.py: a hidden temporary
directory, every file fsynced, renamed into place); LATEST is then replaced atomically and fsynced. A crash at
any moment leaves the previous checkpoint as LATEST, never a half one; a LATEST that is missing or names a
checkpoint that is gone falls back to the newest complete checkpoint; what a dead writer left is pruned.
The ledger snapshot is written before the ledger in Redis is committed, so on resume the snapshot is the
truth (Redis may have lost or not yet recorded the last commit).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanochat.checkpoint import (
    delete_dir_atomically,
    prune_leftovers,
    write_dir_atomically,
    write_file_atomically,
)
from pilot.dataplane.blob import load_tensors, save_file

KEEP_CHECKPOINTS = 2  # older complete checkpoints are deleted once a newer one is LATEST
STATE_FILE = "state.json"


@dataclass
class GlobalState:
    weights: dict[str, torch.Tensor]
    round: int = 0
    tokens: int = 0
    outer_state: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)   # JSON: ledger snapshot, model config, outer settings, ...


def save(run_dir: str | os.PathLike[str], state: GlobalState, keep: int = KEEP_CHECKPOINTS) -> Path:
    """Write a complete checkpoint of `state` and make it LATEST; returns its directory."""
    root = Path(run_dir) / "global"
    root.mkdir(parents=True, exist_ok=True)
    prune_leftovers(root)
    name, k = f"round_{state.round:06d}", 0
    while (root / name).exists():  # the same round saved again (e.g. after a resume): never overwrite LATEST
        k += 1
        name = f"round_{state.round:06d}.{k}"

    def write(tmp: Path) -> None:
        digest = save_file(tmp / "weights.safetensors", state.weights)
        if state.outer_state:
            save_file(tmp / "outer.safetensors", state.outer_state)
        meta = {"round": state.round, "tokens": state.tokens, "weights_sha256": digest,
                "saved_at": time.time(), **state.info}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))

    final = write_dir_atomically(root / name, write)
    write_file_atomically(root / "LATEST", (name + "\n").encode())
    # prune older checkpoints (by time written), never the one LATEST names
    older = sorted((p for p in complete(root) if p.name != name), key=lambda p: p.stat().st_mtime)
    for old in older[: max(0, len(older) - (keep - 1))]:
        delete_dir_atomically(old)   # hidden first: a kill mid-delete never leaves a checkpoint without weights
    return final


def complete(root: Path) -> list[Path]:
    """The complete checkpoints under RUN_DIR/global (a state.json is written last)."""
    return [p for p in root.glob("round_*") if (p / STATE_FILE).exists()]


def latest(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint: the one LATEST names, else (LATEST missing, or naming one that is gone)
    the newest complete one by its round; None for a run that has none yet."""
    root = Path(run_dir) / "global"
    pointer = root / "LATEST"
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if (named / STATE_FILE).exists():
            return named
    found = complete(root) if root.exists() else []
    if not found:
        return None
    return max(found, key=lambda p: (json.loads((p / STATE_FILE).read_text())["round"], p.stat().st_mtime))


def load(path: str | os.PathLike[str]) -> GlobalState:
    path = Path(path)
    meta = json.loads((path / STATE_FILE).read_text())
    outer = path / "outer.safetensors"
    return GlobalState(
        weights=load_tensors(path / "weights.safetensors"),
        round=int(meta.pop("round")), tokens=int(meta.pop("tokens")),
        outer_state=load_tensors(outer) if outer.exists() else {},
        info={k: v for k, v in meta.items() if k not in ("weights_sha256", "saved_at")},
    )
