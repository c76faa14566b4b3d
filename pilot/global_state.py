"""The server's global state on disk: written atomically after every aggregation, the base of every resume.

    RUN_DIR/global/round_000012/weights.safetensors   global model weights
                              /outer.safetensors     outer-optimizer momentum (absent for "none")
                              /state.json            round, tokens, ledger snapshot, model config, ...
    RUN_DIR/global/LATEST                            name of the newest complete checkpoint

A checkpoint directory is written under a temporary name, fsynced and renamed; LATEST is replaced
atomically afterwards. A crash at any moment leaves the previous checkpoint as LATEST, never a half one.
The ledger snapshot is written before the ledger in Redis is committed, so on resume the snapshot is the
truth (Redis may have lost or not yet recorded the last commit).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanochat.checkpoint import fsync_dir
from pilot.blobs import load_tensors, save_file

KEEP_CHECKPOINTS = 2  # older complete checkpoints are deleted once a newer one is LATEST


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
    name = f"round_{state.round:06d}"
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        digest = save_file(tmp / "weights.safetensors", state.weights)
        if state.outer_state:
            save_file(tmp / "outer.safetensors", state.outer_state)
        meta = {"round": state.round, "tokens": state.tokens, "weights_sha256": digest,
                "saved_at": time.time(), **state.info}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        with open(tmp / "state.json", "rb") as f:
            os.fsync(f.fileno())
        fsync_dir(tmp)
        final, k = root / name, 0
        while final.exists():  # the same round saved again (e.g. after a resume): never overwrite LATEST
            k += 1
            final = root / f"{name}.{k}"
        name = final.name
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    latest_tmp = root / f".LATEST-{uuid.uuid4().hex[:8]}"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / "LATEST")
    fsync_dir(root)
    # prune older checkpoints (by time written), never the one LATEST names
    older = sorted((p for p in root.glob("round_*") if p.name != name), key=lambda p: p.stat().st_mtime)
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint directory, or None for a run that has none yet."""
    pointer = Path(run_dir) / "global" / "LATEST"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def load(path: str | os.PathLike[str]) -> GlobalState:
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    outer = path / "outer.safetensors"
    return GlobalState(
        weights=load_tensors(path / "weights.safetensors"),
        round=int(meta.pop("round")), tokens=int(meta.pop("tokens")),
        outer_state=load_tensors(outer) if outer.exists() else {},
        info={k: v for k, v in meta.items() if k not in ("weights_sha256", "saved_at")},
    )
