"""The GPU path in one script: a person with one GPU runs it (under 8 minutes) and gets one table.

    .venv/bin/python bench/gpu_check.py                  # one GPU: base_train d20 steps + a federated round
    .venv/bin/python bench/gpu_check.py --nproc 2        # 2+ GPUs: the steps under NCCL with two ranks, and a
                                                         # stop request honoured at the next step boundary
    .venv/bin/python bench/gpu_check.py --peak-tflops 180   # a GPU missing from the peak table below

Rows of the table (docs/gpu_check.md shows it):
1. base_train steps: the d20 model (nanochat's Trainer: bf16 autocast, torch.compile, Muon + AdamW, gradient
   clipping) on synthetic tokens, the seed's 524,288-token step: tokens/s, MFU against the GPU's dense bf16
   peak (FLOPs per token as nanochat counts them: 6 x non-embedding parameters + 12 x layers x heads x
   head_dim x sequence), peak memory, compile seconds (first step minus a steady one).
2. a federated round: `flwr run . local-simulation-gpu` (the project's connection, one site) with a site
   trainer on the GPU, real text (the offline corpus), weights over the data plane; figures from the run's
   logs (RUN_DIR/logs/*.jsonl): steps and tokens/s of the site trainer, seconds of the round outside steps.

Without a GPU it says so and exits 0 after checking that everything it would run imports and parses:
nanochat's model and trainer (a tiny model, one forward on the CPU), `scripts.base_train --dry_run` with the
d20 flags, the `local-simulation-gpu` connection in .flwr/config.toml, and Flower's CLI. Pilot's own modules
are reached only through commands (`flwr run`), never imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "local-simulation-gpu"
SEQ = 2048
VOCAB = 65536                 # the classic d20's vocabulary (synthetic tokens for the step measurement)
STEP_TOKENS = 524288          # the seed's d20 step
# Dense bf16 tensor-core peak per GPU, FLOP/s (vendor data sheets, without sparsity), by a word of the name
# torch reports; the first match wins, so the more specific names come first.
PEAK_BF16 = [
    (r"\bGH200\b", 989e12), (r"\bH200\b", 989e12), (r"\bH100\b.*\bPCIe\b", 756e12), (r"\bH100\b.*\bNVL\b", 835e12),
    (r"\bH100\b", 989e12), (r"\bH800\b", 989e12), (r"\bB200\b", 2250e12), (r"\bA100\b", 312e12),
    (r"\bA800\b", 312e12), (r"\bL40S\b", 362e12), (r"\bL40\b", 181e12), (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12), (r"\bA6000\b", 155e12), (r"\bV100\b", 0.0),   # V100: no bf16 tensor cores
]
COLUMNS = [("check", 44), ("status", 8), ("tokens/s", 10), ("MFU", 7), ("peak mem", 10), ("compile s", 9),
           ("notes", 0)]


def peak_flops(name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((peak for pattern, peak in PEAK_BF16 if re.search(pattern, name)), None)


def table(rows: list[dict]) -> str:
    lines = ["  ".join(f"{title:<{width}}" if width else title for title, width in COLUMNS)]
    for row in rows:
        cells = [str(row.get(title, "-")) for title, _ in COLUMNS]
        lines.append("  ".join(f"{cell:<{width}}" if width else cell for cell, (_, width) in zip(cells, COLUMNS,
                                                                                               strict=True)))
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ checks that need no GPU
def checks_without_gpu() -> list[str]:
    """Everything the GPU run uses imports and parses; returns what was checked (raises on a failure)."""
    import torch

    from nanochat.gpt import build_model, config_from_depth
    from nanochat.trainer import TrainConfig, plan_training

    done = []
    config = config_from_depth(2, vocab_size=256, sequence_len=32)
    model = build_model(config, device="cpu", seed=0)
    x = torch.randint(0, 256, (2, 32))
    loss = model(x, x)
    assert torch.isfinite(loss), f"the tiny model's loss is {loss}"
    done.append(f"nanochat.gpt: a d2 model on the CPU, one forward (loss {loss.item():.2f})")
    plan = plan_training(TrainConfig(depth=20, max_seq_len=SEQ, device_batch_size=8, total_batch_size=STEP_TOKENS,
                                     num_iterations=10), VOCAB)
    done.append(f"nanochat.trainer: the d20 plan ({plan.num_params:,} parameters, "
                f"{plan.flops_per_token:.3e} FLOPs per token)")
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", "--dry_run", "--depth", "20",
                           "--target_param_data_ratio", "20", "--device_batch_size", "8", "--run", "baseline",
                           "--max_seq_len", str(SEQ), "--compile", "on", "--tokenizer_dir", str(ROOT / "nonexistent")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or "parameters:" not in proc.stdout:
        raise RuntimeError(f"scripts.base_train --dry_run failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    params = re.search(r"parameters: ([\d,]+)", proc.stdout).group(1)
    done.append(f"scripts.base_train --dry_run --depth 20 ...: exit 0, {params} parameters")
    conn = connection_options()
    done.append(f".flwr/config.toml [{CONNECTION}]: {conn.get('num-supernodes')} SuperNodes, "
                f"{conn.get('backend', {}).get('client-resources', {}).get('num-gpus')} GPU per ClientApp")
    proc = subprocess.run([str(BIN / "flwr"), "run", "--help"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"`flwr run --help` failed: {proc.stderr[-1000:]}")
    done.append("flwr run --help: the Flower CLI of this venv answers")
    done.append(f"torch {torch.__version__}: NCCL {'available' if torch.distributed.is_nccl_available() else 'absent'}"
                f" in this build")
    return done


def connection_options() -> dict:
    config = tomllib.loads((ROOT / ".flwr" / "config.toml").read_text())
    conn = config.get("superlink", {}).get(CONNECTION)
    if conn is None:
        raise RuntimeError(f".flwr/config.toml has no [superlink.{CONNECTION}] connection")
    options = conn.get("options", {})
    gpus = options.get("backend", {}).get("client-resources", {}).get("num-gpus", 0)
    if not gpus:
        raise RuntimeError(f"[superlink.{CONNECTION}] gives the ClientApps no GPU (num-gpus {gpus})")
    return options


# ------------------------------------------------------------------ row 1: base_train steps (a worker process)
def steps_worker(args: argparse.Namespace) -> None:
    """Runs under torchrun (--nproc > 1) or alone; rank 0 writes the figures to args.out as JSON."""
    import torch
    import torch.distributed as dist

    from nanochat.distributed import cleanup_distributed, init_distributed
    from nanochat.trainer import TrainConfig, Trainer, plan_training

    info = init_distributed("cuda")
    cfg = TrainConfig(depth=args.depth, max_seq_len=SEQ, device_batch_size=args.device_batch_size,
                      total_batch_size=STEP_TOKENS, num_iterations=10_000, compile="on")
    plan = plan_training(cfg, VOCAB, info.world_size)
    gen = torch.Generator(device=info.device).manual_seed(1000 + info.rank)

    def batches():
        while True:
            x = torch.randint(0, VOCAB, (cfg.device_batch_size, SEQ + 1), device=info.device, generator=gen)
            yield x[:, :-1], x[:, 1:]

    trainer = Trainer.create(cfg, plan, info, train_batches=batches())
    torch.cuda.reset_peak_memory_stats(info.device)
    first = trainer.step()
    dts = [trainer.step().dt for _ in range(args.steps)]
    steady = sorted(dts)[len(dts) // 2]
    out = {"world_size": info.world_size, "params": plan.num_params, "flops_per_token": plan.flops_per_token,
           "first_step_s": first.dt, "step_s": steady, "tokens_per_s": STEP_TOKENS / steady,
           "peak_mem_gib": torch.cuda.max_memory_allocated(info.device) / 2**30, "steps": args.steps,
           "grad_accum": plan.grad_accum_steps, "loss": first.loss}
    if info.world_size > 1:
        # a stop asked for on rank 0 alone: every rank must stop at the next step boundary (one step)
        if info.rank == 0:
            trainer.request_stop()
        result = trainer.step()
        stops = torch.tensor([1.0 if result.stop else 0.0, float(result.step)], device=info.device)
        gathered = [torch.zeros_like(stops) for _ in range(info.world_size)]
        dist.all_gather(gathered, stops)
        out["stop_all_ranks"] = all(g[0].item() == 1.0 for g in gathered)
        out["stop_same_step"] = len({g[1].item() for g in gathered}) == 1
        peaks = torch.tensor([out["peak_mem_gib"]], device=info.device)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        out["peak_mem_gib"] = peaks.item()
    if info.rank == 0:
        Path(args.out).write_text(json.dumps(out))
    cleanup_distributed()


def run_steps(args: argparse.Namespace, peak: float | None, tmp: Path) -> dict:
    out = tmp / f"steps-{args.nproc}.json"
    worker = [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--depth", str(args.depth),
              "--steps", str(args.steps), "--device-batch-size", str(args.device_batch_size)]
    if args.nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   *worker]
    else:
        command = [sys.executable, *worker]
    name = f"base_train d{args.depth} bf16 compiled, {args.nproc} rank(s)"
    started = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"check": name, "status": "FAILED", "notes": f"no result within {args.timeout} s"}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return {"check": name, "status": "FAILED", "notes": " | ".join(tail)}
    r = json.loads(out.read_text())
    mfu = (f"{100 * r['flops_per_token'] * r['tokens_per_s'] / (peak * r['world_size']):.1f}%" if peak else "?")
    notes = (f"{r['steps']} steps of {STEP_TOKENS:,} tokens ({r['grad_accum']} micro-steps of "
             f"{args.device_batch_size}x{SEQ}), {r['step_s']:.2f} s/step, {time.monotonic() - started:.0f} s in all")
    if "stop_all_ranks" in r:
        ok = r["stop_all_ranks"] and r["stop_same_step"]
        notes += f"; NCCL stop at the next step boundary on every rank: {'yes' if ok else 'NO'}"
    return {"check": name, "status": "ok", "tokens/s": f"{r['tokens_per_s']:,.0f}", "MFU": mfu,
            "peak mem": f"{r['peak_mem_gib']:.1f} GiB", "compile s": f"{r['first_step_s'] - r['step_s']:.1f}",
            "notes": notes}


# ------------------------------------------------------------------ row 2: a federated round on the GPU
def flwr_home_for(tmp: Path, sites: int) -> Path:
    """A Flower home holding the project's connections, with CONNECTION cut down to `sites` SuperNodes."""
    home = tmp / "flwr-home"
    home.mkdir()
    text = (ROOT / ".flwr" / "config.toml").read_text()
    section = re.search(rf"^\[superlink\.{re.escape(CONNECTION)}\]\n(?:(?!\[).*\n?)*", text, re.M)
    patched = re.sub(r"^options\.num-supernodes = \d+", f"options.num-supernodes = {sites}", section.group(0),
                     flags=re.M)
    (home / "config.toml").write_text(text[:section.start()] + patched + text[section.end():])
    return home


def stop_processes_of(marker: str) -> None:
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []) and proc.pid != os.getpid():
                proc.kill()
        except psutil.Error:
            pass


def run_federated(args: argparse.Namespace, peak: float | None, tmp: Path) -> dict:
    name = f"site trainer d{args.fed_depth} via {CONNECTION}, 1 site"
    data, tokenizer, run_dir = tmp / "data", tmp / "tokenizer", tmp / "run"
    for command in ([sys.executable, "-m", "nanochat.offline_corpus", "--out", str(data), "--num-shards", "8"],
                    [sys.executable, "-m", "scripts.tok_train", "--max_chars=20000000", f"--vocab_size={VOCAB}",
                     "--data-dir", str(data), "--out", str(tokenizer)]):
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return {"check": name, "status": "FAILED", "notes": f"{command[2]}: {proc.stderr.strip()[-300:]}"}
    home = flwr_home_for(tmp, 1)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    run_config = " ".join([
        'run-id="gpu-check"', f'run-dir="{run_dir}"', f'data-dir="{data}"', f'tokenizer-dir="{tokenizer}"',
        'curtailment="always"', f"round-duration={args.round_seconds}", f"max-rounds={args.rounds}",
        f"depth={args.fed_depth}", f"max-seq-len={SEQ}", f"device-batch-size={args.fed_batch}",
        f"total-batch-size={args.fed_batch * SEQ}", "eval-tokens=65536", 'site-device="cuda"', "site-nproc=1"])
    started = time.monotonic()
    try:
        proc = subprocess.run([str(BIN / "flwr"), "run", ".", CONNECTION, "--stream", "--run-config", run_config],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"check": name, "status": "FAILED", "notes": f"no result within {args.timeout} s"}
    finally:
        stop_processes_of(str(tmp))   # `flwr run` leaves its local SuperLink, Ray and the run's Redis running
    wall = time.monotonic() - started
    events = read_jsonl(run_dir / "logs" / "events.jsonl")
    steps = read_jsonl(run_dir / "logs" / "steps.jsonl")
    ends = [e for e in events if e.get("kind") == "round-end" and int(e.get("tokens") or 0) > 0]
    if proc.returncode != 0 or not ends:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return {"check": name, "status": "FAILED", "notes": f"exit {proc.returncode}, {len(ends)} round(s) with "
                                                             f"tokens: " + " | ".join(tail)}
    results = [e for e in events if e.get("kind") == "site-result" and e.get("status") == "ok"]
    last = results[-1] if results else {}
    steady = [s for s in steps if int(s.get("round", 0)) == int(last.get("round", -1))] or steps
    step_s = sorted(float(s["seconds"]) for s in steady)[len(steady) // 2] if steady else None
    overhead = float(last.get("seconds_total", 0)) - float(last.get("seconds_training", 0)) if last else None
    notes = (f"{len(ends)} round(s), {sum(int(e['tokens']) for e in ends):,} tokens; last round "
             f"{last.get('steps', '?')} steps, {overhead:.1f} s outside steps" if last else f"{len(ends)} round(s)")
    notes += f"; val bpb {ends[-1].get('val_bpb')}; {wall:.0f} s in all"
    row = {"check": name, "status": "ok", "notes": notes}
    if step_s:
        from nanochat.tokenizer import Tokenizer
        from nanochat.trainer import TrainConfig, plan_training

        vocab = Tokenizer.from_directory(tokenizer).get_vocab_size()
        plan = plan_training(TrainConfig(depth=args.fed_depth, max_seq_len=SEQ, device_batch_size=args.fed_batch,
                                         total_batch_size=args.fed_batch * SEQ, num_iterations=1), vocab)
        tokens_s = args.fed_batch * SEQ / step_s
        row["tokens/s"] = f"{tokens_s:,.0f}"
        row["MFU"] = f"{100 * plan.flops_per_token * tokens_s / peak:.1f}%" if peak else "?"
    return row


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=1, help="ranks of the step check (NCCL when > 1; default 1)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak in TFLOP/s, for a GPU missing from the table")
    p.add_argument("--depth", type=int, default=20, help="model depth of the step check (default 20)")
    p.add_argument("--steps", type=int, default=8, help="measured steps after the compiling one (default 8)")
    p.add_argument("--device-batch-size", type=int, default=0,
                   help="sequences per micro-step (default: 16 on a GPU of 70+ GiB, 8 from 40 GiB, else 4)")
    p.add_argument("--fed-depth", type=int, default=0, help="depth of the federated check (default: 20, or 12 "
                   "on a GPU with under 40 GiB)")
    p.add_argument("--fed-batch", type=int, default=8, help="sequences per step of the federated site (default 8)")
    p.add_argument("--rounds", type=int, default=2, help="federated rounds (default 2: the first compiles)")
    p.add_argument("--round-seconds", type=int, default=20, help="seconds per federated round (default 20)")
    p.add_argument("--skip-federated", action="store_true", help="only the step check")
    p.add_argument("--timeout", type=int, default=420, help="seconds each part may take (default 420)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag in ("nproc", "depth", "steps", "fed_batch", "rounds", "round_seconds", "timeout"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.device_batch_size < 0 or args.fed_depth < 0:
        p.error("--device-batch-size and --fed-depth must be >= 0 (0: chosen by the GPU's memory)")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.worker:
        steps_worker(args)
        return 0

    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no GPU: torch {torch.__version__} sees no CUDA device, so nothing is measured.")
        print("gpu_check: checking that everything the GPU run uses imports and parses ...")
        try:
            for line in checks_without_gpu():
                print(f"  ok  {line}")
        except Exception as error:  # noqa: BLE001 - any failure is the finding
            print(f"gpu_check: FAILED: {error}")
            return 1
        print("gpu_check: import checks passed; run this on a machine with a GPU for the table (docs/gpu_check.md)")
        return 0

    count = torch.cuda.device_count()
    if args.nproc > count:
        p.error(f"--nproc {args.nproc} but this machine has {count} GPU(s)")
    name = torch.cuda.get_device_name(0)
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    peak = peak_flops(name, args.peak_tflops)
    args.fed_depth = args.fed_depth or (20 if memory_gib >= 40 else 12)
    args.device_batch_size = args.device_batch_size or (16 if memory_gib >= 70 else 8 if memory_gib >= 40 else 4)
    source = "--peak-tflops" if args.peak_tflops else "table"
    print(f"gpu_check: {name} x {count} ({memory_gib:.0f} GiB each), torch {torch.__version__}, bf16 peak "
          + (f"{peak / 1e12:.0f} TFLOP/s ({source})" if peak else "unknown (pass --peak-tflops for MFU)"), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        print(f"gpu_check: {args.steps + 1} base_train steps of d{args.depth} on {args.nproc} GPU(s) ...", flush=True)
        rows.append(run_steps(args, peak, tmp))
        if not args.skip_federated:
            print(f"gpu_check: a federated run ({args.rounds} x {args.round_seconds} s rounds, d{args.fed_depth}) "
                  f"through `flwr run . {CONNECTION}` ...", flush=True)
            rows.append(run_federated(args, peak, tmp))
        shutil.rmtree(tmp / "flwr-home", ignore_errors=True)
    print()
    print(table(rows))
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
