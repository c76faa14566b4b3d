"""Share of wall time the site trainers spend in optimizer steps while several sites train (federated rounds),
in a real deployment on loopback: SuperLink, one SuperNode per site, ServerApp, ClientApps, site trainers.

For each site: seconds inside optimizer steps over the wall time of the multi-site phase (first round start
to last round end), with every second of synchronisation, Flower messaging and evaluation counted as lost.
Baseline, run side by side: one site training alone for the same wall time (no round trips at all). The
reference lost ~130 s of every ~647 s round (~80% busy); rounds here are short (default 60 s) so that every
second of synchronisation shows. Then the seconds to synchronise a d20-sized state (bench/sync.py, data plane only).

    .venv/bin/python bench/round_overhead.py [--sites 2] [--rounds 3] [--round-seconds 60] [--skip-d20]
        [--round-modes sync,overlap]     # synchronous rounds and overlapped ones, side by side
        [--round-modes sync,sync-relay]  # a "-relay" mode: direct-delivery=false (round requests through Flower only)

Also printed per federated deployment: the seconds from a round's start (the server's round-start event) to a
site's first optimizer step of it (its site-result wall_start), rounds 2..N of sync rounds: the dispatch path
(Flower's message, or the server's direct copy into the trainer's inbox) plus the weights fetch.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pilot import coordination, protocol

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deployment(tmp: Path, sites: int, run_id: str, run_config: list[str], timeout: float) -> list[dict]:
    """Run one federation to its end on a fresh SuperLink with `sites` SuperNodes; its server events."""
    home = tmp / f"flwr-{run_id}"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "d"\n[superlink.d]\naddress = "127.0.0.1:{port}"\n'
                                      "insecure = true\n")
    env = {**os.environ, "FLWR_HOME": str(home), "PILOT_SITE_THREADS": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    procs = [subprocess.Popen([str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    for i in range(sites):
        procs.append(subprocess.Popen(
            [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}", "--port",
             str(free_port()), "--node-config", f'name="client_{i}" partition-id={i}'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
    run_dir = tmp / run_id
    r = coordination.connect(run_dir=run_dir)
    try:
        time.sleep(3)
        run = subprocess.run([str(BIN / "flwr"), "run", ".", "d", "--stream", "--run-config",
                              " ".join([f'run-id="{run_id}"', f'run-dir="{run_dir}"', *run_config])],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        if run.returncode != 0:
            raise RuntimeError(run.stdout[-3000:] + run.stderr[-3000:])
        return [f for _, f in r.xrange(protocol.server_events_key(run_id))]
    finally:
        for proc in procs:
            proc.kill()
        coordination.release(r, run_dir)


def busy_shares(events: list[dict], skip_first: bool) -> dict[str, float]:
    """Per site: seconds in optimizer steps / wall seconds of the phase made of the rounds considered."""
    starts = {e["round"]: float(e["wall_ts"]) for e in events if e["kind"] == "round-start"}
    ends = [e for e in events if e["kind"] == "round-end"]
    if skip_first:
        ends = ends[1:]
    wall = float(ends[-1]["wall_ts"]) - starts[ends[0]["round"]]
    training: dict[str, float] = {}
    for e in ends:
        for site, seconds in json.loads(e["training_s"]).items():
            training[site] = training.get(site, 0.0) + seconds
    return {site: seconds / wall for site, seconds in sorted(training.items())}


def start_latency(events: list[dict]) -> list[float]:
    """Seconds from each round's start to each site's first step in it (rounds 2..N: round 1 starts trainers)."""
    starts = {e["round"]: float(e["wall_ts"]) for e in events if e["kind"] == "round-start"}
    first = min(starts) if starts else 0
    return [float(e["wall_start"]) - starts[e["round"]] for e in events
            if e["kind"] == "site-result" and e["round"] in starts and e["round"] != first
            and e.get("wall_start") not in (None, "", "-") and int(e.get("steps") or 0) > 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-seconds", type=int, default=60)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--skip-d20", action="store_true", help="skip the d20-sized synchronisation (~7 GB RAM)")
    parser.add_argument("--round-modes", default="sync,overlap", help="round-mode settings to run, side by side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        subprocess.run([sys.executable, "-m", "nanochat.offline_corpus", "--out", str(tmp / "data"), "--num-shards", "6"],
                       check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "scripts.tok_train", "--max_chars=3000000", "--vocab_size=4096",
                        "--data-dir", str(tmp / "data"), "--out", str(tmp / "tokenizer")],
                       check=True, capture_output=True, cwd=ROOT)
        common = [f'data-dir="{tmp / "data"}"', f'tokenizer-dir="{tmp / "tokenizer"}"', 'curtailment="always"',
                  f"depth={args.depth}", "max-seq-len=128", "device-batch-size=4", "total-batch-size=1024",
                  "eval-tokens=1024", "token-budget=1000000000"]
        wall = args.rounds * args.round_seconds
        modes = [m for m in args.round_modes.split(",") if m]
        print(f"{len(modes) + 1} deployments follow, about {(len(modes) + 1) * (wall + 45)} s in all", flush=True)
        federated = {mode: deployment(tmp, args.sites, f"federated-{mode}",
                                      common + [f"round-duration={args.round_seconds}", f"max-rounds={args.rounds}",
                                                f'round-mode="{mode.removesuffix("-relay")}"',
                                                f"direct-delivery={'false' if mode.endswith('-relay') else 'true'}"],
                                      timeout=4 * wall + 300)
                     for mode in modes}
        solo_events = deployment(tmp, 1, "solo", common + [f"solo-checkpoint-interval={wall}", "max-rounds=1"],
                                 timeout=4 * wall + 300)
        baseline = next(iter(busy_shares(solo_events, False).values()))
        print(f"\n{'phase':>46} {'site':>9} {'busy share':>10} {'vs solo':>8}")
        print(f"{f'1 site alone, one {wall} s window (baseline)':>46} {'client_0':>9} {baseline:>10.3f} {1.0:>8.2f}")
        for mode, fed_events in federated.items():
            fed, fed_steady = busy_shares(fed_events, False), busy_shares(fed_events, True)
            for site, share in fed.items():
                print(f"{f'{args.sites} sites, {args.rounds} x {args.round_seconds} s rounds, {mode}':>46} {site:>9} "
                      f"{share:>10.3f} {share / baseline:>8.2f}")
            for site, share in fed_steady.items():
                print(f"{f'  {mode}, without round 1 (start-up)':>46} {site:>9} {share:>10.3f} "
                      f"{share / baseline:>8.2f}")
            stops = {e["round"]: float(e["wall_ts"]) for e in fed_events if e["kind"] == "round-stop"}
            gaps = [float(e["wall_ts"]) - stops[e["round"]] for e in fed_events if e["kind"] == "round-end"
                    and e["round"] in stops]
            print(f"{mode}: seconds from a round's stop signal to its checkpoint written: "
                  f"{', '.join(f'{g:.1f}' for g in gaps)}")
            if not mode.startswith("overlap"):   # (an overlapped site's steps of a round start before it)
                lat = sorted(start_latency(fed_events))
                if lat:
                    print(f"{mode}: seconds from a round's start to a site's first step in it (rounds 2..N): "
                          f"median {lat[len(lat) // 2]:.2f}, min {lat[0]:.2f}, max {lat[-1]:.2f} ({len(lat)} site-rounds)")
    if not args.skip_d20:
        print("\nd20-sized synchronisation over the weights data plane (bench/sync.py, data plane only):", flush=True)
        subprocess.run([sys.executable, str(ROOT / "bench" / "sync.py"), "--skip-flower", "--sites", "1"], check=True)


if __name__ == "__main__":
    main()
