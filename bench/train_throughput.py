"""Training throughput of a tiny nanochat config: eager against torch.compile, printed as one table.

    python -m bench.train_throughput                       # depth 4, seq 256, batch 16, vocab 8192, CPU
    python -m bench.train_throughput --depth 20 --seq 2048 --batch 8 --vocab 65536   # on a GPU

Every row is the real Trainer step (forward, backward, Muon + AdamW) on random tokens, so the data loader
is not measured; "fwd+bwd only" skips the optimizers to show their share. Tokens/s is the median over the
timed steps after warm-up (the first compiled steps include compilation, reported separately).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanochat.distributed import init_distributed
from nanochat.trainer import TrainConfig, Trainer, plan_training


def random_batches(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        yield x[:, :-1].to(device), x[:, 1:].to(device)


def measure(mode: str, args, dist_info) -> dict:
    cfg = TrainConfig(depth=args.depth, max_seq_len=args.seq, device_batch_size=args.batch,
                      total_batch_size=args.batch * args.seq, num_iterations=10 ** 6,
                      compile="on" if mode == "compiled" else "off")
    plan = plan_training(cfg, args.vocab, 1)
    trainer = Trainer.create(cfg, plan, dist_info, train_batches=random_batches(args.vocab, args.batch, args.seq,
                                                                                 dist_info.device))
    if mode == "fwd+bwd only":
        for opt in trainer.optimizers.values():
            opt.step = lambda *a, **k: None
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        trainer.step()
    warmup_s = time.perf_counter() - t0
    dts = [trainer.step().dt for _ in range(args.steps)]
    dt = statistics.median(dts)
    return {"mode": mode, "params": plan.num_params, "tok_s": plan.total_batch_size / dt, "step_ms": 1000 * dt,
            "warmup_s": warmup_s, "mfu": trainer.mfu(plan.total_batch_size / dt)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--modes", default="eager,fwd+bwd only,compiled")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist_info = init_distributed()
    print(f"device {dist_info.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; depth "
          f"{args.depth}, seq {args.seq}, batch {args.batch}, vocab {args.vocab}, {args.steps} timed steps")
    rows = [measure(mode.strip(), args, dist_info) for mode in args.modes.split(",")]
    base = next((r["tok_s"] for r in rows if r["mode"] == "eager"), rows[0]["tok_s"])
    print(f"{'mode':<14} {'params':>12} {'tokens/s':>10} {'vs eager':>9} {'step ms':>9} {'warm-up s':>10} {'MFU':>6}")
    for r in rows:
        mfu = f"{r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['mode']:<14} {r['params']:>12,} {r['tok_s']:>10,.0f} {r['tok_s'] / base:>8.2f}x "
              f"{r['step_ms']:>9.1f} {r['warmup_s']:>10.1f} {mfu:>6}")


if __name__ == "__main__":
    main()
