"""Our tokenizer (rustbpe training, tiktoken encoding) against Hugging Face `tokenizers` (BPE trainer, same
GPT-4-style split pattern, byte-level, same vocabulary size), on the same packaged prose (~9 MB).

    python bench/tokenizer.py                      # vocab 8192
    python bench/tokenizer.py --vocab 4096 --vocab 32768 --threads 2

Trains on the train shards, measures compression (UTF-8 bytes per token) on the held-out validation shard,
and encode throughput (MB/s) on all the text, batched over --threads threads and one document at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere as a plain script

from nanochat.dataset import iter_texts, list_parquet_files, split_files  # noqa: E402
from nanochat.offline_corpus import write_shards  # noqa: E402
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer  # noqa: E402


def train_ours(texts: list[str], vocab: int):
    t0 = time.perf_counter()
    tok = Tokenizer.train_from_iterator(iter(texts), vocab)
    return tok, time.perf_counter() - t0


def train_hf(texts: list[str], vocab: int):
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    t0 = time.perf_counter()
    tok.train_from_iterator(texts, trainer)
    return tok, time.perf_counter() - t0


def encoders(name: str, tok, threads: int):
    """(batch encode, one-document encode) returning token counts."""
    if name == "ours":
        return (lambda xs: sum(map(len, tok.encode(xs, num_threads=threads))),
                lambda xs: sum(len(tok.encode(x)) for x in xs))
    return (lambda xs: sum(len(e.ids) for e in tok.encode_batch(xs, add_special_tokens=False)),
            lambda xs: sum(len(tok.encode(x, add_special_tokens=False).ids) for x in xs))


def timed(fn, arg, repeats: int = 3) -> tuple[float, int]:
    best, out = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(arg)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, action="append", default=None, help="vocabulary size (repeatable)")
    parser.add_argument("--threads", type=int, default=2, help="threads for batch encoding (both libraries)")
    parser.add_argument("--data-dir", type=Path, default=None, help="shards to use (default: build the offline corpus)")
    args = parser.parse_args(argv)
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)        # HF tokenizers' thread pool, read at first use

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp)
        if args.data_dir is None:
            write_shards(data_dir)
        files = list_parquet_files(data_dir)
        train = list(iter_texts(split_files(files, "train")))
        val = list(iter_texts(split_files(files, "val")))
    everything = train + val
    mb_all = sum(len(t.encode()) for t in everything) / 1e6
    val_bytes = sum(len(t.encode()) for t in val)
    print(f"text: {len(train)} train documents ({sum(len(t.encode()) for t in train) / 1e6:.2f} MB), "
          f"{len(val)} held-out ({val_bytes / 1e6:.2f} MB); encode throughput on all {mb_all:.2f} MB; "
          f"{args.threads} threads; {os.cpu_count()} CPUs")
    header = (f"{'vocab':>6s} {'tokenizer':24s} {'train s':>8s} {'enc MB/s batch':>15s} {'enc MB/s 1-doc':>15s} "
              f"{'bytes/token':>12s} | {'train x':>8s} {'batch x':>8s} {'1-doc x':>8s} {'compr x':>8s}")
    print(header)
    print("-" * len(header))
    for vocab in args.vocab or [8192]:
        rows = {}
        for name, train_fn in (("hf", train_hf), ("ours", train_ours)):
            tok, train_s = train_fn(train, vocab)
            batch, single = encoders(name, tok, args.threads)
            batch_s, _ = timed(batch, everything)
            single_s, _ = timed(single, everything, repeats=1)
            _, val_tokens = timed(batch, val, repeats=1)
            rows[name] = (train_s, mb_all / batch_s, mb_all / single_s, val_bytes / val_tokens)
        base = rows["hf"]
        for name, label in (("hf", "HF tokenizers (baseline)"), ("ours", "rustbpe + tiktoken")):
            r = rows[name]
            print(f"{vocab:6d} {label:24s} {r[0]:8.2f} {r[1]:15.1f} {r[2]:15.1f} {r[3]:12.3f} | "
                  f"{base[0] / r[0]:7.2f}x {r[1] / base[1]:7.2f}x {r[2] / base[2]:7.2f}x {r[3] / base[3]:7.3f}x")
    print("x columns: ours relative to HF (train: speed-up; encode: throughput ratio; compression: bytes/token ratio)")


if __name__ == "__main__":
    main()
