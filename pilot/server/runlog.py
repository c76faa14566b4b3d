"""The run's record on disk: what the server did, every site's steps, the energy picture (for `pilot report`).

The ServerApp writes, append-only, one JSON object per line, flushed per line, under RUN_DIR/logs/:

    events.jsonl        every server event (also in Redis, pilot:{run}:server:events), typed:
                          {"kind", "wall_ts", "sim_ts", ...the event's own fields}
    steps.jsonl         every optimizer step of every site: {"site", "round", "step", "loss", "tokens",
                          "seconds", "wall_ts", "sim_ts"}; rank 0 of each site trainer pushes them to the
                          site's Redis stream (pilot:{run}:site:{name}:metrics), the server drains them here
    energy.jsonl        the energy simulation's transitions as the server read them:
                          {"site", "curtailed", "sim_ts", "value"}
    energy_config.json  the simulation's scenario and sites (pilot:{run}:energy:config) plus its "speedup"

A restarted server appends; the drained position of each site's metrics stream is kept in Redis
(pilot:{run}:server:metrics_cursors), so a step is written once (at least once across a crash between the
write and the cursor update: readers key steps by (site, step)). wandb gets the same figures when asked
(`WANDB_MODE` / `WANDB_API_KEY`; offline by default when wandb is installed and the run enables it).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, TextIO

import redis

from pilot import protocol
from pilot.coordination import key
from pilot.server.incarnation import Incarnation

LOG_DIR = "logs"


def metrics_cursors_key(run: str) -> str:
    return key(run, "server", "metrics_cursors")


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write null for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_clean(v) for v in (sorted(value) if isinstance(value, (set, frozenset)) else value)]
    return value


def _number(raw: str) -> float | int:
    value = float(raw)
    return int(value) if value.is_integer() and "." not in raw and "e" not in raw.lower() else value


class SimTimeline:
    """Maps wall-clock moments to simulated time from the energy clock's publications seen so far.

    The clock (pilot/energy/events.py) says where the simulation was at its last step and how fast it goes;
    a moment in the past belongs to the step that was current then, not to the latest one: keep every
    step's (wall, simulated) anchor and advance from the last anchor before the moment, capped at its step.
    """

    def __init__(self) -> None:
        self.anchors: list[tuple[float, float, float, float]] = []   # (wall_ts, sim_ts, speedup, step_s)

    def add(self, wall_ts: float, sim_ts: float, speedup: float, step_s: float) -> None:
        anchor = (wall_ts, sim_ts, speedup, step_s)
        if not self.anchors or wall_ts > self.anchors[-1][0]:
            self.anchors.append(anchor)
        elif wall_ts == self.anchors[-1][0]:
            self.anchors[-1] = anchor

    def at(self, wall_ts: float) -> float | None:
        if not self.anchors:
            return None
        index = bisect.bisect_right(self.anchors, (wall_ts, math.inf)) - 1
        wall0, sim0, speedup, step_s = self.anchors[max(index, 0)]
        if speedup <= 0:
            return sim0
        return sim0 + min(max(0.0, (wall_ts - wall0) * speedup), step_s) if index >= 0 else \
            sim0 + (wall_ts - wall0) * speedup   # before the first anchor seen: extrapolate back


class RunLog:
    """Appends the run's record to RUN_DIR/logs. `sim_time(wall_ts)` maps wall time to simulated time."""

    def __init__(self, run_dir: Path, run_id: str, client: redis.Redis,
                 sim_time: Callable[[float], float | None], wandb_mode: str = ""):
        self.dir = Path(run_dir) / LOG_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id, self.r, self.sim_time = run_id, client, sim_time
        self._files: dict[str, TextIO] = {}
        self._lock = threading.Lock()
        self.has_energy_config = (self.dir / "energy_config.json").exists()
        self.wandb = _start_wandb(wandb_mode, run_id, Path(run_dir))

    def _write(self, name: str, record: dict) -> None:
        with self._lock:  # events also come from the provisioning thread
            self._write_line(name, record)

    def _write_line(self, name: str, record: dict) -> None:
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = open(self.dir / name, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
        f.write(json.dumps(_clean(record), default=str) + "\n")
        f.flush()

    def event(self, kind: str, wall_ts: float, sim_ts: float | None, fields: dict[str, Any]) -> None:
        self._write("events.jsonl", {"kind": kind, "wall_ts": wall_ts, "sim_ts": sim_ts, **fields})
        if self.wandb is not None and kind == "round-end":
            self.wandb.log({k: v for k, v in (("round/val_bpb", fields.get("val_bpb")),
                                               ("round/tokens", fields.get("total_tokens")),
                                               ("round/number", fields.get("round"))) if v is not None})

    def energy(self, site: str, curtailed: bool, sim_ts: float, value: float | None) -> None:
        self._write("energy.jsonl", {"site": site, "curtailed": int(curtailed), "sim_ts": sim_ts, "value": value})

    def energy_config(self, config: dict, speedup: float) -> None:
        """Written once per run directory (the scenario of a run does not change; publisher.py refuses it)."""
        if self.has_energy_config:
            return
        path = self.dir / "energy_config.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**config, "speedup": speedup}, indent=1))
        os.replace(tmp, path)
        self.has_energy_config = True

    def drain_steps(self, sites: Iterable[str]) -> int:
        """Move every site's new step metrics from Redis to steps.jsonl (and wandb). Returns how many."""
        sites = sorted(sites)
        if not sites:
            return 0
        cursors = self.r.hgetall(metrics_cursors_key(self.run_id))
        site_of = {protocol.metrics_key(self.run_id, s): s for s in sites}
        moved = 0
        for stream, entries in self.r.xread({k: cursors.get(s, "0-0") for k, s in site_of.items()}) or []:
            site = site_of[stream]
            for _, fields in entries:
                record = {"site": site, **{k: _number(v) for k, v in fields.items()}}
                record["sim_ts"] = self.sim_time(float(record.get("wall_ts", 0)))
                self._write("steps.jsonl", record)
                if self.wandb is not None:
                    self.wandb.log({f"{site}/loss": record.get("loss"),
                                    f"{site}/tokens_per_s": record["tokens"] / max(record["seconds"], 1e-9)})
                moved += 1
            self.r.hset(metrics_cursors_key(self.run_id), site, entries[-1][0])
        return moved

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _start_wandb(mode: str, run_id: str, run_dir: Path):
    """A wandb run when `mode` is "offline"/"online" (or $WANDB_MODE says so, or WANDB_API_KEY is set)."""
    mode = mode or os.environ.get("WANDB_MODE", "") or ("online" if os.environ.get("WANDB_API_KEY") else "")
    if mode not in ("offline", "online"):
        return None
    try:
        import wandb
    except ImportError:
        return None
    return wandb.init(project="pilot", name=run_id, id=run_id, resume="allow", mode=mode, dir=str(run_dir))


def _stream_value(value: object) -> str:
    """Redis stream fields are strings: lists as "a,b" ("-" when empty), dicts as JSON, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


class ServerEvents:
    """The server's event sink, passed to every part of the round engine: one line on the console, one entry
    in the run's server event stream (pilot:{run}:server:events), one in RUN_DIR/logs/events.jsonl. Every
    event names the incarnation that wrote it ("server"); a superseded incarnation (a later ServerApp claimed the
    run) writes to the console only, never into the run's record."""

    def __init__(self, client: redis.Redis, run_id: str, runlog: RunLog, sim_time_at: Callable[[float], float | None],
                 incarnation: Incarnation):
        self.r, self.run_id, self.runlog, self.sim_time_at = client, run_id, runlog, sim_time_at
        self.incarnation = incarnation
        self._lock = threading.Lock()   # the loop, the after-round worker and provisioning all emit: one order

    def __call__(self, kind: str, **fields: object) -> None:
        with self._lock:
            self._emit(kind, fields)

    def _emit(self, kind: str, fields: dict[str, object]) -> None:
        from flwr.common.logger import log  # Flower's logger: the ServerApp's console

        if not self.incarnation.current():
            log(WARNING, "pilot: superseded by a later server, not recorded: %s %s", kind, fields)
            return
        wall_ts = time.time()
        sim_ts = self.sim_time_at(wall_ts)
        self.runlog.event(kind, wall_ts, sim_ts, {**fields, "server": self.incarnation.id})
        entry = {"kind": kind, "wall_ts": f"{wall_ts:.3f}", "sim_ts": _stream_value(sim_ts),
                 "server": self.incarnation.id, **{k: _stream_value(v) for k, v in fields.items()}}
        try:
            self.r.xadd(protocol.server_events_key(self.run_id), entry)
        except redis.RedisError as error:
            log(WARNING, "pilot: could not log to Redis: %s", error)
        log(INFO, "pilot: %s %s", kind, " ".join(f"{k}={entry[k]}" for k in fields))
