"""Evaluate a base model: CORE (in-context-learning tasks, centred accuracy) and bits per byte (val shard).

    python -m scripts.base_eval --checkpoint final_model.safetensors
    python -m scripts.base_eval --checkpoint $NANOCHAT_BASE_DIR/base_checkpoints/baseline --eval bpb
    python -m scripts.base_eval --checkpoint M --max-per-task 100 --json results.json     # quick CORE

--checkpoint takes a model file (final_model.safetensors), a checkpoint directory (step_NNNNNN/), or a
directory of checkpoints (the last one is used); the seed's `final_model.pt` finds final_model.safetensors.
The CORE task bundle is downloaded on first use into $NANOCHAT_BASE_DIR/eval_bundle (or give --bundle DIR).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nanochat.common import get_base_dir
from nanochat.core_eval import EVAL_BUNDLE_URL, ensure_eval_bundle, evaluate_core
from nanochat.dataloader import DataLoader
from nanochat.dataset import list_parquet_files, split_files
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes, get_tokenizer

EVALS = "core,bpb"
BPB_TOKENS = 2 ** 20        # validation tokens for bits per byte (nanochat uses 10M on FineWeb-EDU)
BATCH_SIZE = 8              # sequences per forward pass for bits per byte
MAX_PER_TASK = None         # CORE examples per task (None: all)


def resolve_checkpoint(arg: str) -> Path:
    """The path as given; else the .safetensors beside a .pt name; else that name under base_checkpoints/*/."""
    path = Path(arg).expanduser()
    if path.exists():
        return path
    candidates = [path.with_suffix(".safetensors")]
    runs = get_base_dir() / "base_checkpoints"
    if not path.is_absolute() and runs.is_dir():
        for name in (path.name, path.with_suffix(".safetensors").name):
            candidates += sorted(runs.glob(f"*/{name}"))
    found = [c for c in dict.fromkeys(candidates) if c.exists()]
    if len(found) == 1:
        print(f"using {found[0]}")
        return found[0]
    if len(found) > 1:
        raise FileNotFoundError(f"{arg}: ambiguous, found {', '.join(map(str, found))}; give the full path")
    raise FileNotFoundError(f"{arg}: no such model file or checkpoint directory (looked for "
                            f"{', '.join(map(str, candidates))}); checkpoints are safetensors, not .pt")


def run_evals(model, tokenizer, token_bytes: torch.Tensor, evals: list[str], *, device="cpu",
              bundle_dir: Path | None = None, val_files: list[Path] | None = None, seq_len: int = 512,
              batch_size: int = BATCH_SIZE, bpb_tokens: int = BPB_TOKENS,
              max_per_task: int | None = MAX_PER_TASK) -> dict:
    """The requested evaluations of an already-loaded model; returns a JSON-able dict."""
    results: dict = {}
    model.eval()
    if "bpb" in evals:
        t0 = time.time()
        steps = max(1, bpb_tokens // (batch_size * seq_len))
        loader = DataLoader(tokenizer, batch_size, seq_len, files=val_files, device=device)
        try:
            results["val_bpb"] = evaluate_bpb(model, loader, steps, token_bytes)
        finally:
            loader.close()
        print(f"val bpb {results['val_bpb']:.4f} ({steps * batch_size * seq_len:,} tokens, {time.time() - t0:.1f} s)")
    if "core" in evals:
        t0 = time.time()
        core = evaluate_core(model, tokenizer, bundle_dir, device=device, max_per_task=max_per_task,
                             max_seq_len=seq_len)
        results["core"], results["core_tasks"] = core["core"], core["tasks"]
        print(f"CORE {core['core']:.4f} ({len(core['tasks'])} tasks, {time.time() - t0:.1f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model file, checkpoint directory, or run directory")
    parser.add_argument("--eval", default=EVALS, help="comma-separated: core, bpb")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: $NANOCHAT_BASE_DIR/tokenizer")
    parser.add_argument("--data-dir", type=Path, default=None, help="shards; the last is validation "
                        "(default: $NANOCHAT_BASE_DIR/base_data)")
    parser.add_argument("--bundle", type=Path, default=None, help="CORE task bundle directory "
                        "(default: $NANOCHAT_BASE_DIR/eval_bundle, downloaded on first use)")
    parser.add_argument("--bundle-url", default=EVAL_BUNDLE_URL, help="where to download the bundle from")
    parser.add_argument("--max-per-task", type=int, default=MAX_PER_TASK, help="CORE examples per task (default: all)")
    parser.add_argument("--bpb-tokens", type=int, default=BPB_TOKENS, help="validation tokens for bits per byte")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="sequences per forward pass (bpb)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    unknown = set(evals) - {"core", "bpb"}
    if unknown or not evals:
        parser.error(f"--eval takes core and/or bpb, got {args.eval!r}")

    from nanochat.checkpoint import load_model  # the model side (issue 3)

    try:
        path = resolve_checkpoint(args.checkpoint)
        tokenizer = get_tokenizer(args.tokenizer)
        token_bytes = get_token_bytes(args.tokenizer, device=args.device)
        model = load_model(path, device=args.device)
        vocab = model.config.vocab_size
        if vocab != tokenizer.get_vocab_size():
            raise ValueError(f"{path}: the model has a {vocab}-token vocabulary, the tokenizer "
                             f"{args.tokenizer or 'in $NANOCHAT_BASE_DIR/tokenizer'} has {tokenizer.get_vocab_size()}")
        val_files = split_files(list_parquet_files(args.data_dir), "val") if "bpb" in evals else None
        bundle = (args.bundle or ensure_eval_bundle(get_base_dir(), args.bundle_url)) if "core" in evals else None
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model {path}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"sequence length {model.config.sequence_len}, device {args.device}")
    results = run_evals(model, tokenizer, token_bytes, evals, device=args.device, bundle_dir=bundle,
                        val_files=val_files, seq_len=model.config.sequence_len, batch_size=args.batch_size,
                        bpb_tokens=args.bpb_tokens, max_per_task=args.max_per_task)
    results["checkpoint"] = str(path)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
