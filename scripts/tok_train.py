"""Train the BPE tokenizer on the train shards and save it (format: nanochat/tokenizer.py).

    python -m scripts.tok_train --max_chars=4000000000 --vocab_size=65536      # FineWeb-EDU, as nanochat
    python -m scripts.tok_train --max_chars=10000000 --vocab_size=8192         # the offline corpus, ~2 s

Reads $NANOCHAT_BASE_DIR/base_data (every shard but the last, which is validation) unless --data-dir is
given, and writes $NANOCHAT_BASE_DIR/tokenizer unless --out is given.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nanochat.common import get_base_dir
from nanochat.dataset import iter_texts, list_parquet_files, split_files
from nanochat.tokenizer import iter_capped, train_tokenizer

MAX_CHARS = 10_000_000_000   # characters of training text at most
DOC_CAP = 10_000             # characters per document at most (long documents would dominate the counts)
VOCAB_SIZE = 65_536          # including the special tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_chars", "--max-chars", type=int, default=MAX_CHARS, help="training characters at most")
    parser.add_argument("--doc_cap", "--doc-cap", type=int, default=DOC_CAP, help="characters per document at most")
    parser.add_argument("--vocab_size", "--vocab-size", type=int, default=VOCAB_SIZE,
                        help="vocabulary size, special tokens included")
    parser.add_argument("--data-dir", type=Path, default=None, help="shard directory (default: $NANOCHAT_BASE_DIR/base_data)")
    parser.add_argument("--out", type=Path, default=None, help="tokenizer directory (default: $NANOCHAT_BASE_DIR/tokenizer)")
    args = parser.parse_args(argv)

    train_files = split_files(list_parquet_files(args.data_dir), "train")
    out = args.out or get_base_dir() / "tokenizer"
    counted = {"chars": 0, "docs": 0}

    def texts():
        for text in iter_capped(iter_texts(train_files), args.max_chars, args.doc_cap):
            counted["chars"] += len(text)
            counted["docs"] += 1
            yield text

    print(f"training a {args.vocab_size}-token BPE on up to {args.max_chars:,} characters of {len(train_files)} shards")
    t0 = time.time()
    tok = train_tokenizer(texts(), args.vocab_size, out)
    elapsed = time.time() - t0
    token_bytes = tok.token_bytes()
    merged = token_bytes > 0
    print(f"trained on {counted['chars']:,} characters ({counted['docs']:,} documents) in {elapsed:.1f} s")
    print(f"vocab {tok.get_vocab_size():,} ({int(merged.sum()):,} byte tokens+merges, "
          f"{tok.get_vocab_size() - int(merged.sum())} special); token bytes min/mean/max "
          f"{int(token_bytes[merged].min())}/{token_bytes[merged].float().mean():.2f}/{int(token_bytes.max())}")
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
