"""Run settings: one table, the single source of the configuration reference.

Each setting is a key of `[tool.flwr.app.config]` in pyproject.toml (override one with
`flwr run . local-simulation --run-config 'round-duration=60'`). `pilot config` prints this table as
Markdown; the README embeds that output and a test keeps the two, and pyproject.toml, in step.
"""

from __future__ import annotations

import re
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
    Setting("round-steps", 0,
            "Inner optimizer steps per federated round (DiLoCo's H): a site hands in after this many. 0: rounds "
            "end by round-duration only; else whichever comes first, and the outer step is weighted by steps."),
    Setting("solo-checkpoint-interval", 1800,
            "Seconds of simulated time between checkpoints while one site trains alone."),
    Setting("handshake-timeout", 60,
            "Seconds the ServerApp waits for every SuperNode to say which site it is."),
    Setting("stop-grace", 120,
            "Wall seconds a stopped site may take to hand in its work before it counts as lost."),
    Setting("round-mode", "sync",
            'How a federated round meets the next one: "sync" (a site stops, hands in its update and waits for the '
            'new global model) or "overlap" (a site keeps training while its update travels and folds the new '
            'global model in when it arrives, one round late: Streaming DiLoCo\'s overlapped outer step).'),
    Setting("direct-delivery", True,
            "Also put each round request straight into the inbox of a live site trainer that trusts this server's "
            "key (through Redis), so that a round starts without waiting for the SuperNode's poll and a fresh "
            "ClientApp process; Flower's relay stays the path of record. false: Flower's relay only."),
    Setting("outer-optimizer", "none",
            'How averaged updates are applied: "none" (federated averaging) or "nesterov" (DiLoCo).'),
    Setting("outer-lr", 0.7, "Outer learning rate (nesterov)."),
    Setting("outer-momentum", 0.9, "Outer Nesterov momentum."),
    # model, data, training (the same at every site; see nanochat/trainer.py TrainConfig for the rest)
    Setting("depth", 4, "Model depth (width = 64 x depth): 20 for the d20 baseline; 2-6 on CPU."),
    Setting("max-seq-len", 256, "Context length in tokens."),
    Setting("device-batch-size", 4, "Sequences per rank per micro-step."),
    Setting("total-batch-size", 2048, "Tokens per optimizer step of a site (524288 for d20)."),
    # optimization: the names of scripts/base_train.py's flags with '-' for '_' (--matrix_lr is matrix-lr)
    Setting("lr", 1.0,
            "Multiplier of nanochat's three learning rates (matrix-lr, embedding-lr, unembedding-lr): the "
            "prototype's one knob. lr=0.5 halves all three; the three can also be set one by one."),
    Setting("matrix-lr", 0.02, "Muon learning rate of the transformer's matrices."),
    Setting("embedding-lr", 0.2, "AdamW learning rate of the token embedding."),
    Setting("unembedding-lr", 0.004, "AdamW learning rate of the output head."),
    Setting("weight-decay", 0.0, "Weight decay."),
    Setting("warmup-ratio", 0.0, "Share of the schedule's horizon spent warming the learning rate up."),
    Setting("warmdown-ratio", 0.2, "Share of the horizon spent decaying the learning rate to final-lr-frac."),
    Setting("final-lr-frac", 0.0, "Learning-rate multiplier at and past the horizon (never negative)."),
    Setting("grad-clip", 1.0, "Clip the global gradient norm to this before every step, as classic nanochat (0: off)."),
    Setting("max-rounds", 0, "End the run after this many rounds (0: no limit; the token budget still applies)."),
    Setting("token-budget", 0,
            "Tokens to train in all (the schedule's horizon). 0: 20 tokens per parameter (Chinchilla)."),
    Setting("data-dir", "", "Directory of the parquet shards (last one = validation). Empty: $NANOCHAT_BASE_DIR/base_data."),
    Setting("tokenizer-dir", "", "Directory of the tokenizer. Empty: $NANOCHAT_BASE_DIR/tokenizer."),
    Setting("update-payload", "delta-bf16",
            'What a site of a federated round hands in: "delta-bf16" (the pseudo-gradient start - end in bf16, half '
            'the bytes; averaged in fp32), "weights-fp32" (its weights), or "delta-int8" / "delta-int4" / "delta-int2" '
            '(block-quantized with error feedback at the site: ~2x / ~4x / ~8x fewer bytes than bf16). A site '
            'training alone always sends its exact fp32 weights.'),
    Setting("global-payload", "delta-bf16",
            'How the global model reaches a site that holds the last one: "delta-bf16" (the bf16 delta from the '
            'weights it holds, half the bytes; it then holds, bit for bit, a view of the fp32 masters within one '
            'bf16 rounding of a round\'s move) or "weights-fp32" (the masters whole, every round). A site that '
            'holds no recent global model (new, back from a pause, in an overlapped round) fetches it whole.'),
    Setting("eval-tokens", 16384, "Validation tokens evaluated after every aggregation (0: no evaluation)."),
    Setting("wandb-mode", "",
            'Weights & Biases logging of the run\'s metrics: "offline" (files under the run directory), "online", '
            '"disabled". Empty: $WANDB_MODE, else online when WANDB_API_KEY is set, else none.'),
    # sites
    Setting("site-nproc", 1, "Processes of each site trainer (its GPUs; gloo processes on CPU)."),
    Setting("site-device", "auto", 'Device of the site trainers: "auto" (CUDA when present), "cuda" or "cpu".'),
    Setting("emulate-step-s", 0.0,
            "BENCHMARKS ONLY: each optimizer step is an emulated GPU step of this many seconds (a fixed-duration "
            "stand-in that still changes every weight), to measure the system around the GPU. 0: real training."),
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
    Setting("blob-allow-insecure", False,
            "Let the weights server speak plain HTTP on a non-loopback blob-host (a private network you trust); "
            "otherwise such a host needs blob-certfile/keyfile/cafile."),
)

BY_KEY = {s.key: s for s in SETTINGS}


class SettingError(ValueError):
    """A run setting that cannot be used: names the key, what was expected and, for a typo, the closest key."""

    def __str__(self) -> str:  # a KeyError would print its message in quotes
        return str(self.args[0]) if self.args else ""


class UnknownSetting(SettingError, KeyError):
    pass


class BadSettingValue(SettingError, TypeError):
    pass


RANGES = {  # numeric settings that must lie in a range: (low, high, inclusive low)
    "lr": (0.0, None, False), "matrix-lr": (0.0, None, True), "embedding-lr": (0.0, None, True),
    "unembedding-lr": (0.0, None, True), "weight-decay": (0.0, None, True), "warmup-ratio": (0.0, 1.0, True),
    "warmdown-ratio": (0.0, 1.0, True), "final-lr-frac": (0.0, 1.0, True), "grad-clip": (0.0, None, True),
    "round-duration": (0.0, None, False), "round-steps": (0, None, True), "solo-checkpoint-interval": (0.0, None, False),
    "outer-lr": (0.0, None, False), "outer-momentum": (0.0, 1.0, True), "depth": (1, None, True),
    "max-seq-len": (1, None, True), "device-batch-size": (1, None, True), "total-batch-size": (1, None, True),
    "site-nproc": (1, None, True), "emulate-step-s": (0.0, None, True), "eval-tokens": (0, None, True), "token-budget": (0, None, True),
    "max-rounds": (0, None, True),
}


RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CHOICES = {  # string settings with a fixed set of values
    "curtailment": ("energy", "always"), "round-mode": ("sync", "overlap"),
    "update-payload": ("delta-bf16", "weights-fp32", "delta-int8", "delta-int4", "delta-int2"),
    "global-payload": ("delta-bf16", "weights-fp32"), "outer-optimizer": ("none", "nesterov"),
    "site-device": ("auto", "cuda", "cpu"),   # provisioner: checked where it is built (provision/run.py)
    "wandb-mode": ("", "offline", "online", "disabled"),
}


def closest(key: str) -> str:
    import difflib

    match = difflib.get_close_matches(key, list(BY_KEY), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; known: {', '.join(sorted(BY_KEY))}"


def check_value(key: str, value: Any) -> Any:
    """`value` as the setting's type, or SettingError naming the key, the expected type and the range."""
    if key not in BY_KEY:
        raise UnknownSetting(f"unknown run setting {key!r}{closest(key)} (`pilot config` lists them all)")
    expected = type(BY_KEY[key].default)
    if expected is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        default = BY_KEY[key].default
        example = f'{key}="{default}"' if expected is str else f"{key}={str(default).lower()}" \
            if expected is bool else f"{key}={default}"   # TOML's booleans: true / false
        raise BadSettingValue(f"run setting {key!r} must be {expected.__name__} (e.g. {example}), got {value!r}")
    if key == "run-id" and not RUN_ID.fullmatch(value):
        raise BadSettingValue(f"run setting 'run-id' must be letters, digits, '_', '.' or '-' (it names Redis keys "
                              f"and a directory), got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise BadSettingValue(f"run setting {key!r} must be one of {', '.join(repr(c) for c in CHOICES[key])}, "
                              f"got {value!r}")
    if key in RANGES:
        low, high, inclusive = RANGES[key]
        if value != value or (value < low if inclusive else value <= low) or (high is not None and value > high):
            bound = f"{'>=' if inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise BadSettingValue(f"run setting {key!r} must be {bound}, got {value!r}")
    return value


def resolve(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with a run config; a bad key or value is a SettingError that says what to type."""
    values = {s.key: s.default for s in SETTINGS}
    for k, v in run_config.items():
        values[k] = check_value(k, v)
    return values


def parse_run_config(text: str) -> dict[str, Any]:
    """`--run-config` text as Flower reads it ('key=value key2="text"', TOML values)."""
    import shlex
    import tomllib

    out: dict[str, Any] = {}
    for part in shlex.split(text, posix=False):
        key, sep, raw = part.partition("=")
        if not sep:
            raise SettingError(f"run config {part!r} is not key=value")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError as error:
            raise SettingError(f"run setting {key!r}: {raw!r} is not a value (strings need quotes: "
                               f'{key}="{raw}"): {error}') from None
    return out


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
    round_steps: int
    solo_checkpoint_interval: float
    round_mode: str
    direct_delivery: bool
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
    lr: float
    matrix_lr: float
    embedding_lr: float
    unembedding_lr: float
    weight_decay: float
    warmup_ratio: float
    warmdown_ratio: float
    final_lr_frac: float
    grad_clip: float

    def optimization(self) -> dict[str, float]:
        """The TrainConfig fields these settings set (lr multiplies the three learning rates)."""
        return {"matrix_lr": self.matrix_lr * self.lr, "embedding_lr": self.embedding_lr * self.lr,
                "unembedding_lr": self.unembedding_lr * self.lr, "weight_decay": self.weight_decay,
                "warmup_ratio": self.warmup_ratio, "warmdown_ratio": self.warmdown_ratio,
                "final_lr_frac": self.final_lr_frac, "grad_clip": self.grad_clip}


@dataclass(frozen=True)
class SiteGroup:
    nproc: int
    device: str
    emulate_step_s: float


@dataclass(frozen=True)
class DataPlaneGroup:
    update_payload: str
    global_payload: str
    host: str
    port: int
    url: str
    certfile: str
    keyfile: str
    cafile: str
    allow_insecure: bool


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
_PLACE = {"lr": "model", "matrix-lr": "model", "embedding-lr": "model", "unembedding-lr": "model",
          "weight-decay": "model", "warmup-ratio": "model", "warmdown-ratio": "model", "final-lr-frac": "model",
          "grad-clip": "model", "run-id": "run", "run-dir": "run", "redis-url": "run", "wandb-mode": "run",
          "depth": "model", "max-seq-len": "model", "device-batch-size": "model", "total-batch-size": "model",
          "data-dir": "model", "tokenizer-dir": "model", "site-nproc": "sites", "site-device": "sites", "emulate-step-s": "sites",
          "update-payload": "dataplane", "global-payload": "dataplane", "provisioner": "provision"}
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
        default = f'"{s.default}"' if isinstance(s.default, str) else str(s.default).lower() if isinstance(s.default, bool) else str(s.default)
        rows.append(f"| `{s.key}` | `{default}` | {s.help} |")
    return "\n".join(rows) + "\n"


def pyproject_block() -> str:
    """The [tool.flwr.app.config] body for pyproject.toml."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
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
