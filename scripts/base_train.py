"""Pretrain a nanochat GPT on one site: the vanilla baseline, as a plain process or under torchrun.

    # the d20 baseline on 4 GPUs (the seed's command)
    torchrun --standalone --nproc_per_node=4 -m scripts.base_train -- --depth 20 --target_param_data_ratio 20 \\
        --device_batch_size 8 --run baseline
    # a tiny model on CPU
    python -m scripts.base_train --depth 2 --max_seq_len 128 --device_batch_size 8 --total_batch_size 2048 \\
        --num_iterations 100 --eval_every 50 --run tiny

Data: shards in --data_dir (default $NANOCHAT_BASE_DIR/base_data; the last shard is validation), the tokenizer
in --tokenizer_dir (default $NANOCHAT_BASE_DIR/tokenizer). Checkpoints go to --checkpoint_dir (default
$NANOCHAT_BASE_DIR/base_checkpoints/RUN): step_NNNNNN/ directories, metrics.jsonl (one line per step) and,
at the end, final_model.safetensors. SIGTERM (or Ctrl-C) stops at the next step boundary with a checkpoint
(exit code 143); --resume continues from the last checkpoint, bit for bit on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from nanochat import checkpoint as ckpt
from nanochat.common import get_base_dir, print0
from nanochat.trainer import (
    TrainConfig,
    Trainer,
    make_train_batches,
    plan_training,
    train_loop,
    validate_config,
)

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 143   # 128 + SIGTERM: stopped on request, checkpoint written, resumable
DEFAULT_VOCAB = 65536


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m scripts.base_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--run", default="dummy", help="run name: checkpoint folder and wandb run name (default dummy)")
    g.add_argument("--checkpoint_dir", type=Path, default=None, help="default $NANOCHAT_BASE_DIR/base_checkpoints/RUN")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint_dir "
                   "(starts fresh, saying so, when there is none)")
    g.add_argument("--data_dir", type=Path, default=None, help="parquet shards (default $NANOCHAT_BASE_DIR/base_data)")
    g.add_argument("--tokenizer_dir", type=Path, default=None, help="default $NANOCHAT_BASE_DIR/tokenizer")
    g.add_argument("--device_type", default="", choices=["", "cuda", "cpu"], help="default: cuda if available")
    g.add_argument("--compile", default=d.compile, choices=["auto", "on", "off"],
                   help="torch.compile the model (auto: on CUDA only)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--data_sharding", default=d.data_sharding, choices=["documents", "rows"],
                   help="documents: each rank reads its own documents (fastest); rows: every rank reads the whole "
                        "step and trains on its rows (results independent of the number of ranks)")
    g.add_argument("--wandb", default="off", choices=["off", "online", "offline"], help="log to wandb (rank 0)")
    g.add_argument("--dry_run", action="store_true", help="print the plan (model size, horizon, batch) and exit")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=d.depth, help="layers; width = aspect_ratio x depth (d20: 561M)")
    g.add_argument("--aspect_ratio", type=int, default=d.aspect_ratio)
    g.add_argument("--head_dim", type=int, default=d.head_dim)
    g.add_argument("--num_kv_heads", type=int, default=d.num_kv_heads, help="grouped-query attention (0: off)")
    g.add_argument("--max_seq_len", type=int, default=d.max_seq_len)
    g = p.add_argument_group("horizon and batch")
    g.add_argument("--num_iterations", type=int, default=d.num_iterations, help="optimizer steps (> 0 wins)")
    g.add_argument("--target_param_data_ratio", type=float, default=d.target_param_data_ratio,
                   help="tokens = ratio x parameters (Chinchilla: 20)")
    g.add_argument("--device_batch_size", type=int, default=d.device_batch_size, help="sequences per micro-step per rank")
    g.add_argument("--total_batch_size", type=int, default=d.total_batch_size, help="tokens per optimizer step")
    g = p.add_argument_group("optimization")
    for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "warmup_ratio", "warmdown_ratio",
                 "final_lr_frac", "muon_momentum_start", "muon_momentum_end"):
        g.add_argument(f"--{name}", type=float, default=getattr(d, name))
    g.add_argument("--muon_momentum_warmup_steps", type=int, default=d.muon_momentum_warmup_steps)
    g.add_argument("--grad_clip", type=float, default=d.grad_clip,
                   help="clip the global norm of the averaged gradient to this before every step (0: off)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval_every", type=int, default=250, help="validation bpb every N steps (<= 0: never)")
    g.add_argument("--eval_tokens", type=int, default=20 * 524288, help="validation tokens per evaluation")
    g.add_argument("--save_every", type=int, default=1000, help="checkpoint every N steps (<= 0: only at the end "
                   "and on stop)")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="newest checkpoints kept (<= 0: all)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `python -m scripts.base_train -- --depth 20`: the separator torchrun would eat
        argv = argv[1:]
    return build_parser().parse_args(argv)


def train_config(args: argparse.Namespace) -> TrainConfig:
    # fields without a flag here (emulate_step_s: the system benchmarks only) keep their defaults
    return TrainConfig(**{k: getattr(args, k) for k in TrainConfig.field_names() if hasattr(args, k)})


def fail(message: str) -> int:
    print0(f"base_train: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def install_stop_handlers(trainer: Trainer) -> None:
    def on_signal(signum, frame):
        print0(f"received {signal.Signals(signum).name}: stopping at the next step boundary", flush=True)
        trainer.request_stop()
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop lines past `last_step` (written by a run that died after its last checkpoint); atomic rewrite."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = train_config(args)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))

    # ---- every check that can fail runs before any process group, model or data exists
    from nanochat.distributed import gpu_job_without_gpu
    if not args.dry_run and (no_gpu := gpu_job_without_gpu(args.device_type, cfg.depth, world_size)):
        return fail(no_gpu)
    try:
        validate_config(cfg, world_size)
    except ValueError as e:
        return fail(str(e))
    wandb = None
    if args.wandb != "off" and rank == 0:
        try:
            import wandb
        except ImportError as e:
            return fail(f"--wandb {args.wandb} needs the wandb package ({e}): pip install wandb, or --wandb off")
    base_dir = None
    if args.tokenizer_dir is None or args.data_dir is None or args.checkpoint_dir is None:
        base_dir = get_base_dir()
    tokenizer_dir = args.tokenizer_dir or base_dir / "tokenizer"
    tokenizer = None
    try:
        from nanochat.tokenizer import Tokenizer, get_token_bytes

        tokenizer = Tokenizer.from_directory(tokenizer_dir)
        vocab_size = tokenizer.get_vocab_size()
    except (FileNotFoundError, OSError, ValueError) as e:
        if not args.dry_run:
            return fail(f"no tokenizer in {tokenizer_dir} ({e}); train one with `python -m scripts.tok_train`")
        vocab_size = DEFAULT_VOCAB
        print0(f"(dry run: no tokenizer in {tokenizer_dir}, assuming vocab {vocab_size:,})")
    try:
        plan = plan_training(cfg, vocab_size, world_size)
    except ValueError as e:
        return fail(str(e))
    print0(plan.describe())
    if args.dry_run:
        return 0

    from nanochat.dataset import list_parquet_files, split_files

    data_dir = args.data_dir or base_dir / "base_data"
    shards = list_parquet_files(data_dir)
    try:
        train_files = split_files(shards, "train")
        val_files = split_files(shards, "val")
    except ValueError as e:
        return fail(f"{data_dir}: {e}")
    checkpoint_dir = args.checkpoint_dir or base_dir / "base_checkpoints" / args.run
    last = ckpt.find_last_checkpoint(checkpoint_dir)
    if last is not None and not args.resume:
        return fail(f"{checkpoint_dir} already holds checkpoints (last: {last.name}); pass --resume to continue "
                    f"that run, or choose another --run / --checkpoint_dir")

    # ---- work starts here
    from nanochat.dataloader import DataLoader
    from nanochat.distributed import cleanup_distributed, init_distributed

    dist_info = init_distributed(args.device_type)
    device = dist_info.device
    trainer = Trainer.create(cfg, plan, dist_info)
    install_stop_handlers(trainer)
    metrics_path = checkpoint_dir / "metrics.jsonl"
    cursor = None
    if last is not None:
        meta = trainer.load_checkpoint(last)
        try:
            cursor = trainer.data_cursor_for_rank(meta)
        except ValueError as e:
            cleanup_distributed()
            return fail(f"{last}: {e}")
        changed = {k: (v, getattr(cfg, k)) for k, v in meta["train_config"].items() if getattr(cfg, k, v) != v}
        if changed:
            print0(f"warning: settings differ from the checkpoint's (was, now): {changed}")
        print0(f"resumed from {last} (step {trainer.step_count}, {trainer.tokens_trained:,} tokens)")
        if rank == 0:
            trim_metrics(metrics_path, trainer.step_count)
    else:
        if args.resume:
            print0(f"no checkpoint in {checkpoint_dir}: starting from scratch")
        if rank == 0:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            metrics_path.unlink(missing_ok=True)
    # On CPU a short read-ahead: the loader's default (8 x 64 documents) keeps a tokenizer thread busy for
    # seconds at the start and starves the training step of the cores it shares with it.
    loader_kwargs = {} if device.type == "cuda" else dict(tokenizer_threads=1, tokenizer_batch=16, prefetch=2)
    trainer.train_batches = make_train_batches(tokenizer, cfg, plan, dist_info.rank, world_size, device,
                                               train_files, state=cursor, **loader_kwargs)
    token_bytes = get_token_bytes(tokenizer_dir, device=device)
    eval_steps = max(1, args.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * world_size))

    def evaluate() -> float:
        loader = DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, split="val", device=device,
                            files=val_files, rank=dist_info.rank, world_size=world_size, **loader_kwargs)
        try:
            return trainer.evaluate_bpb(loader, eval_steps, token_bytes)
        finally:
            loader.close()

    wandb_run = None
    if wandb is not None:
        wandb_run = wandb.init(project="nanochat", name=args.run, mode=args.wandb,
                               config={**asdict(cfg), "num_params": plan.num_params, "world_size": world_size},
                               dir=str(checkpoint_dir))

    metrics_file = open(metrics_path, "a") if rank == 0 else None  # noqa: SIM115 (closed below)

    def on_step(result, val_bpb):
        if metrics_file is not None:
            record = {"step": result.step, "loss": result.loss, "lrm": result.lr_multiplier,
                      "tokens": result.tokens, "dt": result.dt, "wall_ts": round(time.time(), 3)}
            if result.grad_norm is not None:
                record["grad_norm"] = result.grad_norm
            if val_bpb is not None:
                record["val_bpb"] = val_bpb
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if wandb_run is not None:
            wandb_run.log({"train/loss": result.loss, "train/lrm": result.lr_multiplier,
                           "train/tok_per_sec": result.tokens_per_sec,
                           **({"train/grad_norm": result.grad_norm} if result.grad_norm is not None else {}),
                           **({"val/bpb": val_bpb} if val_bpb is not None else {})}, step=result.step)

    try:
        outcome = train_loop(trainer, checkpoint_dir, save_every=args.save_every,
                             keep=args.keep_checkpoints if args.keep_checkpoints > 0 else None,
                             eval_every=args.eval_every if val_files else -1, evaluate=evaluate, on_step=on_step)
        if rank == 0 and outcome.reason in ("horizon", "data"):
            final = ckpt.save_model(checkpoint_dir / "final_model.safetensors", trainer.model.state_dict(),
                                    plan.model_config.to_dict(),
                                    extra={"step": trainer.step_count, "tokens": trainer.tokens_trained,
                                           "val_bpb": outcome.val_bpb})
            print0(f"final model: {final}")
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if wandb_run is not None:
            wandb_run.finish()
        if hasattr(trainer.train_batches, "close"):
            trainer.train_batches.close()
        cleanup_distributed()
    if outcome.reason == "stop":
        print0(f"stopped at step {outcome.step}; continue with --resume")
        return EXIT_STOPPED
    print0(f"done: {outcome.reason} at step {outcome.step}, last loss {outcome.last_loss}, val bpb {outcome.val_bpb}")
    return 0


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    sys.exit(main())
