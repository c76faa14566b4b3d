"""Reading a run directory's logs for `pilot report` (the format: the run-log contract, one JSON object a line).

    RUN_DIR/logs/events.jsonl          server events (setup, regime, round-end, site-result, finished, ...)
    RUN_DIR/logs/steps.jsonl           every optimizer step of every site
    RUN_DIR/logs/energy.jsonl          the curtailment transitions the server read
    RUN_DIR/logs/energy_config.json    the energy simulation's config (sites, powers) plus speedup
    RUN_DIR/baseline/metrics.jsonl     optional: the centralized baseline with one site's batch (base_train's
                                       metrics: K times a site's sequential steps in a K-site round)
    RUN_DIR/baseline-sites/metrics.jsonl  optional: the centralized baseline with the sites' batch (the
                                       data-parallel equivalent of the federation)

A line that is not a JSON object, or lacks a field the report needs, is an error naming file:line. One
exception: a last line without its newline is what a writer killed mid-line leaves behind; it is skipped
and listed in `RunLogs.warnings` (file:line), so the report of a killed run still renders.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENTS = Path("logs") / "events.jsonl"
STEPS = Path("logs") / "steps.jsonl"
ENERGY = Path("logs") / "energy.jsonl"
ENERGY_CONFIG = Path("logs") / "energy_config.json"
BASELINE = Path("baseline") / "metrics.jsonl"
BASELINE_SITES = Path("baseline-sites") / "metrics.jsonl"

# fields the report reads, per file (events: per kind; unknown kinds are kept but not checked)
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "regime": ("regime",),
    "round-end": ("round",),
    "site-result": ("round", "site", "tokens", "seconds_training", "sim_start", "sim_end"),
    "finished": ("outcome",),
}
STEP_FIELDS = ("site", "loss", "tokens", "seconds", "wall_ts")
ENERGY_FIELDS = ("site", "curtailed", "sim_ts")
BASELINE_FIELDS = ("step",)


class LogError(ValueError):
    """A log that cannot be read; the message names the file and line."""


@dataclass
class RunLogs:
    run_dir: Path
    events: list[dict[str, Any]] | None = None        # None: the file does not exist
    steps: list[dict[str, Any]] | None = None
    energy: list[dict[str, Any]] | None = None
    energy_config: dict[str, Any] | None = None
    baseline: list[dict[str, Any]] | None = None
    baseline_sites: list[dict[str, Any]] | None = None
    warnings: list[str] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)   # relative path -> records read


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_jsonl(path: Path, required: tuple[str, ...] | dict[str, tuple[str, ...]], warnings: list[str],
               label: str | None = None) -> list[dict[str, Any]]:
    """The records of a JSONL file; `required` is a tuple of keys every record needs, or for events a map
    kind -> keys (every event also needs `kind` and `wall_ts`)."""
    label = label or str(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    cut_short = not text.endswith("\n") and text != ""
    if lines and lines[-1] == "":
        lines.pop()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if cut_short and number == len(lines):
                warnings.append(f"{label}:{number}: last line cut short (writer stopped mid-line), skipped")
                continue
            raise LogError(f"{label}:{number}: not valid JSON ({error.msg} at column {error.colno}): "
                           f"{line[:80]!r}") from error
        if not isinstance(record, dict):
            raise LogError(f"{label}:{number}: expected a JSON object, got {type(record).__name__}")
        if isinstance(required, dict):
            keys = ("kind", "wall_ts", *required.get(str(record.get("kind")), ()))
        else:
            keys = required
        missing = [k for k in keys if k not in record]
        if missing:
            what = f" ({record['kind']} event)" if isinstance(required, dict) and "kind" in record else ""
            raise LogError(f"{label}:{number}: missing field(s) {missing}{what}; the line has {sorted(record)}")
        for key in ("wall_ts", "sim_ts", "sim_start", "sim_end", "seconds", "seconds_training", "tokens"):
            if key in keys and record[key] is not None and not _finite(record[key]):
                raise LogError(f"{label}:{number}: {key} must be a number, got {record[key]!r}")
        record["_line"] = number
        records.append(record)
    return records


def drop_repeated_steps(steps: list[dict[str, Any]], warnings: list[str], label: str) -> list[dict[str, Any]]:
    """A step delivered twice (the server crashed between writing it and moving its cursor) is the same
    record again: same site, step and wall_ts. A step number seen again at another time is work redone
    (a trainer that restarted from a checkpoint) and stays."""
    seen: set[tuple[Any, Any, Any]] = set()
    out, repeated = [], []
    for record in steps:
        key = (record["site"], record.get("step"), record["wall_ts"])
        if key in seen:
            repeated.append(record["_line"])
            continue
        seen.add(key)
        out.append(record)
    if repeated:
        warnings.append(f"{label}: {len(repeated)} repeated step record(s) ignored (lines "
                        f"{', '.join(map(str, repeated[:10]))}{', ...' if len(repeated) > 10 else ''})")
    return out


def read_run(run_dir: str | Path) -> RunLogs:
    """Every log of a run directory that exists; missing optional ones stay None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LogError(f"{run_dir} is not a directory")
    logs = RunLogs(run_dir)
    specs: list[tuple[str, Path, Any]] = [("events", EVENTS, EVENT_FIELDS), ("steps", STEPS, STEP_FIELDS),
                                          ("energy", ENERGY, ENERGY_FIELDS), ("baseline", BASELINE, BASELINE_FIELDS),
                                          ("baseline_sites", BASELINE_SITES, BASELINE_FIELDS)]
    for attr, rel, required in specs:
        path = run_dir / rel
        if path.is_file():
            records = read_jsonl(path, required, logs.warnings, label=str(path))
            setattr(logs, attr, records)
            logs.lines[str(rel)] = len(records)
    config_path = run_dir / ENERGY_CONFIG
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise LogError(f"{config_path}:{error.lineno}: not valid JSON ({error.msg})") from error
        if not isinstance(config, dict):
            raise LogError(f"{config_path}:1: expected a JSON object")
        logs.energy_config = config
    for record in logs.energy or []:
        if record["curtailed"] not in (0, 1) or record["sim_ts"] is None:
            raise LogError(f"{run_dir / ENERGY}:{record['_line']}: expected curtailed 0 or 1 and a sim_ts, got "
                           f"curtailed={record['curtailed']!r}, sim_ts={record['sim_ts']!r}")
    if logs.steps:
        logs.steps = drop_repeated_steps(logs.steps, logs.warnings, str(run_dir / STEPS))
    if logs.events is None and logs.steps is None:
        raise LogError(f"{run_dir} has neither {EVENTS} nor {STEPS}: not a run directory with logs "
                       f"(the federated server writes them)")
    return logs

