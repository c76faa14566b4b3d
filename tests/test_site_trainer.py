"""A site trainer with two gloo ranks under torchrun: trains a round on real text, stops at one agreed step
boundary when its window closes (no rank left in a collective), reports every rank's data cursor, keeps its
state into the next round, and exits on shutdown."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict

import torch

from nanochat.gpt import build_model
from nanochat.tokenizer import Tokenizer
from nanochat.trainer import TrainConfig, plan_training
from pilot import coordination, protocol
from pilot.dataplane.server import BlobServer
from pilot.dataplane.store import BlobStore
from pilot.energy.events import site_key
from pilot.protocol import RoundRequest, RoundResult
from tests.conftest import subprocess_env
from tests.fault_harness import outbox_result

RUN, SITE = "site-test", "client_0"


def wait_result(r, round_number: int) -> RoundResult:
    return outbox_result(r, RUN, SITE, round_number)


def test_two_rank_site_trainer_stops_together_and_keeps_its_state(tmp_path, text_shards, tiny_tokenizer):
    run_dir = tmp_path / "run"
    r = coordination.connect(run_dir=run_dir)
    url = coordination.EmbeddedRedis(run_dir).read_state().url
    cfg = TrainConfig(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=256, num_iterations=100000,
                      compile="off")
    plan = plan_training(cfg, Tokenizer.from_directory(tiny_tokenizer).get_vocab_size(), world_size=2)
    r.set(protocol.train_config_key(RUN),
          json.dumps({**asdict(cfg), "data_dir": str(text_shards), "tokenizer_dir": str(tiny_tokenizer)}))
    r.set(protocol.server_current_key(RUN), "srv")
    r.set(protocol.server_alive_key(RUN), "srv")
    r.hset(site_key(RUN, SITE), mapping={"curtailed": 1})
    store = BlobStore()
    initial = build_model(plan.model_config, seed=0).state_dict()
    digest = store.publish(initial)
    shards = [p.name for p in sorted(text_shards.glob("shard_*.parquet"))[:2]]
    trainer = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "pilot.site.trainer", "--site", SITE, "--run-id", RUN, "--run-dir", str(run_dir), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=subprocess_env(PILOT_REDIS_URL=url, PILOT_SITE_THREADS="1"))
    try:
        with BlobServer(store, token="t") as server:
            def request(n: int, weights: str) -> None:
                req = RoundRequest(round=n, server_id="srv", weights_digest=weights, blob_url=server.url,
                                   blob_token="t", shards=shards, cursors=None, schedule_step=0, max_steps=10**6)
                r.xadd(protocol.inbox_key(RUN, SITE), {"kind": "train", "round": n, "request": req.to_json()},
                       maxlen=1)

            request(1, digest)
            while r.hget(protocol.trainer_key(RUN, SITE), "status") != "training":
                assert trainer.poll() is None
                time.sleep(0.1)
            time.sleep(2.0)
            r.hset(site_key(RUN, SITE), mapping={"curtailed": 0})  # the window closes
            first = wait_result(r, 1)
            assert first.status == "ok" and first.reason == "window closed" and first.steps > 0
            assert first.world_size == 2 and [c["rank"] for c in first.cursors] == [0, 1]
            uploaded = store.get(first.weights_digest).tensors
            assert not torch.equal(uploaded["lm_head.weight"], initial["lm_head.weight"]), "it trained"

            # round 2 starts from its own result: nothing fetched, optimizer state and data position kept
            r.hset(site_key(RUN, SITE), mapping={"curtailed": 1})
            request(2, first.weights_digest)
            time.sleep(2.0)
            r.set(protocol.stop_key(RUN, 2), "round duration reached")
            second = wait_result(r, 2)
            assert second.status == "ok" and second.reason == "round duration reached"
            assert second.trainer_pid == first.trainer_pid
            assert second.trainer_step == first.trainer_step + second.steps
            for before, after in zip(first.cursors, second.cursors, strict=True):
                assert (after["file"], after["row"]) >= (before["file"], before["row"]), "data moves on"
            r.xadd(protocol.inbox_key(RUN, SITE), {"kind": "shutdown"}, maxlen=1)
            output, _ = trainer.communicate(timeout=60)
        assert trainer.returncode == 0, output
    finally:
        if trainer.poll() is None:
            trainer.kill()
    coordination.release(r, run_dir)
