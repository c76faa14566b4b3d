"""Live progress of a run in the terminal, read from the run's Redis: `pilot watch RUN_ID` (the demo shows it too).

    simulated clock, speed-up         regime, round, tokens, last validation bits per byte
    per site: curtailed or not (generation vs load, or MOER), its trainer's state, round, step, loss, tokens/s
    the server's last events

Everything comes from what the components already publish (pilot/energy/events.py, pilot/protocol.py);
watching changes nothing, and any number of watchers may run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pilot import coordination, protocol
from pilot.energy.events import EnergyEvents
from pilot.ops.stop import NoSuchRun, run_client

RECENT_EVENTS = 6
QUIET_KINDS = {"energy", "site-result"}   # frequent, and visible in the site table anyway


@dataclass
class SiteView:
    name: str
    curtailed: bool | None = None
    signal: str = ""
    trainer: str = "-"
    round: str = "-"
    step: str = "-"
    loss: float | None = None
    tokens_per_s: float | None = None


@dataclass
class Snapshot:
    run_id: str
    sim_time: float | None = None
    speedup: float | None = None
    energy_status: str = "-"
    regime: str = "-"
    round: int = 0
    total_tokens: int = 0
    val_bpb: float | None = None
    finished: str = ""
    sites: list[SiteView] = field(default_factory=list)
    recent: list[str] = field(default_factory=list)


def _field(fields: dict, name: str) -> object:
    raw = fields.get(name, "-")
    try:
        return json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        return raw


def snapshot(r: redis.Redis, run_id: str) -> Snapshot:
    """Everything the live view shows, read once from Redis."""
    snap = Snapshot(run_id)
    energy = EnergyEvents(r, run_id, consumer="watch")
    clock = energy.clock()
    if clock is not None:
        snap.sim_time, snap.speedup, snap.energy_status = clock.now(), clock.speedup, clock.status
    states = energy.current_states()
    events = [f for _, f in reversed(r.xrevrange(protocol.server_events_key(run_id), count=300))]
    for e in events:
        kind = e.get("kind")
        if kind == "regime":
            snap.regime = e.get("regime", "-")
        elif kind == "round-start":
            snap.round = int(e.get("round", 0))
        elif kind == "round-end":
            snap.total_tokens = int(e.get("total_tokens", 0))
            bpb = e.get("val_bpb", "-")
            snap.val_bpb = float(bpb) if bpb not in ("-", "") else snap.val_bpb
        elif kind in ("start", "resume"):
            snap.finished = ""
        elif kind == "finished":
            snap.finished = e.get("outcome", "finished")
    connected: set[str] = set()
    for e in events:
        if e.get("kind") == "sites":
            connected = {s for s in e.get("connected", "").split(",") if s and s != "-"}
    names = sorted(set(states) | connected)
    for name in names:
        view = SiteView(name)
        state = states.get(name)
        if state is not None:
            view.curtailed = state.curtailed
            fields = state.fields
            if fields.get("signal") == "moer":
                view.signal = f"MOER {float(fields.get('value', 'nan')):.0f}"
            elif fields.get("generation_w"):
                view.signal = (f"{float(fields['generation_w']) / 1000:.0f} / "
                               f"{float(fields.get('load_w', 'nan')) / 1000:.0f} kW")
        trainer = r.hgetall(protocol.trainer_key(run_id, name))
        if trainer:
            view.trainer, view.round, view.step = trainer.get("status", "-"), trainer.get("round", "-"), \
                trainer.get("step", "-")
        recent = [f for _, f in r.xrevrange(protocol.metrics_key(run_id, name), count=5)]
        if recent:
            view.loss = float(recent[0]["loss"])
            seconds = sum(float(f["seconds"]) for f in recent)
            view.tokens_per_s = sum(int(f["tokens"]) for f in recent) / seconds if seconds > 0 else None
            view.step = recent[0]["step"] if view.trainer == "training" else view.step
        snap.sites.append(view)
    for e in events[::-1]:
        if e.get("kind") in QUIET_KINDS:
            continue
        when = datetime.fromtimestamp(float(e.get("wall_ts", 0)), UTC).strftime("%H:%M:%S")
        detail = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("kind", "wall_ts", "sim_ts", "trainers",
                                                                            "busy", "training_s", "shards", "detail"))
        snap.recent.append(f"{when} {e['kind']} {detail}"[:140])
        if len(snap.recent) >= RECENT_EVENTS:
            break
    snap.recent.reverse()
    return snap


def render(snap: Snapshot, title: str = "") -> Group:
    sim = datetime.fromtimestamp(snap.sim_time, UTC).strftime("%Y-%m-%d %H:%M UTC") if snap.sim_time else "-"
    head = Text.assemble(
        (f"{title or 'Pilot'}  run {snap.run_id}\n", "bold"),
        ("simulated time ", "dim"), (sim, "cyan"),
        (f"  (x{snap.speedup:.0f}, {snap.energy_status})" if snap.speedup is not None else "", "dim"),
        ("\nregime ", "dim"), (snap.regime, {"paused": "yellow", "solo": "green", "federated": "bold green"}
                               .get(snap.regime, "white")),
        ("   round ", "dim"), (str(snap.round), "white"),
        ("   tokens ", "dim"), (f"{snap.total_tokens:,}", "white"),
        ("   val bpb ", "dim"), (f"{snap.val_bpb:.4f}" if snap.val_bpb is not None else "-", "white"),
        (f"   finished: {snap.finished}" if snap.finished else "", "bold magenta"))
    table = Table(expand=False, box=None, pad_edge=False)
    for column in ("site", "window", "generation / load", "trainer", "round", "step", "loss", "tokens/s"):
        table.add_column(column)
    for s in snap.sites:
        window = Text("curtailed", "bold green") if s.curtailed else Text("closed", "dim") if s.curtailed is False \
            else Text("-")
        table.add_row(s.name, window, s.signal or "-", s.trainer, str(s.round), str(s.step),
                      f"{s.loss:.3f}" if s.loss is not None else "-",
                      f"{s.tokens_per_s:,.0f}" if s.tokens_per_s is not None else "-")
    return Group(head, Text(""), table, Text(""), Text("\n".join(snap.recent), "dim"))


def one_line(snap: Snapshot) -> str:
    """The same, as one log line (when the output is not a terminal)."""
    sim = datetime.fromtimestamp(snap.sim_time, UTC).strftime("%m-%d %H:%M") if snap.sim_time else "-"
    sites = " ".join(f"{s.name}:{'ON' if s.curtailed else 'off'}" for s in snap.sites)
    bpb = f"{snap.val_bpb:.4f}" if snap.val_bpb is not None else "-"
    return f"[{sim}] {snap.regime:9s} round {snap.round:3d} tokens {snap.total_tokens:>10,} bpb {bpb} | {sites}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pilot watch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_id", help="the run to watch (its run-id setting)")
    parser.add_argument("--run-dir", default=None, help="its run directory (default: $PILOT_HOME/runs/RUN_ID)")
    parser.add_argument("--redis-url", default=None, help="its Redis (default: $PILOT_REDIS_URL, else the run's "
                                                          "embedded server)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between refreshes")
    args = parser.parse_args(argv)
    if not args.interval > 0:
        parser.error(f"--interval must be a number of seconds > 0, got {args.interval:g}")
    run_dir = Path(args.run_dir) if args.run_dir else coordination.default_run_dir(args.run_id)
    try:   # never starts a Redis: a run that is not running here is an error, not an empty view
        r, _ = run_client(args.run_id, run_dir, args.redis_url or "")
    except NoSuchRun as error:
        print(f"pilot watch: {error}", file=sys.stderr)
        return 2
    try:
        with Live(render(snapshot(r, args.run_id)), refresh_per_second=4) as live:
            while True:
                snap = snapshot(r, args.run_id)
                live.update(render(snap))
                if snap.finished:
                    break
                time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        r.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
