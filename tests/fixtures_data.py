"""Data fixtures (real text from packaged corpora as parquet shards, a trained tokenizer): see issue 4.

Session-scoped and explicit about paths: nothing here reads or writes ~/.cache or $NANOCHAT_BASE_DIR.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nanochat.offline_corpus import write_shards
from nanochat.tokenizer import iter_capped, train_tokenizer

TEXT_SHARDS = 6                 # 5 train shards + 1 validation shard, ~1.5 MB of text each
TINY_VOCAB = 4096
TINY_TOKENIZER_CHARS = 3_000_000


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of parquet shards (`text` column) holding all the packaged prose (~9 MB); last = val."""
    out = tmp_path_factory.mktemp("base_data")
    write_shards(out, num_shards=TEXT_SHARDS)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(text_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer directory (vocab 4096) trained on the train shards of `text_shards` (~0.3 s)."""
    train_files = sorted(text_shards.glob("shard_*.parquet"))[:-1]
    texts = (t for f in train_files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist())
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(iter_capped(texts, TINY_TOKENIZER_CHARS), TINY_VOCAB, out)
    return out
