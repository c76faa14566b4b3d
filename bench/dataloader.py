"""Throughput of the streaming DataLoader (parquet -> tokens -> [B, T] batches) against plain tokenization.

    python bench/dataloader.py                         # offline corpus, a freshly trained 8192-token BPE
    python bench/dataloader.py --data-dir D --tokenizer T --B 32 --T 2048

The baseline is the floor: reading every train shard and encoding it with tiktoken in one call per row group
(no packing, no background thread). The loader should stay close to it; a d20 run on 8 H100s consumes about
1.1M tokens/s in all, ~140k tokens/s per rank, which is what each rank's loader must sustain.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere as a plain script

from nanochat.dataloader import DataLoader  # noqa: E402
from nanochat.dataset import iter_texts, list_parquet_files, split_files  # noqa: E402
from nanochat.offline_corpus import write_shards  # noqa: E402
from nanochat.tokenizer import Tokenizer, iter_capped  # noqa: E402


def baseline(tok: Tokenizer, files: list[Path], threads: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    texts = list(iter_texts(files))
    tokens = sum(map(len, tok.encode(texts, prepend="<|bos|>", num_threads=threads)))
    return time.perf_counter() - t0, tokens


def loader_run(tok: Tokenizer, files: list[Path], B: int, T: int, threads: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    loader = DataLoader(tok, B, T, files=files, tokenizer_threads=threads)
    n = sum(x.numel() for x, _ in loader)
    return time.perf_counter() - t0, n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="shards (default: build the offline corpus)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default: train an 8192 BPE)")
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--threads", type=int, action="append", default=None, help="tokenizer threads (repeatable)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp)
        if args.data_dir is None:
            write_shards(data_dir)
        files = split_files(list_parquet_files(data_dir), "train")
        if args.tokenizer:
            tok = Tokenizer.from_directory(args.tokenizer)
        else:
            tok = Tokenizer.train_from_iterator(iter_capped(iter_texts(files), 10_000_000), 8192)
        mb = sum(len(t.encode()) for t in iter_texts(files)) / 1e6
        print(f"{len(files)} train shards, {mb:.2f} MB of text, vocab {tok.get_vocab_size()}, B={args.B} T={args.T}")
        header = f"{'threads':>7s} {'baseline tok/s':>15s} {'loader tok/s':>13s} {'loader MB/s':>12s} {'loader / baseline':>18s}"
        print(header)
        print("-" * len(header))
        for threads in args.threads or [1, 2, 4]:
            base_s, base_tokens = baseline(tok, files, threads)
            run_s, run_tokens = loader_run(tok, files, args.B, args.T, threads)
            print(f"{threads:7d} {base_tokens / base_s:15,.0f} {run_tokens / run_s:13,.0f} "
                  f"{mb * run_tokens / base_tokens / run_s:12.1f} {(run_tokens / run_s) / (base_tokens / base_s):17.2f}x")


if __name__ == "__main__":
    main()
