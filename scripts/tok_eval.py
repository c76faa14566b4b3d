"""Compression of the trained tokenizer(s): UTF-8 bytes per token on held-out text (the validation shard).

    python -m scripts.tok_eval                                 # $NANOCHAT_BASE_DIR/tokenizer on the val shard
    python -m scripts.tok_eval --tokenizer A --tokenizer B     # side by side
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from nanochat.common import get_base_dir
from nanochat.dataset import iter_texts, list_parquet_files, split_files
from nanochat.tokenizer import Tokenizer

MAX_DOCS = 2_000   # documents per split evaluated


def compression(tok: Tokenizer, texts: list[str]) -> tuple[int, int]:
    """(UTF-8 bytes, tokens) of the texts, no special tokens."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tok.encode(texts))
    return n_bytes, n_tokens


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, action="append", default=None,
                        help="tokenizer directory (repeatable; default: $NANOCHAT_BASE_DIR/tokenizer)")
    parser.add_argument("--data-dir", type=Path, default=None, help="shard directory (default: $NANOCHAT_BASE_DIR/base_data)")
    parser.add_argument("--max-docs", type=int, default=MAX_DOCS, help="documents per split")
    args = parser.parse_args(argv)

    files = list_parquet_files(args.data_dir)
    splits = {name: list(itertools.islice(iter_texts(split_files(files, name)), args.max_docs))
              for name in ("val", "train")}
    rows = []
    print(f"{'tokenizer':40s} {'vocab':>7s} {'split':>5s} {'docs':>6s} {'MB':>7s} {'tokens':>10s} {'bytes/token':>11s}")
    for path in args.tokenizer or [get_base_dir() / "tokenizer"]:
        tok = Tokenizer.from_directory(path)
        for split, texts in splits.items():
            n_bytes, n_tokens = compression(tok, texts)
            rows.append({"tokenizer": str(path), "split": split, "bytes": n_bytes, "tokens": n_tokens,
                         "ratio": n_bytes / n_tokens})
            print(f"{str(path)[-40:]:40s} {tok.get_vocab_size():7d} {split:>5s} {len(texts):6d} "
                  f"{n_bytes / 1e6:7.2f} {n_tokens:10d} {n_bytes / n_tokens:11.3f}")
    return rows


if __name__ == "__main__":
    main()
