"""Share of curtailed GPU time turned into optimizer steps, at d20 size over an emulated WAN (issue 14).

A real deployment on this machine for every measurement: flower-superlink --insecure, one flower-supernode per
site (so its ClientApps and its persistent site trainer run where it runs), the ServerApp submitted with
`flwr run`, the weights data plane, an embedded Redis. The weights are d20-sized (depth 20, vocab 65,536:
560,988,160 parameters, fp32 masters) and every optimizer step is an EMULATED GPU STEP (run setting
emulate-step-s, default 0.48 s: d20 on 8xH100 at ~48% MFU): a fixed-duration stand-in that reads its batch and
changes every weight (nanochat/trainer.py), so that every update is a real payload; the synchronisation path
(Flower control, data plane, server work) is entirely real. Every site trains all the time
(curtailment="always").

Links: loopback, or an emulated WAN (bench/wan.py): each site's SuperNode (hence its ClientApps and its site
trainer) lives in its own network namespace behind a veth pair with `tc tbf` at the link's rate in both
directions, and reaches the SuperLink's Fleet API, Redis and the weights server only through a delaying TCP
proxy that adds RTT/2 per direction (netem is absent from these kernels).

For each case it runs round-mode "sync" (and "overlap" once the code reads that setting; --modes forces it),
then one site alone (the solo baseline) for as many solo intervals of the same length, and prints side by
side: the share of the phase each site spends in optimizer steps, per-round seconds of every phase the run's
logs let us measure, and peak RSS per process.

    sudo .venv/bin/python bench/utilisation.py --quick        # 60 s rounds, 1 Gbit/s / 100 ms: ~15 min
    sudo .venv/bin/python bench/utilisation.py                # the three cases of issue 14: about an hour
    .venv/bin/python bench/utilisation.py --quick --depth 8 --links loopback   # no root needed

Evaluation is off (eval-tokens=0): evaluating d20 on this CPU would take minutes per round and measure the CPU,
not the system; the server's evaluation cost is therefore NOT in these figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.wan import Wan, wan_available  # noqa: E402
from pilot import coordination  # noqa: E402
from pilot.coordination import free_port  # noqa: E402
from pilot.site.process import kill_tree  # noqa: E402

BIN = Path(sys.executable).parent
D20_VOCAB = 65_536
GiB = 1 << 30


@dataclass(frozen=True)
class Case:
    name: str
    round_s: int
    rate_mbit: float | None      # None: loopback, no namespaces
    rtt_s: float
    rounds: int

    @property
    def link(self) -> str:
        if self.rate_mbit is None:
            return "loopback"
        rate = f"{self.rate_mbit / 1000:g} Gbit/s" if self.rate_mbit >= 1000 else f"{self.rate_mbit:g} Mbit/s"
        return f"{rate} / {self.rtt_s * 1000:.0f} ms RTT"


def cases(args) -> list[Case]:
    wan = [Case("60 s rounds", 60, 1000, 0.1, args.rounds or 4),
           Case("300 s rounds", 300, 1000, 0.1, args.rounds or 3),
           Case("300 s rounds", 300, 200, 0.2, args.rounds or 3)]
    if args.round_s:   # development: shorter rounds
        wan = [Case(f"{args.round_s} s rounds", args.round_s, c.rate_mbit, c.rtt_s, c.rounds) for c in wan]
    if args.quick:
        wan = wan[:1]
    elif args.cases:
        wan = [wan[int(i) - 1] for i in args.cases.split(",")]
    if args.links == "wan":
        return wan
    loop = [Case(c.name, c.round_s, None, 0.0, c.rounds) for c in wan[:1]]
    return loop if args.links == "loopback" else loop + wan


def overlap_built() -> bool:
    """Whether any part of the round engine reads the round-mode setting (pilot/settings.py accepts "overlap"
    before the code behind it exists): a module of pilot/ other than settings.py that names round_mode."""
    for path in (ROOT / "pilot").rglob("*.py"):
        if path.name != "settings.py" and "round_mode" in path.read_text(encoding="utf-8"):
            return True
    return False


# ------------------------------------------------------------------ data and tokenizer (d20's vocab)
def prepare_data(work: Path, vocab: int) -> tuple[Path, Path]:
    """The offline corpus as shards and a BPE tokenizer of exactly `vocab` tokens.

    The packaged prose supports ~53k merges only; generated filler words (seeded) are added to the tokenizer's
    training text (never to the training shards) so that BPE reaches d20's 65,536 tokens: the bench measures
    the system around the model, the model's vocabulary only needs its size."""
    import pyarrow.parquet as pq

    from nanochat.tokenizer import train_tokenizer

    data, tok_dir = work / "data", work / f"tokenizer-{vocab}"
    if not data.exists():
        subprocess.run([sys.executable, "-m", "nanochat.offline_corpus", "--out", str(data), "--num-shards", "8"],
                       check=True, capture_output=True, cwd=ROOT)
    if not tok_dir.exists():
        files = sorted(data.glob("shard_*.parquet"))[:-1]
        texts = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
        rng = random.Random(0)
        syllables = [c + v + e for c in "bcdfghjklmnprstvwz" for v in "aeiou" for e in ("", "n", "r", "s")]
        texts += [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(2000))
                  for _ in range(600)]
        tok = train_tokenizer(texts, vocab, tok_dir)
        if tok.get_vocab_size() != vocab:
            raise RuntimeError(f"tokenizer reached {tok.get_vocab_size()} tokens, not {vocab}")
    return data, tok_dir


# ------------------------------------------------------------------ peak memory of every process of a run
class RssSampler:
    """Samples, every `every_s`, the RSS of the run's processes by role; keeps each role's peak and the total's."""

    def __init__(self, roots: dict[str, int], run_dir: Path, every_s: float = 0.5):
        self.roots, self.run_dir, self.every = roots, str(run_dir), every_s
        self.peak: dict[str, float] = {}
        self.peak_total = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def role(self, proc: psutil.Process, root_role: str) -> str:
        argv = proc.cmdline()
        cmd = " ".join(argv)
        site = root_role.split(":", 1)[1] if ":" in root_role else ""
        if len(argv) > 1 and argv[1] == "-c":   # the trainer's launcher (pilot/site/process.py): gone at once
            return "other (launcher)"
        if "pilot.site.trainer" in cmd:
            name = cmd.split("--site", 1)[1].split()[0] if "--site" in cmd else "?"
            return f"site trainer {name}"
        if "flwr-serverapp" in cmd:
            return "ServerApp"
        if "flwr-clientapp" in cmd:
            return f"ClientApp {site}"
        if "flower-supernode" in cmd:
            return f"SuperNode {site}"
        if "flower-superlink" in cmd:
            return "SuperLink"
        if "redis-server" in cmd:
            return "redis-server"
        return f"other ({proc.name()})"

    def sample(self) -> None:
        seen: dict[int, str] = {}
        for root_role, pid in self.roots.items():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    seen[proc.pid] = root_role
        for proc in psutil.process_iter(["cmdline"]):   # detached site trainers: by their --run-dir
            with contextlib.suppress(psutil.Error):
                if self.run_dir in " ".join(proc.info["cmdline"] or []):
                    seen.setdefault(proc.pid, "")
        total = 0.0
        for pid, root_role in seen.items():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                rss = proc.memory_info().rss
                role = self.role(proc, root_role)
                if role.startswith("other"):
                    continue
                total += rss
                self.peak[role] = max(self.peak.get(role, 0.0), rss)
        self.peak_total = max(self.peak_total, total)
        self.last_total = total

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(Exception):
                self.sample()

    def __enter__(self) -> RssSampler:
        self.last_total = 0.0
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ------------------------------------------------------------------ one deployment
@dataclass
class Outcome:
    label: str
    sites: int
    events: list[dict]
    steps: list[dict]
    peak_rss: dict[str, float]
    peak_total: float
    wall_s: float
    error: str = ""
    notes: list[str] = field(default_factory=list)


def deployment(work: Path, case: Case, mode: str, sites: int, args, data: Path, tok_dir: Path) -> Outcome:
    label = f"{mode}" if sites > 1 else "solo"
    run_id = f"utl{os.getpid()}-{case.round_s}-{int(case.rate_mbit or 0)}-{label}"
    run_dir = work / run_id
    home = work / f"flwr-{run_id}"
    home.mkdir(parents=True)
    link_port, blob_port = free_port(), free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "d"\n[superlink.d]\naddress = "127.0.0.1:{link_port}"\n'
                                      "insecure = true\n")
    env = {**os.environ, "FLWR_HOME": str(home), "PILOT_SITE_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    holder = coordination.connect(run_dir=run_dir)   # the run's embedded Redis, on 127.0.0.1 (the server's side)
    state = coordination.EmbeddedRedis(run_dir).read_state()
    wan = Wan(sites, case.rate_mbit) if case.rate_mbit is not None else None
    procs: dict[str, subprocess.Popen] = {}
    started = time.monotonic()
    error = ""
    sampler = None
    try:
        if wan is not None:
            wan.up()
            for port in (link_port, state.port, blob_port):   # Fleet API, Redis, weights server
                wan.proxy(port, case.rtt_s / 2)
            server_host = wan.bridge_ip
        else:
            server_host = "127.0.0.1"
        site_redis = f"redis://:{state.password}@{server_host}:{state.port}/0"
        procs["SuperLink"] = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(2)
        for i in range(sites):
            site = f"client_{i}"
            prefix = wan.exec_prefix(i) if wan is not None else []
            procs[f"site:{site}"] = subprocess.Popen(
                [*prefix, str(BIN / "flower-supernode"), "--insecure", "--superlink", f"{server_host}:{link_port}",
                 "--port", str(free_port()), "--node-config",
                 f'name="{site}" partition-id={i} redis-url="{site_redis}"'],
                stdout=subprocess.DEVNULL, stderr=open(work / f"{run_id}-{site}.log", "w"), env=env)  # noqa: SIM115
        config = [f'run-id="{run_id}"', f'run-dir="{run_dir}"', f'data-dir="{data}"', f'tokenizer-dir="{tok_dir}"',
                  'curtailment="always"', f"depth={args.depth}", "max-seq-len=128", "device-batch-size=2",
                  "total-batch-size=256", "eval-tokens=0", "token-budget=1000000000",
                  f"emulate-step-s={args.step_s}", f'round-mode="{mode}"', f"max-rounds={case.rounds}",
                  f"round-duration={case.round_s}", f"solo-checkpoint-interval={case.round_s}",
                  "stop-grace=300", "handshake-timeout=180", 'blob-host="127.0.0.1"', f"blob-port={blob_port}",
                  f'blob-url="http://{server_host}:{blob_port}"']
        time.sleep(3)
        roots = {role: p.pid for role, p in procs.items()}
        with RssSampler(roots, run_dir) as sampler:
            run = subprocess.Popen([str(BIN / "flwr"), "run", ".", "d", "--stream", "--run-config", " ".join(config)],
                                   stdout=open(work / f"{run_id}-server.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                   env=env, cwd=ROOT)
            timeout = case.rounds * case.round_s * 3 + 900
            while run.poll() is None:
                if time.monotonic() - started > timeout:
                    error = f"no end after {timeout} s"
                    break
                if sampler.last_total > args.max_rss_gb * GiB:
                    error = f"stopped: the run's processes held {sampler.last_total / GiB:.1f} GB > --max-rss-gb"
                    break
                if finished(run_dir):
                    time.sleep(5)   # the ServerApp closes (asks the trainers to exit)
                    break
                time.sleep(1)
            if run.poll() is None:
                kill_tree(psutil.Process(run.pid))
            elif run.returncode and not error:
                error = f"flwr run exited {run.returncode}: see {work / (run_id + '-server.log')}"
            if not error and not finished(run_dir):
                error = (f"flwr run ended (exit {run.returncode}) before the run finished (no 'finished' event): "
                         f"what was logged is shown; see {work / (run_id + '-server.log')}")
    except Exception as e:  # noqa: BLE001 - reported with the case, the next case still runs
        error = f"{type(e).__name__}: {e}"
    finally:
        for proc in procs.values():
            with contextlib.suppress(psutil.Error):
                kill_tree(psutil.Process(proc.pid))
        for proc in psutil.process_iter(["cmdline"]):   # detached site trainers of this run (we started them)
            with contextlib.suppress(psutil.Error):
                if str(run_dir) in " ".join(proc.info["cmdline"] or []):
                    kill_tree(proc)
        if wan is not None:
            wan.down()
        with contextlib.suppress(Exception):
            holder.close()
            coordination.EmbeddedRedis(run_dir).stop()
    logs = run_dir / "logs"
    events = read_jsonl(logs / "events.jsonl")
    steps = read_jsonl(logs / "steps.jsonl")
    if not error and not any(e["kind"] == "round-end" for e in events):
        error = f"no round ended: see {work / (run_id + '-server.log')}"
    return Outcome(label, sites, events, steps, dict(sampler.peak) if sampler else {},
                   sampler.peak_total if sampler else 0.0, time.monotonic() - started, error)


def finished(run_dir: Path) -> bool:
    path = run_dir / "logs" / "events.jsonl"
    return path.exists() and '"kind": "finished"' in path.read_text(encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------ what the logs say
PHASES = [  # (name, how it is measured); per site and round n
    ("dispatch", "round-start(n) -> the site trainer starts round n (Flower message, SuperNode poll, ClientApp "
                 "process, Redis inbox)"),
    ("fetch", "trainer starts round n -> its first step starts (weights fetch + check + data set-up: one span)"),
    ("train", "seconds inside optimizer steps of round n (steps.jsonl)"),
    ("upload", "its last step of round n ends -> its result is handed in (encode + upload + cursors: one span)"),
    ("wait", "its result handed in -> the last site's result handed in (the slowest site)"),
    ("collect", "the last result handed in -> the server has every result (ClientApp relay, server poll)"),
    ("server", "the server has every result -> round-start(n+1): aggregate + publish (+ evaluate/checkpoint "
               "where they are still on the path)"),
    ("ckpt-end", "the server has every result -> round-end(n) (the checkpoint written; off the path when it "
                 "comes after round-start(n+1))"),
]


def busy_seconds(steps: list[dict], lo: float, hi: float) -> float:
    """Seconds inside optimizer steps within [lo, hi] (a step is [wall_ts - seconds, wall_ts], clipped)."""
    return sum(max(0.0, min(hi, s["wall_ts"]) - max(lo, s["wall_ts"] - s["seconds"])) for s in steps)


def analyse(out: Outcome) -> dict:
    """Busy shares and per-round phase seconds per site from RUN_DIR/logs (events.jsonl, steps.jsonl).

    share:        step seconds inside [round-start(1), every result of the last round in] / that span
    steady share: the same over whole periods, [round-start(2), round-start(N)] (N >= 3; with 2 rounds,
                  [round-start(2), every result of round 2 in]): start-up and the last round's tail left out.
    Both are mode-agnostic: a site that trains across a round boundary counts wherever its steps fall."""
    ev = out.events
    starts = {e["round"]: e["wall_ts"] for e in ev if e["kind"] == "round-start"}
    ends = {e["round"]: e["wall_ts"] for e in ev if e["kind"] == "round-end"}
    results: dict[tuple[int, str], dict] = {(e["round"], e["site"]): e for e in ev if e["kind"] == "site-result"}
    results_in: dict[int, float] = {}
    for e in ev:
        if e["kind"] == "site-result":
            results_in.setdefault(e["round"], e["wall_ts"])
    rounds = sorted(n for n in starts if n in results_in)
    sites = sorted({s for (_, s) in results})
    steps_of: dict[str, list[dict]] = {}
    by_round: dict[tuple[int, str], list[dict]] = {}
    for s in out.steps:
        steps_of.setdefault(s["site"], []).append(s)
        by_round.setdefault((s["round"], s["site"]), []).append(s)
    shares, steady, window = {}, {}, None
    if rounds:
        lo, hi = starts[rounds[0]], results_in[rounds[-1]]
        if len(rounds) >= 3:
            window = (starts[rounds[1]], starts[rounds[-1]])
        elif len(rounds) == 2:
            window = (starts[rounds[1]], results_in[rounds[1]])
        for site in sites:
            shares[site] = busy_seconds(steps_of.get(site, []), lo, hi) / (hi - lo)
            if window:
                steady[site] = busy_seconds(steps_of.get(site, []), *window) / (window[1] - window[0])
    phases: dict[str, dict[str, list[float]]] = {site: {p: [] for p, _ in PHASES} for site in sites}
    first: dict[str, dict[str, float]] = {site: {} for site in sites}
    for n in rounds:
        handed = [results[(n, s)].get("wall_end") for s in sites if (n, s) in results]
        last_in = max((h for h in handed if h), default=None)
        for site in sites:
            res, steps = results.get((n, site)), sorted(by_round.get((n, site), []), key=lambda x: x["step"])
            if res is None or res.get("status") != "ok" or not steps or not res.get("wall_start"):
                continue
            values = {
                "dispatch": res["wall_start"] - starts[n],
                "fetch": steps[0]["wall_ts"] - steps[0]["seconds"] - res["wall_start"],
                "train": sum(x["seconds"] for x in steps),
                "upload": res["wall_end"] - steps[-1]["wall_ts"],
                "wait": last_in - res["wall_end"] if last_in else None,
                "collect": results_in[n] - last_in if last_in else None,
                "server": starts[n + 1] - results_in[n] if n + 1 in starts else None,
                "ckpt-end": ends[n] - results_in[n] if n in ends else None,
            }
            for phase, value in values.items():
                if value is not None:
                    (first[site].__setitem__(phase, value) if n == rounds[0] else phases[site][phase].append(value))
    period = [starts[n + 1] - starts[n] for n in rounds if n + 1 in starts]
    return {"shares": shares, "steady": steady, "phases": phases, "first": first, "sites": sites,
            "rounds": len(rounds), "period": statistics.mean(period) if period else None,
            "steps": {site: len(steps_of.get(site, [])) for site in sites}}


SPANS = {"set_up": "site-result", "upload": "site-result", "aggregate": "round-end", "evaluate": "round-end",
         "checkpoint": "round-end"}   # span -> the event whose `{span}_s` field holds it


def span_means(events: list[dict]) -> dict[str, float | None]:
    """Mean seconds of each measured span over rounds 2..N (round 1 holds the start-up)."""
    out = {}
    for span, kind in SPANS.items():
        vals = [float(e[f"{span}_s"]) for e in events
                if e["kind"] == kind and e.get(f"{span}_s") is not None and int(e.get("round", 0)) > 1]
        out[span] = statistics.mean(vals) if vals else None
    return out


def fmt(x: float | None, width: int = 8, digits: int = 1) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


# the RSS of a process that has only imported what the role imports (Python, torch, Flower, Pilot): what a
# process holds before any model; "above its imports" counts model copies from there
IMPORT_FLOOR_OF = {"ServerApp": "pilot.server_app", "site trainer": "pilot.site.trainer"}


def import_floors() -> dict[str, int]:
    code = ("import importlib, sys, psutil; importlib.import_module(sys.argv[1]); "
            "print(psutil.Process().memory_info().rss)")
    floors = {}
    for role, module in IMPORT_FLOOR_OF.items():
        with contextlib.suppress(subprocess.SubprocessError, ValueError):
            out = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, timeout=120,
                                 cwd=ROOT, check=True)
            floors[role] = int(out.stdout.strip())
    return floors


def report(case: Case, outcomes: list[Outcome], model_bytes: int, args, floors: dict[str, int] | None = None) -> None:
    print(f"\n=== {case.name} over {case.link}: {case.rounds} rounds of {case.round_s} s, "
          f"{args.sites} sites; EMULATED GPU STEP "
          f"{args.step_s} s ===", flush=True)
    analyses = {o.label: (analyse(o) if not o.error or o.events else None) for o in outcomes}
    for o in outcomes:
        if o.error:
            print(f"  {o.label}: FAILED: {o.error}")
    print(f"\n  {'':<10}{'site':<10}{'busy share':>11}{'steady':>12}{'vs solo':>8}{'steps':>7}{'rounds':>7}"
          f"{'period s':>9}")
    solo = analyses.get("solo")
    solo_share = next(iter(solo["steady"].values()), None) if solo and solo["steady"] else None
    for o in outcomes:
        a = analyses[o.label]
        if not a:
            continue
        for site in a["sites"]:
            share, st = a["shares"].get(site), a["steady"].get(site)
            vs = st / solo_share if (st is not None and solo_share) else None
            print(f"  {o.label:<10}{site:<10}{fmt(share, 11, 3)}{fmt(st, 12, 3)}{fmt(vs, 8, 3)}"
                  f"{a['steps'][site]:>7}{a['rounds']:>7}{fmt(a['period'], 9)}")
    goal = 0.95 if case.round_s <= 60 else 0.98
    print("  share: step seconds / [round-start 1, last round's results in]; steady: over whole periods "
          "[round-start 2, round-start N]")
    print(f"  goals (issue 14): overlap >= {goal} (steady), solo >= 0.995")
    print("\n  seconds per round, mean over rounds 2..N (round 1 in brackets), first site of each run:")
    header = "".join(f"{p:>16}" for p, _ in PHASES)
    print(f"  {'':<10}{header}")
    for o in outcomes:
        a = analyses[o.label]
        if not a or not a["sites"]:
            continue
        site = a["sites"][0]
        cells = []
        for p, _ in PHASES:
            vals = a["phases"][site][p]
            mean = statistics.mean(vals) if vals else None
            r1 = a["first"][site].get(p)
            cells.append(f"{fmt(mean, 7)} ({fmt(r1, 0) if r1 is not None else '-'})".rjust(16))
        print(f"  {o.label:<10}{''.join(cells)}")
        for other in a["sites"][1:]:
            cells = []
            for p, _ in PHASES:
                vals = a["phases"][other][p]
                cells.append(f"{fmt(statistics.mean(vals) if vals else None, 7)}".rjust(16) + "")
            print(f"  {'  ' + other:<10}{''.join(cells)}")
    print("\n  measured spans, mean over rounds 2..N (the run's own timers: site-result set_up_s / upload_s of "
          "every site, round-end aggregate_s / evaluate_s / checkpoint_s of the server):")
    print(f"  {'':<10}" + "".join(f"{name:>14}" for name in SPANS))
    for o in outcomes:
        if o.events:
            cells = [fmt(v, 14, 2) for v in span_means(o.events).values()]
            print(f"  {o.label:<10}{''.join(cells)}")
    print("  set_up: weights fetch + data set-up before the first step (on the path in sync mode, in the background "
          "in overlap); upload: encode + upload (sync); evaluate and checkpoint run off the path (after-round worker)")
    floors = floors or {}
    print(f"\n  peak RSS per process (GB; one fp32 model = {model_bytes / GiB:.2f} GB; a process that has only "
          f"imported its modules: " + ", ".join(f"{r} {v / GiB:.2f} GB" for r, v in floors.items()) + ")")
    roles = sorted({r for o in outcomes for r in o.peak_rss})
    print(f"  {'':<24}" + "".join(f"{o.label:>10}" for o in outcomes))
    for role in roles:
        vals = [o.peak_rss.get(role) for o in outcomes]
        peak = max((v or 0) for v in vals)
        floor = next((v for r, v in floors.items() if role.startswith(r)), None)
        above = f", {(peak - floor) / model_bytes:.1f} above its imports" if floor is not None else ""
        print(f"  {role:<24}" + "".join(fmt(v / GiB if v else None, 10, 2) for v in vals) +
              f"   ({peak / model_bytes:.1f} models at most{above})")
    print(f"  {'all sampled together':<24}" + "".join(fmt(o.peak_total / GiB, 10, 2) for o in outcomes))
    print(f"  {'wall s of the run':<24}" + "".join(fmt(o.wall_s, 10, 0) for o in outcomes), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only 60 s rounds over 1 Gbit/s / 100 ms (4 rounds)")
    parser.add_argument("--links", choices=["wan", "loopback", "both"], default="wan")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--depth", type=int, default=20, help="model depth (20: d20-sized weights)")
    parser.add_argument("--step-s", type=float, default=0.48, help="seconds of one EMULATED GPU step")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per run (default: 3 quick, 4 / 2 full)")
    parser.add_argument("--cases", default="", help="which of the three cases, e.g. 2,3 (default: all)")
    parser.add_argument("--round-s", type=int, default=0, help="override every case's round seconds (development)")
    parser.add_argument("--modes", default="", help="round modes, e.g. sync,overlap (default: overlap when built)")
    parser.add_argument("--no-solo", action="store_true")
    parser.add_argument("--max-rss-gb", type=float, default=16.0, help="stop a run whose processes hold more")
    parser.add_argument("--work", type=Path, default=None, help="keep data, logs and runs here (default: temporary)")
    args = parser.parse_args()
    if args.links != "loopback" and (why := wan_available()):
        sys.exit(f"the emulated WAN needs network namespaces: {why} (or use --links loopback)")
    built = overlap_built()
    modes = [m for m in (args.modes.split(",") if args.modes else ["sync", "overlap"] if built else ["sync"]) if m]
    from nanochat.gpt import GPTConfig, config_from_depth, count_params

    work_ctx = contextlib.nullcontext(args.work) if args.work else tempfile.TemporaryDirectory(prefix="utilisation-")
    with work_ctx as work_name:
        work = Path(work_name)
        work.mkdir(parents=True, exist_ok=True)
        data, tok_dir = prepare_data(work, D20_VOCAB)
        cfg = config_from_depth(args.depth, sequence_len=128)
        cfg = GPTConfig(**{**cfg.to_dict(), "vocab_size": D20_VOCAB})
        params = count_params(cfg)
        floors = import_floors()
        print(f"EMULATED GPU STEP: every optimizer step is a {args.step_s} s stand-in (no forward/backward; the "
              f"weights change, the data advances); the synchronisation path is real")
        print(f"model: depth {args.depth}, vocab {D20_VOCAB:,}: {params:,} parameters, fp32 masters "
              f"({params * 4 / GiB:.2f} GB); {args.sites} sites + a solo baseline; curtailment=always; eval-tokens=0 "
              f"(evaluating d20 on this CPU would dominate: the server's evaluation is not measured)")
        print(f"round modes: {', '.join(modes)}; solo baseline: {'overlap' if 'overlap' in modes else 'sync'}" + ("" if built or args.modes else
              "  (overlap: not built yet: no module of pilot/ reads round-mode; --modes sync,overlap runs it anyway, "
              "labelled)"), flush=True)
        for case in cases(args):
            outcomes = [deployment(work, case, mode, args.sites, args, data, tok_dir) for mode in modes]
            if not args.no_solo:   # the solo baseline in the round mode a federated run would use with it: a
                # lone site under "overlap" hands its weights in on a thread and trains on (under "sync" it waits)
                solo_mode = "overlap" if "overlap" in modes else "sync"
                outcomes.append(deployment(work, case, solo_mode, 1, args, data, tok_dir))
            report(case, outcomes, params * 4, args, floors)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
