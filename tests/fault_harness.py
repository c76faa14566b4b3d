"""What the fault tests (tests/test_faults_*.py) share: a real site trainer process (one rank, or two gloo ranks
under torchrun) driven through a real Redis as the server would drive it, a real weights server, a private
redis-server that a test may freeze or kill, and an energy scenario for a real energy_simulation.py."""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import redis
import torch

from nanochat.gpt import build_model
from nanochat.tokenizer import Tokenizer
from nanochat.trainer import TrainConfig, plan_training
from pilot import protocol
from pilot.coordination import find_redis_server, free_port
from pilot.dataplane.server import BlobServer
from pilot.dataplane.store import BlobStore
from pilot.protocol import RoundRequest, RoundResult
from tests.conftest import PROJECT_ROOT, subprocess_env

SITE = "client_0"
TOKEN = "fault-token"
# depth 2, 128 tokens a step: a step takes a few tens of milliseconds on one CPU thread
CONFIG = TrainConfig(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=128, num_iterations=100000,
                     compile="off", warmup_ratio=0.0)


def wait_for(condition: Callable[[], object], timeout: float, what: str, poll: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class CountingStore(BlobStore):
    """A BlobStore that remembers every blob the weights server was asked for (its access log)."""

    def __init__(self) -> None:
        super().__init__()
        self.served: list[str] = []

    def get(self, digest: str):
        self.served.append(digest)
        return super().get(digest)


class PrivateRedis:
    """A redis-server of the test's own (password, loopback, no persistence), to freeze or kill at will."""

    def __init__(self, tmp: Path):
        self.password, self.port, self.dir = secrets.token_hex(8), free_port(), tmp
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [find_redis_server(), "--bind", "127.0.0.1", "--port", str(self.port), "--requirepass", self.password,
             "--dir", str(self.dir), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        wait_for(lambda: _pings(client), 10, "redis-server to answer")

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class SiteHarness:
    """One site trainer process, the run's train config and server keys in Redis, and a weights server."""

    def __init__(self, redis_url: str, run: str, data_dir: Path, tokenizer_dir: Path, log: Path,
                 nproc: int = 1, config: TrainConfig = CONFIG):
        self.url, self.run, self.log_path = redis_url, run, log
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)
        self.config = config
        self.plan = plan_training(config, Tokenizer.from_directory(tokenizer_dir).get_vocab_size(), world_size=nproc)
        self.r.set(protocol.train_config_key(run), json.dumps({**asdict(config), "data_dir": str(data_dir),
                                                              "tokenizer_dir": str(tokenizer_dir)}))
        self.r.set(protocol.server_current_key(run), "srv")
        self.r.set(protocol.server_alive_key(run), "srv")
        self.store = CountingStore()
        self.blobs = BlobServer(self.store, token=TOKEN).start()
        self.initial = build_model(self.plan.model_config, seed=0).state_dict()
        self.digest = self.store.publish(self.initial)
        module = ["-m", "pilot.site.trainer", "--site", SITE, "--run-id", run, "--device", "cpu"]
        command = [sys.executable, *module] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *module]
        self.log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                                        env=subprocess_env(PILOT_REDIS_URL=redis_url, PILOT_SITE_THREADS="1"))
        wait_for(lambda: self.process.poll() is not None or self.r.hget(protocol.trainer_key(run, SITE), "status")
                 == "idle", 120, "the site trainer to be ready")
        assert self.process.poll() is None, self.output()

    @property
    def tokens_per_step(self) -> int:
        return self.plan.total_batch_size

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def request(self, number: int, shards: list[str], digest: str | None = None, blob_url: str | None = None,
                cursors: list[dict] | None = None, round_steps: int = 0, **fields) -> None:
        """A round request as the server sends it; `fields`: any other RoundRequest field (update_payload, ...)."""
        req = self.round_request(number, shards, digest, blob_url, cursors, round_steps, **fields)
        self.r.xadd(protocol.inbox_key(self.run, SITE), {"kind": "train", "round": number, "request": req.to_json()},
                    maxlen=10)

    def round_request(self, number: int, shards: list[str], digest: str | None = None, blob_url: str | None = None,
                      cursors: list[dict] | None = None, round_steps: int = 0, **fields) -> RoundRequest:
        return RoundRequest(round=number, server_id="srv", weights_digest=digest or self.digest,
                            blob_url=blob_url or self.blobs.url, blob_token=TOKEN, shards=shards, cursors=cursors,
                            schedule_step=0, max_steps=10**6, round_steps=round_steps, **fields)

    def result(self, number: int, timeout: float = 90) -> RoundResult:
        def find() -> RoundResult | None:
            assert self.process.poll() is None, f"the site trainer died:\n{self.output()}"
            for _, fields in self.r.xrevrange(protocol.outbox_key(self.run, SITE), count=5):
                result = RoundResult.from_json(fields["result"])
                if result.round == number:
                    return result
            return None
        return wait_for(find, timeout, f"the result of round {number}")

    def steps(self, number: int) -> list[dict]:
        """The metrics stream's entries of round `number` (one per optimizer step), in order."""
        return [f for _, f in self.r.xrange(protocol.metrics_key(self.run, SITE)) if f["round"] == str(number)]

    def stop_round(self, number: int, reason: str = "round duration reached") -> None:
        self.r.set(protocol.stop_key(self.run, number), reason)

    def close(self) -> None:
        try:
            self.r.xadd(protocol.inbox_key(self.run, SITE), {"kind": "shutdown"})
            self.process.wait(timeout=30)
        except (redis.RedisError, subprocess.TimeoutExpired):
            pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.blobs.stop()
        self.log.close()


def copy_shards(text_shards: Path, into: Path, count: int = 2) -> list[str]:
    """`count` training shards copied into a data dir of the test's own (a test may delete or spoil them)."""
    into.mkdir(parents=True, exist_ok=True)
    names = []
    for path in sorted(text_shards.glob("shard_*.parquet"))[:count]:
        shutil.copy(path, into / path.name)
        names.append(path.name)
    return names


def nan_weights(weights: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in weights.items()}
    out[name].view(-1)[0] = float("nan")
    return out


def always_curtailed_scenario(tmp: Path, site: str = SITE, step_s: int = 300, days: int = 2) -> Path:
    """One MOER site below its threshold for the whole span: curtailed from the first step to the end."""
    t0 = datetime(2025, 3, 1, tzinfo=UTC).timestamp()
    rows = ["timestamp,CAISO_NORTH"] + [f"{datetime.fromtimestamp(t0 + i * step_s, tz=UTC).isoformat()},50"
                                         for i in range(days * 86400 // step_s)]
    (tmp / "moer.csv").write_text("\n".join(rows) + "\n")
    (tmp / "scenario.toml").write_text(f"""
[scenario]
start = "2025-03-01T00:00:00Z"
end = "2025-03-{1 + days:02d}T00:00:00Z"
step_s = {step_s}
threshold = 100

[[sites]]
name = "{site}"
region = "CAISO_NORTH"
signal = "moer"
gpus = 1
gpu_train_kw = 0.7
gpu_idle_kw = 0.1
moer_trace = "moer.csv"
""")
    return tmp / "scenario.toml"


def outbox_result(r, run: str, site: str, round_number: int, timeout: float = 120) -> RoundResult:
    """The site's result for `round_number`, read from its outbox as the server would (AssertionError after timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, fields in r.xrevrange(protocol.outbox_key(run, site), count=1):
            result = RoundResult.from_json(fields["result"])
            if result.round == round_number:
                return result
        time.sleep(0.05)
    raise AssertionError(f"no result for round {round_number}")
