"""Data never runs out mid-round: a site (two gloo ranks) whose shard ends inside a round leases its next shard
from its spare list and trains on; the ledger then accounts both shards from the ranks' cursors, so every row
is trained once (the next round starts each rank exactly where it stopped)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.gpt import build_model
from nanochat.tokenizer import Tokenizer
from nanochat.trainer import TrainConfig, plan_training
from pilot import coordination, protocol
from pilot.dataplane.server import BlobServer
from pilot.dataplane.store import BlobStore
from pilot.energy.events import site_key
from pilot.protocol import RoundRequest, RoundResult
from pilot.server.ledger import Assignment, Ledger
from pilot.server.training import shards_trained
from tests.conftest import subprocess_env
from tests.fault_harness import outbox_result

RUN, SITE = "spares-test", "client_0"


def wait_result(r, round_number: int) -> RoundResult:
    return outbox_result(r, RUN, SITE, round_number)


def test_a_site_leases_its_next_shard_mid_round_and_the_ledger_accounts_every_row(tmp_path, text_shards,
                                                                                     tiny_tokenizer):
    # a short shard (a few steps' worth) and a long one, from the packaged prose
    texts = pq.read_table(sorted(text_shards.glob("shard_*.parquet"))[0], columns=["text"]).column("text").to_pylist()
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"text": [t[:400] for t in texts[:6]]}), data / "shard_00000.parquet")
    pq.write_table(pa.table({"text": texts[6:400]}), data / "shard_00001.parquet")
    short, long_ = "shard_00000.parquet", "shard_00001.parquet"
    run_dir = tmp_path / "run"
    r = coordination.connect(run_dir=run_dir)
    url = coordination.EmbeddedRedis(run_dir).read_state().url
    cfg = TrainConfig(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=256, num_iterations=100000,
                      compile="off")
    plan = plan_training(cfg, Tokenizer.from_directory(tiny_tokenizer).get_vocab_size(), world_size=2)
    r.set(protocol.train_config_key(RUN),
          json.dumps({**asdict(cfg), "data_dir": str(data), "tokenizer_dir": str(tiny_tokenizer)}))
    r.set(protocol.server_current_key(RUN), "srv")
    r.set(protocol.server_alive_key(RUN), "srv")
    r.hset(site_key(RUN, SITE), mapping={"curtailed": 1})
    # the server's side: the site holds the short shard, the long one is its spare
    ledger = Ledger(r, RUN)
    ledger.init([short, long_])
    assignment = ledger.assign(SITE, world_size=2, per_site=1)
    assert assignment.shards == [short]
    assert ledger.reserve_spares(SITE, assignment.shards) == [long_]
    r.rpush(protocol.spare_key(RUN, SITE), long_)
    store = BlobStore()
    digest = store.publish(build_model(plan.model_config, seed=0).state_dict())
    trainer = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "pilot.site.trainer", "--site", SITE, "--run-id", RUN, "--run-dir", str(run_dir), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=subprocess_env(PILOT_REDIS_URL=url, PILOT_SITE_THREADS="1"))
    try:
        with BlobServer(store, token="t") as server:
            def request(n: int, shards: list[str], cursors) -> None:
                req = RoundRequest(round=n, server_id="srv", weights_digest=digest, blob_url=server.url,
                                   blob_token="t", shards=shards, cursors=cursors, schedule_step=0,
                                   max_steps=10**6, update_payload="weights-fp32")
                r.xadd(protocol.inbox_key(RUN, SITE), {"kind": "train", "round": n, "request": req.to_json()},
                       maxlen=1)

            request(1, assignment.shards, assignment.cursors)
            deadline = time.monotonic() + 120
            while not [f for _, f in r.xrange(protocol.metrics_key(RUN, SITE)) if int(f["step"]) >= 12]:
                assert trainer.poll() is None and time.monotonic() < deadline, "no training"
                time.sleep(0.1)
            r.set(protocol.stop_key(RUN, 1), "round duration reached")
            first = wait_result(r, 1)
            assert first.status == "ok" and not first.exhausted, first
            assert first.extra["spares"] == [long_], "the short shard ran out and the spare was leased mid-round"
            assert {c["file"] for c in first.cursors} == {long_}, first.cursors
            # the server commits over the shard and the spare: the short one is done, the long one carries the
            # cursors of both ranks, and the next round starts each rank exactly there
            ledger.commit(SITE, shards_trained(Assignment(assignment.shards, None), first), first.cursors, 2)
            records = ledger.records()
            assert records[short].done and not records[long_].done
            nxt = ledger.assign(SITE, world_size=2)
            assert nxt.shards == [long_] and nxt.cursors == first.cursors
            assert r.llen(protocol.spare_key(RUN, SITE)) == 0, "a leased spare is gone from the list"
            r.xadd(protocol.inbox_key(RUN, SITE), {"kind": "shutdown"}, maxlen=1)
            output, _ = trainer.communicate(timeout=60)
        assert trainer.returncode == 0, output
        assert f"leased {long_}" in output
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(timeout=30)
        coordination.EmbeddedRedis(run_dir).stop()   # a killed trainer releases nothing: no redis-server left behind
