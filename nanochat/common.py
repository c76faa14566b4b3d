"""Small things every nanochat module needs: where data lives, and printing once under torchrun."""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR_ENV = "NANOCHAT_BASE_DIR"


def get_base_dir() -> Path:
    """$NANOCHAT_BASE_DIR, default ~/.cache/nanochat: shards in base_data/, the tokenizer in tokenizer/."""
    base = Path(os.environ.get(BASE_DIR_ENV) or Path.home() / ".cache" / "nanochat")
    base.mkdir(parents=True, exist_ok=True)
    return base


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (all ranks print when not under torchrun)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)
