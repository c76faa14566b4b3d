"""Quantized pseudo-gradients (pilot/dataplane/quantize.py) at d20 size: bytes, encode/decode seconds, error.

Bytes are exact for the whole d20 state (nanochat's depth-20 shapes from a meta-device model: 560,988,160
parameters, vocab 65,536), computed from the shapes alone. Seconds are measured on a subset (--layers blocks
plus lm_head, allocated once) and extrapolated to d20 by parameter count, labelled as such: memory here is
24 GB shared, and a full d20 start + end + residual + decoded set would need ~8 GB. Error: K sites' deltas
over R rounds on a smaller subset (--error-layers blocks), mean update relative to the exact fp32 mean,
for bf16 (the current payload) and each quantized kind, with and without error feedback (cumulative over the
rounds: what the global model has received after R rounds).

The deltas are synthetic but shaped like DiLoCo pseudo-gradients of Muon + AdamW training (stated, not
measured): per matrix a low-rank part plus dense noise with log-normal per-row magnitudes (Muon's
orthogonalised steps are dense with row-wise scale differences; embedding rows of rare tokens barely move),
a fresh draw per site and round, correlated across sites. Validation bits per byte with the codec wired in
is bench/quality.py's job.

    .venv/bin/python bench/quantize.py                     # 2 layers + lm_head timed, 1 layer for errors
    .venv/bin/python bench/quantize.py --layers 4 --block 1024
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanochat.gpt import GPT, GPTConfig, config_from_depth  # noqa: E402
from pilot.dataplane.quantize import (  # noqa: E402
    KINDS,
    ErrorFeedback,
    add_decoded,
    decode_delta,
    encode_delta,
    encoded_bytes,
    payload_bytes,
)

VOCAB = 65536
GB = 1e9


def d20_shapes() -> dict[str, torch.Size]:
    cfg = config_from_depth(20, sequence_len=2048)
    cfg = GPTConfig(**{**cfg.to_dict(), "vocab_size": VOCAB})
    with torch.device("meta"):
        model = GPT(cfg)
    return {k: v.shape for k, v in model.state_dict().items() if v.is_floating_point()}


def subset(shapes: dict[str, torch.Size], layers: int, head: bool) -> dict[str, torch.Size]:
    keep = {f".h.{i}." for i in range(layers)}
    return {k: s for k, s in shapes.items() if any(p in k for p in keep) or (head and k.startswith("lm_head"))}


def synthetic_delta(shapes: dict[str, torch.Size], seed: int, shared_seed: int, size: float = 1e-3) -> dict:
    """A pseudo-gradient-like delta: rank-4 structure shared by the sites of a round + per-site dense noise,
    log-normal row magnitudes (fixed per tensor, as the parameters' own scales are)."""
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
        rows, cols = shape[0], shape[1] if len(shape) > 1 else 1
        g_shared = torch.Generator().manual_seed(shared_seed * 1000 + i)
        g_site = torch.Generator().manual_seed(seed * 1000 + i)
        g_rows = torch.Generator().manual_seed(i)
        row_scale = torch.randn(rows, 1, generator=g_rows).mul_(0.5).exp_()
        d = torch.randn(rows, 4, generator=g_shared) @ torch.randn(4, cols, generator=g_shared)
        d.mul_(0.5).add_(torch.randn(rows, cols, generator=g_site)).mul_(row_scale).mul_(size)
        out[name] = d.view(shape)
    return out


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def bench_speed(shapes: dict[str, torch.Size], full_params: int, block: int, repeats: int) -> list[tuple]:
    n = sum(s.numel() for s in shapes.values())
    gen = torch.Generator().manual_seed(0)
    start = {k: torch.empty(s).uniform_(-0.02, 0.02, generator=gen) for k, s in shapes.items()}
    end = {k: v - torch.randn(v.shape, generator=gen) * 1e-3 for k, v in start.items()}
    decoded = {k: torch.empty(s) for k, s in shapes.items()}
    rows = []
    for kind, bits in KINDS.items():
        ef = ErrorFeedback(kind, block=block)
        payload = ef.encode(start, end)          # first calls allocate and touch buffers: time the steady state
        decode_delta(payload, bits, out=decoded, start=start)
        t_enc = t_dec = float("inf")
        for _ in range(repeats):   # best of: the machine is shared
            payload, t = timed(lambda ef=ef: ef.encode(start, end))
            t_enc = min(t_enc, t)
            _, t = timed(lambda payload=payload, bits=bits: decode_delta(payload, bits, out=decoded, start=start))
            t_dec = min(t_dec, t)
        rows.append((kind, t_enc, t_dec, t_enc * full_params / n, t_dec * full_params / n, payload_bytes(payload)))
        del ef, payload
    return rows


def rel(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).double().norm() ** 2) for k in b)
    den = sum(float(b[k].double().norm() ** 2) for k in b)
    return (num / den) ** 0.5


def bench_error(shapes: dict[str, torch.Size], sites: int, rounds: int, block: int) -> dict[str, tuple]:
    zeros = lambda: {k: torch.zeros(s) for k, s in shapes.items()}  # noqa: E731
    exact, bf16 = zeros(), zeros()
    codecs = {kind: (bits, [ErrorFeedback(kind, block=block) for _ in range(sites)], zeros(), zeros())
              for kind, bits in KINDS.items()}
    first = {}
    for rnd in range(rounds):
        for site in range(sites):
            delta = synthetic_delta(shapes, seed=100 * rnd + site + 1, shared_seed=rnd)
            for k, d in delta.items():
                exact[k].add_(d, alpha=1 / sites)
                bf16[k].add_(d.to(torch.bfloat16).float(), alpha=1 / sites)
            for _, (bits, efs, with_ef, without) in codecs.items():
                add_decoded(efs[site].encode(delta), with_ef, bits, alpha=1 / sites)
                add_decoded(encode_delta(delta, bits=bits, block=block), without, bits, alpha=1 / sites)
        if rnd == 0:
            first = {"delta-bf16": rel(bf16, exact), **{kind: rel(c[3], exact) for kind, c in codecs.items()}}
    out = {"delta-bf16": (first["delta-bf16"], rel(bf16, exact), rel(bf16, exact))}
    for kind, (_, _, with_ef, without) in codecs.items():
        out[kind] = (first[kind], rel(without, exact), rel(with_ef, exact))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="transformer blocks timed (plus lm_head)")
    ap.add_argument("--error-layers", type=int, default=1, help="transformer blocks for the error figures")
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed encodes/decodes per kind (best is shown)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    shapes = d20_shapes()
    full = sum(s.numel() for s in shapes.values())
    bf16_bytes = 2 * full
    print(f"d20: {full:,} parameters; bf16 delta {bf16_bytes / GB:.3f} GB; block {args.block}, bf16 scales")
    print(f"{'payload':<12} {'bytes (d20, exact)':>20} {'bits/param':>10} {'vs bf16':>8}")
    print(f"{'delta-bf16':<12} {bf16_bytes:>20,} {16:>10.3f} {1:>7.2f}x")
    for kind, bits in KINDS.items():
        b = encoded_bytes(shapes, bits, args.block)
        print(f"{kind:<12} {b:>20,} {8 * b / full:>10.3f} {bf16_bytes / b:>7.2f}x")

    timed_shapes = subset(shapes, args.layers, head=True)
    n = sum(s.numel() for s in timed_shapes.values())
    print(f"\nseconds: measured on {args.layers} block(s) + lm_head = {n:,} parameters ({args.threads} threads), "
          f"extrapolated x{full / n:.2f} to d20 (labelled 'est.'), best of {args.repeats}")
    print(f"{'payload':<12} {'encode+EF s':>12} {'decode s':>9} {'d20 encode est.':>16} {'d20 decode est.':>16} "
          f"{'subset bytes':>14}")
    for kind, t_enc, t_dec, e_enc, e_dec, nbytes in bench_speed(timed_shapes, full, args.block, args.repeats):
        print(f"{kind:<12} {t_enc:>12.2f} {t_dec:>9.2f} {e_enc:>16.1f} {e_dec:>16.1f} {nbytes:>14,}")

    err_shapes = subset(shapes, args.error_layers, head=False)
    m = sum(s.numel() for s in err_shapes.values())
    print(f"\nerror of the mean update vs exact fp32 (synthetic deltas; {args.sites} sites x {args.rounds} rounds; "
          f"{m:,} parameters): ||mean_codec - mean_fp32|| / ||mean_fp32||")
    errors = bench_error(err_shapes, args.sites, args.rounds, args.block)
    base = errors["delta-bf16"][2]
    print(f"{'payload':<12} {'round 1':>9} {f'{args.rounds} rounds, no EF':>18} {f'{args.rounds} rounds, EF':>15} "
          f"{'EF / bf16':>10}")
    for kind, (r1, plain, ef) in errors.items():
        print(f"{kind:<12} {r1:>9.2e} {plain:>18.2e} {ef:>15.2e} {ef / base:>10.1f}")


if __name__ == "__main__":
    main()
