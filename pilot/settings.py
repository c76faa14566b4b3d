"""Run settings: one table, the single source of the configuration reference.

Each setting is a key of `[tool.flwr.app.config]` in pyproject.toml (override one with
`flwr run . local-simulation --run-config 'round-duration=60'`). `pilot config` prints this table as
Markdown; the README embeds that output and a test keeps the two, and pyproject.toml, in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("run-id", "default",
            "Name of the run: namespaces its Redis keys and names its directory under runs/. "
            "Starting again with the same run id resumes it."),
    Setting("redis-url", "",
            "Redis of the run (redis://[:PASSWORD@]HOST:PORT/DB, rediss:// for TLS). Empty: $PILOT_REDIS_URL, "
            "else an embedded redis-server on loopback that the processes of the run share."),
    Setting("round-duration", 600,
            "Seconds of simulated time in one federated round while several sites are curtailed."),
    Setting("handshake-timeout", 60,
            "Seconds the ServerApp waits for every SuperNode to say which site it is."),
)

BY_KEY = {s.key: s for s in SETTINGS}


def resolve(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with a run config; an unknown key is an error that names the known ones."""
    unknown = sorted(set(run_config) - set(BY_KEY))
    if unknown:
        raise KeyError(f"unknown run setting(s) {unknown}; known: {sorted(BY_KEY)}")
    values = {s.key: s.default for s in SETTINGS}
    for k, v in run_config.items():
        expected = type(BY_KEY[k].default)
        if expected is int and isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, expected) or (expected is int and isinstance(v, bool)):
            raise TypeError(f"run setting {k!r} must be {expected.__name__}, got {v!r}")
        values[k] = v
    return values


def reference_markdown() -> str:
    """The configuration reference as a Markdown table (what `pilot config` prints)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = f'"{s.default}"' if isinstance(s.default, str) else str(s.default)
        rows.append(f"| `{s.key}` | `{default}` | {s.help} |")
    return "\n".join(rows) + "\n"
