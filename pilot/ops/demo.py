"""`pilot demo`: the whole system on this machine, in one command, with no GPU and nothing to install by hand.

    pilot demo                    # ~5 minutes: two simulated summer days of the shipped scenario
    pilot demo --days 0.5 --speedup 1800 --depth 2     # smaller and faster

What runs, all as real processes that the demo stops when it ends or is interrupted (Ctrl-C):
  1. data: real English prose from packaged text as parquet shards, and a BPE tokenizer trained on it
     (built once under $PILOT_HOME/demo, reused afterwards);
  2. an embedded Redis for the run (RUN_DIR/redis);
  3. `flwr run . local-simulation`: the federated server and three simulated sites (Flower's simulation
     engine), each with its persistent site trainer (a tiny nanochat GPT, Muon + AdamW, on CPU);
  4. energy_simulation.py: the shipped renewable-surplus scenario (three sites, pvlib weather) from a chosen
     day, paced so that --days simulated days take days*86400/speedup seconds; the run ends with it
     (or when the token budget is reached);
  5. the centralized baselines, side by side, on the same data for the same tokens (scripts/base_train.py):
     one site's batch (RUN_DIR/baseline: K times the sequential steps of a site in a K-site round) and the
     3 sites' batch (RUN_DIR/baseline-sites: the data-parallel equivalent of the federation, DiLoCo's baseline);
  6. `pilot report RUN_DIR`: an HTML page with figures (RUN_DIR/report/index.html).
Progress is shown live in the terminal (`pilot watch RUN_ID` shows the same from another terminal).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil

from pilot import coordination, protocol
from pilot.energy.sites import DEFAULT_SCENARIO
from pilot.ops import local, watch
from pilot.site import process

# the demo's defaults: a tiny model that learns visibly in minutes on two CPU cores
START = "2025-08-09T00:00:00Z"   # two summer days with a third of the time paused, solo and federated each
DAYS = 2.0
SPEEDUP = 720.0                  # simulated seconds per wall second: two days in four minutes
ROUND_S = 3 * 3600               # a federated round: 3 simulated hours (15 s of wall time at x720)
SOLO_S = 6 * 3600                # checkpoint interval of a site training alone
DEPTH, SEQ_LEN, DEVICE_BATCH, TOTAL_BATCH = 2, 256, 8, 2048
VOCAB = 4096
TOKEN_BUDGET = 2_000_000         # the learning-rate schedule's horizon; the run usually ends with the energy
EVAL_TOKENS = 16_384
STARTUP_TIMEOUT_S = 180          # for Flower and the three site trainers to come up


def log(message: str) -> None:
    print(f"[pilot demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def demo_home() -> Path:
    return Path(os.environ.get("PILOT_HOME") or Path.home() / ".cache" / "pilot") / "demo"


def prepare_data(data_dir: Path, tokenizer_dir: Path, vocab: int) -> None:
    """Shards of packaged prose and a tokenizer trained on them, unless they are there already."""
    from nanochat.offline_corpus import write_shards

    if len(list(data_dir.glob("*.parquet"))) < 2:
        log(f"writing text shards to {data_dir} (packaged Shakespeare and KJV, ~9 MB)")
        write_shards(data_dir)
    if not (tokenizer_dir / "tokenizer.json").exists():
        log(f"training a {vocab}-token BPE tokenizer into {tokenizer_dir}")
        subprocess.run([sys.executable, "-m", "scripts.tok_train", "--data-dir", str(data_dir), "--out",
                        str(tokenizer_dir), "--vocab-size", str(vocab), "--max-chars", "20000000"],
                       check=True, cwd=local.PROJECT_ROOT, stdout=subprocess.DEVNULL)


def write_scenario(path: Path, start: str, days: float) -> None:
    """The shipped scenario, from `start` for `days` (sites, weather and thresholds unchanged)."""
    text = DEFAULT_SCENARIO.read_text()
    scenario = tomllib.loads(text)["scenario"]
    begin = datetime.fromisoformat(start.replace("Z", "+00:00")).astimezone(UTC)
    end = begin + timedelta(days=days)
    text = text.replace(f'start = "{scenario["start"]}"', f'start = "{begin.strftime("%Y-%m-%dT%H:%M:%SZ")}"', 1)
    text = text.replace(f'end = "{scenario["end"]}"', f'end = "{end.strftime("%Y-%m-%dT%H:%M:%SZ")}"', 1)
    path.write_text(text)


def run_config(args: argparse.Namespace, run_dir: Path, data_dir: Path, tokenizer_dir: Path) -> str:
    settings = {"run-id": args.run_id, "run-dir": str(run_dir), "data-dir": str(data_dir),
                "tokenizer-dir": str(tokenizer_dir), "depth": args.depth, "max-seq-len": SEQ_LEN,
                "device-batch-size": DEVICE_BATCH, "total-batch-size": TOTAL_BATCH,
                "token-budget": args.token_budget, "round-duration": args.round_s,
                "solo-checkpoint-interval": SOLO_S, "eval-tokens": EVAL_TOKENS, "site-device": "cpu"}
    return " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())


class Processes:
    """Every process the demo starts, stopped in reverse order on the way out, whatever the way out."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
        out = open(log_path, "ab")  # noqa: SIM115 (the child holds it; closed with the process)
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=local.PROJECT_ROOT,
                                start_new_session=True)  # Ctrl-C reaches the demo only; it stops them in order
        out.close()
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(psutil.Error):
                    process.kill_tree(psutil.Process(proc.pid))


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def final_event(r, run_id: str) -> dict | None:
    for _, fields in r.xrevrange(protocol.server_events_key(run_id), count=50):
        if fields.get("kind") == "finished":
            return fields
    return None


def follow(r, run_id: str, done, interval: float = 0.5) -> None:
    """Show live progress until `done()`; a rich live view on a terminal, a line every 10 s otherwise."""
    if sys.stdout.isatty():
        from rich.live import Live
        with Live(watch.render(watch.snapshot(r, run_id), "Pilot demo"), refresh_per_second=4) as live:
            while not done():
                live.update(watch.render(watch.snapshot(r, run_id), "Pilot demo"))
                time.sleep(interval)
            live.update(watch.render(watch.snapshot(r, run_id), "Pilot demo"))
        return
    last = 0.0
    while not done():
        if time.monotonic() - last >= 10:
            log(watch.one_line(watch.snapshot(r, run_id)))
            last = time.monotonic()
        time.sleep(interval)
    log(watch.one_line(watch.snapshot(r, run_id)))


BASELINES = {"baseline": 1, "baseline-sites": 3}   # folder -> sites' batches per step (the scenario's 3 sites)


def baseline_command(out: Path, args: argparse.Namespace, data_dir: Path, tokenizer_dir: Path, batch: int,
                     steps: int) -> list[str]:
    return [sys.executable, "-m", "scripts.base_train", "--run", out.name, "--checkpoint_dir", str(out),
            "--data_dir", str(data_dir), "--tokenizer_dir", str(tokenizer_dir), "--device_type", "cpu",
            "--compile", "off", "--depth", str(args.depth), "--max_seq_len", str(SEQ_LEN),
            "--device_batch_size", str(DEVICE_BATCH), "--total_batch_size", str(batch),
            "--num_iterations", str(steps), "--eval_every", str(max(1, steps // 8)),
            "--eval_tokens", str(EVAL_TOKENS), "--save_every", "0"]


def run_baselines(procs: Processes, run_dir: Path, args: argparse.Namespace, data_dir: Path, tokenizer_dir: Path,
                  tokens: int) -> int:
    """The centralized baselines at the federation's tokens, side by side: the same model and data with one
    site's batch, and with the sites' batch (fewer, larger steps); one thread each. Returns the worst exit code."""
    running = {}
    for name, sites in BASELINES.items():
        out, batch = run_dir / name, sites * TOTAL_BATCH
        steps = max(1, tokens // batch)
        out.mkdir(parents=True, exist_ok=True)
        log(f"centralized baseline ({name}): {steps} steps of {batch} tokens ({sites} site(s)' batch; "
            f"log: {out / 'train.log'})")
        running[name] = (procs.start(name, baseline_command(out, args, data_dir, tokenizer_dir, batch, steps),
                                     out / "train.log", env={**os.environ, "OMP_NUM_THREADS": "1"}), steps)
    last = 0.0
    while any(proc.poll() is None for proc, _ in running.values()):
        time.sleep(0.5)
        if time.monotonic() - last < 10:
            continue
        last = time.monotonic()
        for name, (_, steps) in running.items():
            metrics = run_dir / name / "metrics.jsonl"
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if lines:
                row = json.loads(lines[-1])
                bpb = [json.loads(x)["val_bpb"] for x in lines if "val_bpb" in x]
                log(f"{name} step {row['step']}/{steps}, loss {row['loss']:.3f}, "
                    f"val bpb {bpb[-1] if bpb else float('nan'):.4f}")
    return max(proc.returncode for proc, _ in running.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pilot demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", default=None, help="run name (default: demo-YYYYmmdd-HHMMSS)")
    parser.add_argument("--start", default=START, help=f"simulated start, ISO 8601 UTC (default {START})")
    parser.add_argument("--days", type=float, default=DAYS, help=f"simulated days (default {DAYS})")
    parser.add_argument("--speedup", type=float, default=SPEEDUP,
                        help=f"simulated seconds per wall second (default {SPEEDUP:.0f})")
    parser.add_argument("--round-s", type=int, default=ROUND_S,
                        help=f"simulated seconds per federated round (default {ROUND_S})")
    parser.add_argument("--depth", type=int, default=DEPTH, help=f"model depth (default {DEPTH})")
    parser.add_argument("--token-budget", type=int, default=TOKEN_BUDGET,
                        help=f"tokens at which the run ends if the energy has not ended it (default {TOKEN_BUDGET:,})")
    parser.add_argument("--no-baseline", action="store_true", help="skip the centralized baselines")
    parser.add_argument("--no-report", action="store_true", help="skip the report")
    parser.add_argument("--data-dir", type=Path, default=None, help="text shards (default $PILOT_HOME/demo/data)")
    parser.add_argument("--tokenizer-dir", type=Path, default=None,
                        help="tokenizer (default $PILOT_HOME/demo/tokenizer)")
    args = parser.parse_args(argv)
    args.run_id = args.run_id or datetime.now().strftime("demo-%Y%m%d-%H%M%S")
    if args.days <= 0 or args.speedup <= 0:
        parser.error("--days and --speedup must be positive")
    data_dir = (args.data_dir or demo_home() / "data").resolve()
    tokenizer_dir = (args.tokenizer_dir or demo_home() / "tokenizer").resolve()
    run_dir = coordination.default_run_dir(args.run_id).resolve()
    if (run_dir / "logs" / "events.jsonl").exists():
        parser.error(f"run {args.run_id} exists ({run_dir}): choose another --run-id")
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log(f"run {args.run_id} in {run_dir}: {args.days:g} simulated days from {args.start} at x{args.speedup:g} "
        f"(~{args.days * 86400 / args.speedup / 60:.1f} min of training time)")
    prepare_data(data_dir, tokenizer_dir, VOCAB)
    write_scenario(run_dir / "scenario.toml", args.start, args.days)

    procs = Processes()
    r = coordination.connect(run_dir=run_dir)   # the run's embedded Redis: every process of the run shares it
    flwr_home = run_dir / "flwr"
    env = local.isolated_flwr_env(flwr_home, PILOT_SITE_THREADS="1", PILOT_ORPHAN_TIMEOUT_S="120")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # flwr starts flower-superlink
    # Ctrl-C and SIGTERM clean up alike. Both handlers are set here: Python turns SIGINT into KeyboardInterrupt
    # only when its parent left SIGINT alone, and a shell ignores it for background jobs (CI ran the suite so:
    # the demo never heard the test's Ctrl-C)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    outcome = "interrupted"
    try:
        server = procs.start("server", [str(Path(sys.executable).parent / "flwr"), "run", ".", "local-simulation",
                                        "--stream", "--run-config", run_config(args, run_dir, data_dir, tokenizer_dir)],
                             run_dir / "server.log", env)
        log(f"starting Flower (simulation engine, 3 sites) and the site trainers (log: {run_dir / 'server.log'})")
        sites_up = local.wait_until(
            lambda: server.poll() is not None or len(process.trainer_pids(r, args.run_id)) >= 3, STARTUP_TIMEOUT_S)
        if server.poll() is not None or not sites_up:
            log(f"the federation did not come up; see {run_dir / 'server.log'}")
            return 1
        log(f"energy simulation starts (log: {run_dir / 'energy.log'})")
        procs.start("energy", [sys.executable, str(local.PROJECT_ROOT / "energy_simulation.py"),
                               "--scenario", str(run_dir / "scenario.toml"), "--run-id", args.run_id,
                               "--run-dir", str(run_dir), "--speedup", str(args.speedup)], run_dir / "energy.log",
                    env)
        follow(r, args.run_id, lambda: server.poll() is not None)
        finished = final_event(r, args.run_id)
        if server.returncode != 0 or finished is None:
            log(f"the federated run failed (exit {server.returncode}); see {run_dir / 'server.log'}")
            return 1
        outcome = finished["outcome"]
        tokens = int(finished["tokens"])
        log(f"federated run finished: {outcome}, {finished['round']} rounds, {tokens:,} tokens")
    except KeyboardInterrupt:
        log("interrupted: stopping every process of the demo")
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        took, mark = {}, time.monotonic()
        for stage, stop in (("server and energy simulation", procs.stop_all),
                            ("SuperLink", lambda: local.stop_local_superlink(flwr_home)),
                            ("site trainers", lambda: process.stop_trainers(r, args.run_id, grace_s=5))):
            stop()
            took[stage], mark = time.monotonic() - mark, time.monotonic()
        if outcome == "interrupted":
            coordination.release(r, run_dir)
            log("stopped: " + ", ".join(f"{stage} {s:.1f} s" for stage, s in took.items()))
    try:
        if not args.no_baseline and tokens > 0:
            if run_baselines(procs, run_dir, args, data_dir, tokenizer_dir, tokens) != 0:
                log(f"a baseline failed; see {run_dir}/baseline*/train.log")
        if not args.no_report:
            from pilot.report import cli as report
            report.main([str(run_dir)])
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        procs.stop_all()
        coordination.release(r, run_dir)
    log(f"done in {(time.monotonic() - started) / 60:.1f} min; report: {run_dir / 'report' / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
