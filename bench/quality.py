"""Federated quality at equal tokens: validation bits per byte of the federation against data-parallel training.

On the offline corpus (nanochat.offline_corpus, a tokenizer trained on it), side by side in one run, every run
seeing the same number of training tokens (the token budget), from the same initial weights (seed 42):

    (a)   centralized, one site's batch: scripts.base_train with a site's total batch (the demo's baseline)
    (b)   centralized, K sites' batch: scripts.base_train with K x a site's batch, the data-parallel equivalent of
          K sites (the DiLoCo paper's baseline); (a) takes K times as many sequential optimizer steps as (b)
    (c)   federated: the real federation on loopback (SuperLink, one SuperNode per site, ServerApp, ClientApps,
          site trainers, the weights data plane), curtailment="always", token-budget = the budget, under
          plain averaging or the Nesterov outer optimizer, H inner steps per round, sync or overlap rounds

Validation, apples to apples: every run's final model is evaluated by this script with the server's evaluator
(pilot/server/training.py `evaluate`: the LAST parquet shard, the first eval-tokens tokens, device-batch x
seq-len batches); the runs' own last figures (base_train's metrics.jsonl at the horizon, the federation's last
round-end event) are printed beside it as a check, and their curves (val bpb against tokens) come from them.
Rounds are H inner steps (the run setting round-steps), whatever the machine's load: a site hands in after H
steps; round-duration is only a safety bound. The actual mean H is read from the site-result events (the last
round may be shorter: the steps left to the budget).

    .venv/bin/python bench/quality.py --quick            # depth 2, 150k tokens, 3 federated configurations (764 s under heavy load)
    .venv/bin/python bench/quality.py                    # depth 4, 600k tokens, K=2, all 11 configurations
    .venv/bin/python bench/quality.py --sites 2,3 --only 1,2,6   # K=3 too; a subset of the configurations (--list)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from pilot.coordination import EmbeddedRedis, free_port, wait_for_port  # noqa: E402


@dataclass(frozen=True)
class Fed:
    outer: str            # outer-optimizer
    h: int                # target inner steps per round
    mode: str = "sync"    # round-mode
    lr: float = 0.7       # outer-lr (nesterov)
    momentum: float = 0.9
    payload: str = "delta-bf16"   # update-payload

    def label(self, k: int) -> str:
        opt = "average" if self.outer == "none" else f"nesterov lr {self.lr:g} mom {self.momentum:g}"
        wire = "" if self.payload == "delta-bf16" else f", {self.payload.removeprefix('delta-')}"
        return f"(c) K={k} {opt}, H {self.h}, {self.mode}{wire}"


FULL = [Fed("none", 25), Fed("nesterov", 25), Fed("nesterov", 10), Fed("nesterov", 25, lr=0.5),
        Fed("nesterov", 25, lr=1.0), Fed("nesterov", 25, mode="overlap"), Fed("none", 25, mode="overlap"),
        Fed("none", 10), Fed("none", 25, payload="delta-int4"), Fed("none", 25, payload="delta-int2"),
        Fed("none", 100), Fed("nesterov", 10, lr=0.5), Fed("nesterov", 10, lr=1.0), Fed("nesterov", 10, lr=0.5, momentum=0.5),
        Fed("none", 10, mode="overlap")]
QUICK = [Fed("none", 25), Fed("nesterov", 25), Fed("nesterov", 25, mode="overlap")]


@dataclass
class Result:
    label: str
    k: int                       # sites of the comparison ((a): 1)
    tokens: int = 0
    val_bpb: float | None = None        # this script's evaluator on the final model
    logged_bpb: float | None = None     # the run's own last figure
    curve: list[tuple[int, float]] = field(default_factory=list)
    wall_s: float = 0.0
    steps: str = ""              # sequential optimizer steps (centralized) or mean H and rounds (federated)
    error: str = ""


# ------------------------------------------------------------------ data and the one evaluator
def prepare(work: Path, vocab: int) -> tuple[Path, Path]:
    data, tok = work / "data", work / "tokenizer"
    if not data.is_dir():
        subprocess.run([sys.executable, "-m", "nanochat.offline_corpus", "--out", str(data), "--num-shards", "8"],
                       check=True, capture_output=True, cwd=ROOT)
    if not tok.is_dir():
        subprocess.run([sys.executable, "-m", "scripts.tok_train", "--max_chars=20000000", f"--vocab_size={vocab}",
                        "--data-dir", str(data), "--out", str(tok)], check=True, capture_output=True, cwd=ROOT)
    return data, tok


def evaluate(model_path: Path, data: Path, tok: Path, batch: int, seq: int, eval_tokens: int) -> float:
    """The server's evaluation (pilot/server/training.py GlobalModel.evaluate) of a final model file."""
    import torch

    from nanochat.checkpoint import load_model
    from nanochat.dataloader import DataLoader
    from nanochat.dataset import list_parquet_files
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import Tokenizer, get_token_bytes

    torch.set_num_threads(2)
    model = load_model(model_path, device="cpu").eval()
    loader = DataLoader(Tokenizer.from_directory(tok), batch, seq, split="val", files=[list_parquet_files(data)[-1]])
    try:
        return evaluate_bpb(model, loader, max(1, eval_tokens // (batch * seq)), get_token_bytes(tok))
    finally:
        loader.close()


# ------------------------------------------------------------------ (a) and (b): scripts.base_train
def centralized(work: Path, name: str, data: Path, tok: Path, a: argparse.Namespace, k: int) -> subprocess.Popen:
    batch = k * a.site_batch
    steps = a.tokens // batch
    out = work / name
    shutil.rmtree(out, ignore_errors=True)   # base_train refuses a folder that holds checkpoints
    cmd = [sys.executable, "-m", "scripts.base_train", "--depth", str(a.depth), "--max_seq_len", str(a.seq_len),
           "--device_batch_size", str(a.device_batch), "--total_batch_size", str(batch), "--num_iterations", str(steps),
           "--eval_every", str(max(1, steps // a.curve_points)), "--eval_tokens", str(a.eval_tokens),
           "--save_every", "0", "--data_dir", str(data), "--tokenizer_dir", str(tok), "--checkpoint_dir", str(out),
           "--device_type", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}   # one site's compute, as a site trainer has
    log = open(work / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def centralized_result(work: Path, name: str, label: str, k: int, a, data, tok, wall: float, rc: int) -> Result:
    res = Result(label, k, wall_s=wall)
    metrics = work / name / "metrics.jsonl"
    final = work / name / "final_model.safetensors"
    if rc != 0 or not final.is_file():
        res.error = f"exit {rc}: " + (work / f"{name}.log").read_text()[-600:]
        return res
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    res.tokens = rows[-1]["tokens"]
    res.curve = [(r["tokens"], r["val_bpb"]) for r in rows if "val_bpb" in r]
    res.logged_bpb = res.curve[-1][1] if res.curve else None
    res.steps = f"{rows[-1]['step']} steps of {k * a.site_batch}"
    res.val_bpb = evaluate(final, data, tok, a.device_batch, a.seq_len, a.eval_tokens)
    return res


def step_seconds(work: Path, name: str) -> float:
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    dts = [r["dt"] for r in rows[3:]] or [r["dt"] for r in rows]
    return statistics.median(dts)


# ------------------------------------------------------------------ (c): the real federation
def deployment(work: Path, run_id: str, sites: int, run_config: list[str], timeout: float, threads: int) -> Path:
    """One federation to its end on a fresh SuperLink with `sites` SuperNodes; its run directory."""
    home = work / f"flwr-{run_id}"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "d"\n[superlink.d]\naddress = "127.0.0.1:{port}"\n'
                                      "insecure = true\n")
    env = {**os.environ, "FLWR_HOME": str(home), "PILOT_SITE_THREADS": str(threads), "PILOT_ORPHAN_TIMEOUT_S": "60",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    log = open(work / f"{run_id}.log", "w")  # noqa: SIM115 - closed below
    procs = [subprocess.Popen([str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)]
    for i in range(sites):
        procs.append(subprocess.Popen(
            [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}", "--port",
             str(free_port()), "--node-config", f'name="client_{i}" partition-id={i}'],
            stdout=log, stderr=subprocess.STDOUT, env=env))
    run_dir = work / run_id
    try:
        wait_for_port(port)   # a loaded machine takes seconds: `flwr run` before it fails at once
        run = subprocess.run([str(BIN / "flwr"), "run", ".", "d", "--stream", "--run-config",
                              " ".join([f'run-id="{run_id}"', f'run-dir="{run_dir}"', *run_config])],
                             stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout)
        finished = run_dir / "logs" / "events.jsonl"
        if run.returncode != 0 or not finished.is_file() or '"finished"' not in finished.read_text():
            raise RuntimeError(f"flwr run exited {run.returncode} without a finished run; see {work / f'{run_id}.log'}")
        return run_dir
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        log.close()
        stop_trainers(run_id)
        EmbeddedRedis(run_dir).stop()   # the run's embedded Redis: nothing of the run is left to release it


def stop_trainers(run_id: str) -> None:
    """Site trainers of this run that outlived it (they exit on their own at the horizon; this is a backstop)."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "pilot.site.trainer" in cmd and run_id in cmd:
            try:
                proc.terminate()
                proc.wait(10)
            except psutil.Error:
                pass


def federated_result(run_dir: Path, label: str, k: int, a, data, tok, wall: float) -> Result:
    res = Result(label, k, wall_s=wall)
    events = [json.loads(line) for line in (run_dir / "logs" / "events.jsonl").read_text().splitlines() if line.strip()]
    ends = [e for e in events if e["kind"] == "round-end"]
    res.curve = [(int(e["total_tokens"]), float(e["val_bpb"])) for e in ends if e.get("val_bpb") is not None]
    res.tokens = int(ends[-1]["total_tokens"]) if ends else 0
    res.logged_bpb = res.curve[-1][1] if res.curve else None
    steps = [int(e["steps"]) for e in events if e["kind"] == "site-result" and e.get("status") == "ok"]
    multi = [e for e in ends if len(e.get("sites", [])) > 1]
    res.steps = (f"H {statistics.mean(steps):.1f} (min {min(steps)}, max {max(steps)}), {len(multi)} rounds"
                 if steps else "no steps")
    final = run_dir / "final_model.safetensors"
    res.val_bpb = evaluate(final, data, tok, a.device_batch, a.seq_len, a.eval_tokens) if final.is_file() else None
    return res


# ------------------------------------------------------------------ the table
def curve_text(curve: list[tuple[int, float]], points: int = 5) -> str:
    if not curve:
        return "-"
    idx = sorted({round(i * (len(curve) - 1) / (points - 1)) for i in range(points)}) if len(curve) > points \
        else range(len(curve))
    return " ".join(f"{curve[i][0] / 1000:.0f}k:{curve[i][1]:.3f}" for i in idx)


def print_table(results: list[Result], a: argparse.Namespace) -> None:
    base_a = next((r.val_bpb for r in results if r.label.startswith("(a)")), None)
    base_b = {r.k: r.val_bpb for r in results if r.label.startswith("(b)")}
    print(f"\nscale: depth {a.depth}, vocab {a.vocab}, seq {a.seq_len}, site batch {a.site_batch} tokens, "
          f"budget {a.tokens:,} tokens; val: last shard, first {a.eval_tokens:,} tokens, the server's evaluator")
    print(f"{'configuration':<46} {'tokens':>9} {'val bpb':>8} {'logged':>7} {'/(b)':>7} {'/(a)':>7} {'wall s':>7}  steps")
    for r in results:
        if r.error or r.val_bpb is None:
            print(f"{r.label:<46} failed: {r.error[-300:]}")
            continue
        rb = base_b.get(r.k)
        ratio_b = f"{r.val_bpb / rb:.4f}" if rb else "-"
        ratio_a = f"{r.val_bpb / base_a:.4f}" if base_a else "-"
        logged = f"{r.logged_bpb:.4f}" if r.logged_bpb is not None else "-"
        print(f"{r.label:<46} {r.tokens:>9,} {r.val_bpb:>8.4f} {logged:>7} {ratio_b:>7} {ratio_a:>7} "
              f"{r.wall_s:>7.0f}  {r.steps}")
    print("\ncurves (tokens:val bpb, from the runs' own evaluations):")
    for r in results:
        if not r.error:
            print(f"  {r.label:<46} {curve_text(r.curve)}")
    fed = [r for r in results if r.label.startswith("(c)") and r.val_bpb is not None]
    if fed:
        best = min(fed, key=lambda r: r.val_bpb / base_b[r.k] if base_b.get(r.k) else r.val_bpb)
        if base_b.get(best.k):
            gap = best.val_bpb / base_b[best.k] - 1
            print(f"\nbest federated: {best.label}: {100 * gap:+.2f}% against (b) K={best.k} "
                  f"(goal: within 1%: {'met' if gap <= 0.01 else 'not met'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="depth 2, 150k tokens, 3 federated configurations")
    p.add_argument("--sites", default="2", help="K values, comma-separated (e.g. 2,3)")
    p.add_argument("--only", default="", help="federated configurations to run, by number (see --list)")
    p.add_argument("--list", action="store_true", help="list the federated configurations and exit")
    p.add_argument("--depth", type=int)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--device-batch", type=int, default=8)
    p.add_argument("--site-batch", type=int, help="tokens per optimizer step of one site (and of (a))")
    p.add_argument("--tokens", type=int, help="token budget of every run")
    p.add_argument("--eval-tokens", type=int)
    p.add_argument("--curve-points", type=int, default=6, help="evaluations of the centralized runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads per site (and per centralized run)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="cores the sites share (H calibration)")
    p.add_argument("--work", type=Path, help="keep every run here (default: a temporary directory)")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument("--reuse", action="store_true",
                   help="reuse centralized runs that finished in --work (same settings) instead of training them again")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))   # run the cleanups below
    quick = dict(depth=2, seq_len=128, site_batch=1024, tokens=150_000, eval_tokens=16384)
    full = dict(depth=4, seq_len=256, site_batch=2048, tokens=600_000, eval_tokens=32768)
    for key, value in (quick if a.quick else full).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    configs = QUICK if a.quick else FULL
    if a.list:
        for i, c in enumerate(configs, 1):
            print(f"{i}: {c.label(2)}")
        return
    if a.only:
        configs = [configs[int(i) - 1] for i in a.only.split(",")]
    ks = [int(k) for k in a.sites.split(",")]
    with tempfile.TemporaryDirectory(prefix="pilot-quality-") as tmp_name:
        work = a.work or Path(tmp_name)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        data, tok = prepare(work, a.vocab)
        results: list[Result] = []
        # (a) and the (b)s run side by side, one thread each (the step time of (a) calibrates the rounds)
        jobs = {"a": ("(a) centralized, one site's batch", 1)}
        jobs.update({f"b{k}": (f"(b) centralized, K={k} sites' batch", k) for k in ks})
        print(f"centralized runs {', '.join(jobs)} side by side ...", flush=True)
        started = time.monotonic()
        done = {name for name in jobs if a.reuse and (work / name / "final_model.safetensors").is_file()}
        if done:
            print(f"  reusing the finished {', '.join(sorted(done))} in {work}", flush=True)
        procs = {name: centralized(work, name, data, tok, a, k) for name, (_, k) in jobs.items() if name not in done}
        try:
            rcs = {name: proc.wait() for name, proc in procs.items()} | dict.fromkeys(done, 0)
        finally:   # interrupted (Ctrl-C, SIGTERM): no orphaned training runs
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
        wall = time.monotonic() - started
        for name, (label, k) in jobs.items():
            results.append(centralized_result(work, name, label, k, a, data, tok, wall, rcs[name]))
        dt = step_seconds(work, "a") if rcs["a"] == 0 else 1.0
        print(f"  done in {wall:.0f} s; (a) step time {dt:.3f} s", flush=True)
        common = [f'data-dir="{data}"', f'tokenizer-dir="{tok}"', 'curtailment="always"', f"depth={a.depth}",
                  f"max-seq-len={a.seq_len}", f"device-batch-size={a.device_batch}", f"total-batch-size={a.site_batch}",
                  f"eval-tokens={a.eval_tokens}", f"token-budget={a.tokens}", "max-rounds=0"]
        for k in ks:
            slowdown = max(1.0, k * a.threads / a.cores)
            for i, c in enumerate(configs, 1):
                label = c.label(k)
                # rounds are H steps; the duration is a safety bound only (10x the rounds' expected time)
                duration = max(600, round(10 * c.h * dt * slowdown))
                run_id = f"k{k}-{i}-{c.outer}-{c.lr:g}-{c.momentum:g}-h{c.h}-{c.mode}-{c.payload}"
                print(f"{label} ...", flush=True)
                started = time.monotonic()
                expected = a.tokens / k / a.site_batch * dt * slowdown
                try:
                    run_dir = deployment(work, run_id, k, common + [
                        f"round-duration={duration}", f"round-steps={c.h}", f'round-mode="{c.mode}"',
                        f'outer-optimizer="{c.outer}"', f"outer-lr={c.lr}", f"outer-momentum={c.momentum}",
                        f'update-payload="{c.payload}"'], timeout=6 * expected + 600,
                        threads=a.threads)
                    res = federated_result(run_dir, label, k, a, data, tok, time.monotonic() - started)
                except (RuntimeError, subprocess.TimeoutExpired, OSError) as error:
                    res = Result(label, k, wall_s=time.monotonic() - started, error=str(error))
                results.append(res)
                print(f"  {res.val_bpb if res.val_bpb is not None else res.error} in {res.wall_s:.0f} s; {res.steps}",
                      flush=True)
        print_table(results, a)
        print(f"\nwall time of the whole bench: {time.monotonic() - t0:.0f} s")
        if a.json:
            a.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(a).items()},
                                          "results": [r.__dict__ for r in results]}, indent=1))


if __name__ == "__main__":
    main()
