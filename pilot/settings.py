"""Run settings: one table, the single source of the configuration reference.

Each setting is a key of `[tool.flwr.app.config]` in pyproject.toml (override one with
`flwr run . local-simulation --run-config 'round-duration=60'`). `pilot config` prints this table as
Markdown; the README embeds that output and a test keeps the two, and pyproject.toml, in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    help: str


SETTINGS: tuple[Setting, ...] = (
    # the run
    Setting("run-id", "default",
            "Name of the run: namespaces its Redis keys and names its directory under runs/. "
            "Starting again with the same run id resumes it."),
    Setting("run-dir", "",
            "Directory of the run (global checkpoints, site logs, embedded Redis). Empty: runs/RUN-ID."),
    Setting("redis-url", "",
            "Redis of the run (redis://[:PASSWORD@]HOST:PORT/DB, rediss:// for TLS). Empty: $PILOT_REDIS_URL, "
            "else an embedded redis-server on loopback that the processes of the run share."),
    # rounds and regimes
    Setting("curtailment", "energy",
            'Which sites may train: "energy" (curtailed ones, as energy_simulation.py publishes to Redis) or '
            '"always" (every connected site, clocked by the wall: plain federated training).'),
    Setting("round-duration", 600,
            "Seconds of simulated time in one federated round while several sites are curtailed."),
    Setting("solo-checkpoint-interval", 1800,
            "Seconds of simulated time between checkpoints while one site trains alone."),
    Setting("handshake-timeout", 60,
            "Seconds the ServerApp waits for every SuperNode to say which site it is."),
    Setting("stop-grace", 120,
            "Wall seconds a stopped site may take to hand in its work before it counts as lost."),
    Setting("outer-optimizer", "none",
            'How averaged updates are applied: "none" (federated averaging) or "nesterov" (DiLoCo).'),
    Setting("outer-lr", 0.7, "Outer learning rate (nesterov)."),
    Setting("outer-momentum", 0.9, "Outer Nesterov momentum."),
    # model, data, training (the same at every site; see nanochat/trainer.py TrainConfig for the rest)
    Setting("depth", 4, "Model depth (width = 64 x depth): 20 for the d20 baseline; 2-6 on CPU."),
    Setting("max-seq-len", 256, "Context length in tokens."),
    Setting("device-batch-size", 4, "Sequences per rank per micro-step."),
    Setting("total-batch-size", 2048, "Tokens per optimizer step of a site (524288 for d20)."),
    Setting("max-rounds", 0, "End the run after this many rounds (0: no limit; the token budget still applies)."),
    Setting("token-budget", 0,
            "Tokens to train in all (the schedule's horizon). 0: 20 tokens per parameter (Chinchilla)."),
    Setting("data-dir", "", "Directory of the parquet shards (last one = validation). Empty: $NANOCHAT_BASE_DIR/base_data."),
    Setting("tokenizer-dir", "", "Directory of the tokenizer. Empty: $NANOCHAT_BASE_DIR/tokenizer."),
    Setting("update-payload", "delta-bf16",
            'What a site of a federated round hands in: "delta-bf16" (the pseudo-gradient start - end in bf16, half '
            'the bytes; averaged in fp32) or "weights-fp32" (its weights). A site training alone always sends its '
            'exact fp32 weights.'),
    Setting("eval-tokens", 16384, "Validation tokens evaluated after every aggregation (0: no evaluation)."),
    Setting("wandb-mode", "",
            'Weights & Biases logging of the run\'s metrics: "offline" (files under the run directory), "online", '
            '"disabled". Empty: $WANDB_MODE, else online when WANDB_API_KEY is set, else none.'),
    # sites
    Setting("site-nproc", 1, "Processes of each site trainer (its GPUs; gloo processes on CPU)."),
    Setting("site-device", "auto", 'Device of the site trainers: "auto" (CUDA when present), "cuda" or "cpu".'),
    # elastic sites (pilot/provision/, docs/provisioning.md)
    Setting("provisioner", "none",
            'Who brings sites\' compute up and down with their windows: "none" (SuperNodes started by hand), '
            '"local" (SuperNodes on this host, one GPU set each), "kubernetes" (scale each site\'s StatefulSet).'),
    Setting("provision-sites", "",
            "Sites to provision: NAME[:GPUS],... (this host's GPUs given out in order) or a sites TOML file."),
    Setting("provision-superlink", "127.0.0.1:8000", "SuperLink address the provisioned SuperNodes connect to (local)."),
    Setting("provision-startup-delay", 0.0,
            "Seconds before a provisioned SuperNode starts, to model a machine's boot (local)."),
    Setting("provision-open-timeout", 300.0,
            "Seconds a site may take to come up before the attempt counts as failed (retried with back-off)."),
    Setting("provision-backoff", 5.0,
            "Seconds before the first retry of a failed open or close; doubles with each failure, up to 300."),
    Setting("provision-health-interval", 10.0,
            "Seconds between checks that an open site's node still runs (a dead one is opened again)."),
    Setting("provision-root-certificates", "",
            "CA certificate for the provisioned SuperNodes' TLS (local). Empty: --insecure, with a warning."),
    Setting("provision-auth-key-dir", "",
            "Directory of the sites' private keys, one file per site name (`pilot certs`' DIR/sites)."),
    Setting("provision-namespace", "pilot", "Kubernetes namespace of the sites' StatefulSets."),
    # the weights data plane
    Setting("blob-host", "127.0.0.1", "Address the ServerApp's weights server listens on."),
    Setting("blob-port", 0, "Port of the weights server (0: any free port)."),
    Setting("blob-url", "", "URL the sites use to reach the weights server. Empty: http(s)://BLOB-HOST:PORT."),
    Setting("blob-certfile", "",
            "TLS certificate of the weights server (PEM; `pilot certs` makes blob.crt). Empty: plain HTTP, "
            "for loopback only. The sites learn the CA (blob-cafile) through the authenticated Flower channel."),
    Setting("blob-keyfile", "", "Private key of blob-certfile (PEM)."),
    Setting("blob-cafile", "", "CA certificate that signed blob-certfile (PEM; `pilot certs` makes ca.crt)."),
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
        if expected is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, expected) or (expected is int and isinstance(v, bool)):
            raise TypeError(f"run setting {k!r} must be {expected.__name__}, got {v!r}")
        values[k] = v
    return values


# ------------------------------------------------------------------ typed groups: the settings as code reads them
@dataclass(frozen=True)
class RunGroup:
    run_id: str
    run_dir: str
    redis_url: str
    wandb_mode: str


@dataclass(frozen=True)
class RoundGroup:
    curtailment: str
    round_duration: float
    solo_checkpoint_interval: float
    handshake_timeout: float
    stop_grace: float
    outer_optimizer: str
    outer_lr: float
    outer_momentum: float
    max_rounds: int
    token_budget: int
    eval_tokens: int


@dataclass(frozen=True)
class ModelGroup:
    depth: int
    max_seq_len: int
    device_batch_size: int
    total_batch_size: int
    data_dir: str
    tokenizer_dir: str


@dataclass(frozen=True)
class SiteGroup:
    nproc: int
    device: str


@dataclass(frozen=True)
class DataPlaneGroup:
    update_payload: str
    host: str
    port: int
    url: str
    certfile: str
    keyfile: str
    cafile: str


@dataclass(frozen=True)
class ProvisionGroup:
    kind: str
    sites: str
    superlink: str
    startup_delay: float
    open_timeout: float
    backoff: float
    health_interval: float
    root_certificates: str
    auth_key_dir: str
    namespace: str


@dataclass(frozen=True)
class Settings:
    """A run's settings in groups, each read by one part of the system."""

    run: RunGroup
    rounds: RoundGroup
    model: ModelGroup
    sites: SiteGroup
    dataplane: DataPlaneGroup
    provision: ProvisionGroup


# which group and field each key fills (a key's field is its name with '-' as '_', less the group's prefix)
_GROUPS = {"run": RunGroup, "rounds": RoundGroup, "model": ModelGroup, "sites": SiteGroup,
           "dataplane": DataPlaneGroup, "provision": ProvisionGroup}
_PLACE = {"run-id": "run", "run-dir": "run", "redis-url": "run", "wandb-mode": "run",
          "depth": "model", "max-seq-len": "model", "device-batch-size": "model", "total-batch-size": "model",
          "data-dir": "model", "tokenizer-dir": "model", "site-nproc": "sites", "site-device": "sites",
          "update-payload": "dataplane", "provisioner": "provision"}
_PREFIX = {"sites": "site_", "dataplane": "blob_", "provision": "provision_"}


def _place(key: str) -> tuple[str, str]:
    group = _PLACE.get(key) or ("dataplane" if key.startswith("blob-") else
                                "provision" if key.startswith("provision-") else "rounds")
    name = key.replace("-", "_")
    if key == "provisioner":
        return group, "kind"
    return group, name.removeprefix(_PREFIX.get(group, ""))


def load(run_config: Mapping[str, Any]) -> Settings:
    """The run's settings, checked (see `resolve`) and grouped."""
    values = resolve(run_config)
    parts: dict[str, dict[str, Any]] = {g: {} for g in _GROUPS}
    for key, value in values.items():
        group, name = _place(key)
        parts[group][name] = value
    return Settings(**{g: cls(**parts[g]) for g, cls in _GROUPS.items()})



def reference_markdown() -> str:
    """The configuration reference as a Markdown table (what `pilot config` prints)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = f'"{s.default}"' if isinstance(s.default, str) else str(s.default)
        rows.append(f"| `{s.key}` | `{default}` | {s.help} |")
    return "\n".join(rows) + "\n"


def pyproject_block() -> str:
    """The [tool.flwr.app.config] body for pyproject.toml."""
    def value(v: Any) -> str:
        return f'"{v}"' if isinstance(v, str) else repr(v)
    return "".join(f"{s.key} = {value(s.default)}\n" for s in SETTINGS)


def update_files(root: Path) -> None:
    """Rewrite the settings in pyproject.toml and the reference in README.md from SETTINGS."""
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    head = "[tool.flwr.app.config]\n"
    start = text.index(head) + len(head)
    end = text.index("\n\n", start) + 1
    pyproject.write_text(text[:start] + pyproject_block() + text[end:])
    readme = root / "README.md"
    text = readme.read_text()
    open_tag, close_tag = "<!-- pilot config -->\n", "<!-- /pilot config -->"
    start = text.index(open_tag) + len(open_tag)
    end = text.index(close_tag)
    readme.write_text(text[:start] + reference_markdown() + text[end:])
