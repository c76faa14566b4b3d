"""The envelope: how the ServerApp, the ClientApps and the site trainers talk (Flower message keys, site
naming, Redis keys, the round request and result).

    pilot:{run}:train_config            string, JSON: the training settings every site uses (server writes it)
    pilot:{run}:site:{name}:inbox       Stream: work for the site trainer, written by the ClientApp
                                          {"kind": "train", "round": n, "request": JSON(RoundRequest),
                                           "signature": the server's Ed25519 signature of it (pilot/signing.py)}
                                          {"kind": "shutdown"}
    pilot:{run}:site:{name}:outbox      Stream: the trainer's results {"round": n, "result": JSON(RoundResult)}
    pilot:{run}:site:{name}:trainer     hash: pid, host, status (starting|idle|training|stopped), round, step
    pilot:{run}:site:{name}:alive       string with a TTL the trainer keeps refreshing: gone = trainer dead
    pilot:{run}:site:{name}:launch      string with a TTL: a ClientApp is starting the trainer (one launch at a time)
    pilot:{run}:site:{name}:spare       list: shards reserved for the site to lease mid-round (server writes, site pops)
    pilot:{run}:site:{name}:metrics     Stream: one entry per optimizer step (rank 0): round, step, loss, tokens,
                                          seconds, wall_ts; the server drains it into RUN_DIR/logs/steps.jsonl
    pilot:{run}:round:{n}:stop          string: why round n must stop now (set by the server; sites poll it)
    pilot:{run}:server:current          string: id of the ServerApp incarnation that runs the federation now;
                                          a site working for another one stops (that server is gone)
    pilot:{run}:server:alive            string with a TTL the server keeps refreshing; a site trainer whose
                                          server has been gone for ORPHAN_TIMEOUT_S exits
    pilot:{run}:server:events           Stream: what the server did (regime, round start/end, checkpoints)
    pilot:{run}:server:stop             string: the operator asked the run to stop (`pilot stop`, Ctrl-C on `pilot run`)

Streams, not pub/sub: a message written while its reader is busy or restarting is still there to read.
Only small JSON travels here; weights travel as blobs (pilot/dataplane/), named by digest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pilot.coordination import key

# ------------------------------------------------------------------ Flower messages
# Which Flower node is which site: node ids are random and change when a SuperNode restarts; a site's name does
# not. A SuperNode names its site with `--node-config 'name="client_0" partition-id=0'`; in Flower's simulation
# engine, where nodes only get a partition id, partition N is site `client_N`.
IDENTIFY = "pilot.identify"  # the QUERY message's config key that asks a node for its site name


def site_name(node_config: Mapping[str, Any]) -> str:
    """The site a node serves, from its node config."""
    name = node_config.get("name")
    if isinstance(name, str) and name:
        return name
    if "partition-id" in node_config:
        return f"client_{int(node_config['partition-id'])}"
    raise ValueError(
        f"node config {dict(node_config)} names no site: start the SuperNode with "
        "--node-config 'name=\"client_0\" partition-id=0'")

ROUND_KEY = "pilot.round"    # the TRAIN message's config record: the run's site record + the RoundRequest JSON
RESULT_KEY = "pilot.result"  # the reply's config record: the RoundResult JSON


# ------------------------------------------------------------------ Redis
ALIVE_TTL_S = 10          # a trainer (or server) that has not refreshed its alive key for this long is dead
HEARTBEAT_S = 2.0
ORPHAN_TIMEOUT_ENV = "PILOT_ORPHAN_TIMEOUT_S"
ORPHAN_TIMEOUT_S = 900.0  # a site trainer with no live server for this long exits (a restarted server within
                          # that time finds it alive, with its optimizer state)
ROUND_ORPHAN_S = 60.0     # a round whose server has been silent this long ends (at most ORPHAN_TIMEOUT_S): its
                          # result goes to the outbox, where that server, back from a pause, still finds it;
                          # a dead server's round costs at most this much of a window


def train_config_key(run: str) -> str:
    return key(run, "train_config")


def inbox_key(run: str, site: str) -> str:
    return key(run, "site", site, "inbox")


def outbox_key(run: str, site: str) -> str:
    return key(run, "site", site, "outbox")


def trainer_key(run: str, site: str) -> str:
    return key(run, "site", site, "trainer")


def alive_key(run: str, site: str) -> str:
    return key(run, "site", site, "alive")


def launch_key(run: str, site: str) -> str:
    return key(run, "site", site, "launch")


def spare_key(run: str, site: str) -> str:
    return key(run, "site", site, "spare")


def metrics_key(run: str, site: str) -> str:
    return key(run, "site", site, "metrics")


METRICS_MAXLEN = 100_000  # steps kept in Redis per site (approximate trim); the run directory keeps them all


def stop_key(run: str, round_number: int) -> str:
    return key(run, "round", round_number, "stop")


def server_current_key(run: str) -> str:
    return key(run, "server", "current")


def server_alive_key(run: str) -> str:
    return key(run, "server", "alive")


def server_stop_key(run: str) -> str:
    return key(run, "server", "stop")


def server_events_key(run: str) -> str:
    return key(run, "server", "events")


def _known_fields(cls: type, data: dict) -> dict:
    """The fields this version knows: a site trainer that outlived its server may meet a newer one."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class RoundRequest:
    """What a site trains in one round (from the ServerApp, through Flower, to the site trainer)."""

    round: int
    server_id: str                 # the ServerApp incarnation asking (a restarted server has a new one)
    weights_digest: str            # SHA-256 of the global weights blob to start from
    blob_url: str                  # where to fetch it and upload the result
    blob_token: str
    shards: list[str]              # this site's data, in order (files in the run's data dir)
    cursors: list[dict] | None     # per rank, where to start in shards[0]; None = at its beginning
    schedule_step: int             # the global schedule position (optimizer steps of the whole run so far)
    max_steps: int                 # steps left before the run's horizon
    update_payload: str = "weights-fp32"   # how to hand the update in (pilot/dataplane/payload.py): weights-fp32 | delta-bf16
    blob_ca: str = ""              # PEM of the CA the weights server's TLS certificate chains to ("" = plain HTTP)
    round_mode: str = "sync"       # "overlap": hand the update in and train on while it travels (pilot/site/trainer.py)
    site: str = ""                 # the site it is for ("" = not said): a signed request cannot serve another site
    round_steps: int = 0           # hand in after this many steps (round-steps; 0: when the round is stopped)
    sites: int = 1                 # sites in this round: the global schedule moves ~ sites x steps a round
    delta_digest: str = ""         # the bf16 delta to the global weights from the last ones (payload.GLOBAL_DELTA)
    delta_base: str = ""           # digest of the global weights it applies to: a site holding them fetches the delta

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> RoundRequest:
        return cls(**_known_fields(cls, json.loads(raw)))


@dataclass
class RoundResult:
    """What a site hands in at the end of a round."""

    round: int
    site: str
    status: str                    # "ok" | "error"
    server_id: str = ""            # the incarnation whose request this answers
    reason: str = ""               # why it stopped (stop signal, window closed, data exhausted, horizon, error)
    weights_digest: str = ""       # the site's weights at the end, uploaded as a blob
    tokens: int = 0                # tokens trained in this round (all ranks)
    steps: int = 0                 # optimizer steps in this round
    loss: float = float("nan")     # mean training loss over the round's steps
    cursors: list[dict] | None = None
    world_size: int = 1
    exhausted: bool = False        # the site's shards ran out
    trainer_pid: int = 0
    trainer_step: int = 0          # the trainer's own optimizer step counter (continues across rounds)
    seconds_training: float = 0.0  # wall seconds inside optimizer steps
    seconds_total: float = 0.0     # wall seconds from request to result
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> RoundResult:
        return cls(**_known_fields(cls, json.loads(raw)))
