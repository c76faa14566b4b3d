"""Seconds from "the site's window closed" (the energy event in Redis) to the last rank of its trainer stopped.

A real site trainer (1 process, and 2 gloo ranks under torchrun) trains a round on real text; the bench then
publishes the site's transition to "not curtailed" exactly as energy_simulation.py does (site hash + event
stream) and reads when the trainer's ranks left their step loop (they stop together, at one step boundary,
agreed by an all-reduce). The baseline printed beside it is the trainer's own optimizer step time: the design
promises a stop within one step of the signal, so the ratio should stay below ~1.

    .venv/bin/python bench/stop_latency.py [--repeats 5] [--depth 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq

from nanochat.gpt import build_model
from nanochat.offline_corpus import write_shards
from nanochat.tokenizer import Tokenizer, iter_capped, train_tokenizer
from nanochat.trainer import TrainConfig, plan_training
from pilot import coordination, protocol
from pilot.dataplane.server import BlobServer
from pilot.dataplane.store import BlobStore
from pilot.energy.events import site_key, stream_key
from pilot.protocol import RoundRequest, RoundResult

SITE, RUN = "client_0", "stop-bench"


def build_data(root: Path) -> tuple[Path, Path]:
    data, tok = root / "base_data", root / "tokenizer"
    write_shards(data, num_shards=4)
    files = sorted(data.glob("shard_*.parquet"))[:-1]
    texts = (t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist())
    train_tokenizer(iter_capped(texts, 2_000_000), 4096, tok)
    return data, tok


def measure(nproc: int, depth: int, repeats: int, root: Path, data: Path, tok: Path) -> list[tuple[float, float, float]]:
    run_dir = root / f"run-{nproc}-{depth}"
    r = coordination.connect(run_dir=run_dir)
    url = coordination.EmbeddedRedis(run_dir).read_state().url
    cfg = TrainConfig(depth=depth, max_seq_len=128, device_batch_size=4, total_batch_size=512 * nproc * 2,
                      num_iterations=100000, compile="off")
    plan = plan_training(cfg, Tokenizer.from_directory(tok).get_vocab_size(), world_size=nproc)
    r.set(protocol.train_config_key(RUN), json.dumps({**asdict(cfg), "data_dir": str(data), "tokenizer_dir": str(tok)}))
    r.set(protocol.server_current_key(RUN), "bench")
    r.set(protocol.server_alive_key(RUN), "bench")
    store = BlobStore()
    digest = store.publish(build_model(plan.model_config, seed=0).state_dict())
    module = ["-m", "pilot.site.trainer", "--site", SITE, "--run-id", RUN, "--run-dir", str(run_dir)]
    command = [sys.executable, *module] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *module]
    log = open(run_dir / "trainer.log", "ab")
    trainer = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, coordination.REDIS_URL_ENV: url, "PILOT_SITE_THREADS": "1"})
    rows = []
    try:
        with BlobServer(store, token="bench") as server:
            for n in range(1, repeats + 1):
                r.hset(site_key(RUN, SITE), mapping={"curtailed": 1})
                request = RoundRequest(round=n, server_id="bench", weights_digest=digest, blob_url=server.url,
                                       blob_token="bench", shards=[p.name for p in sorted(data.glob("*.parquet"))[:-1]],
                                       cursors=None, schedule_step=0, max_steps=100000)
                r.xadd(protocol.inbox_key(RUN, SITE), {"kind": "train", "round": n, "request": request.to_json()},
                       maxlen=1)
                while r.hget(protocol.trainer_key(RUN, SITE), "status") != "training" or \
                        r.hget(protocol.trainer_key(RUN, SITE), "round") != str(n):
                    assert trainer.poll() is None, (run_dir / "trainer.log").read_text()[-2000:]
                    time.sleep(0.05)
                time.sleep(3.0)  # well inside the round: weights fetched, steps running
                r.set(protocol.server_alive_key(RUN), "bench", ex=600)
                signal_at = time.time()
                pipe = r.pipeline(transaction=True)  # what the energy simulation publishes for a closing window
                pipe.hset(site_key(RUN, SITE), mapping={"curtailed": 0})
                pipe.xadd(stream_key(RUN), {"site": SITE, "curtailed": 0, "sim_ts": signal_at})
                pipe.execute()
                result = None
                while result is None:
                    for _, fields in r.xrevrange(protocol.outbox_key(RUN, SITE), count=1):
                        candidate = RoundResult.from_json(fields["result"])
                        if candidate.round == n:
                            result = candidate
                    time.sleep(0.01)
                handed_in = time.time() - signal_at
                step_s = result.seconds_training / max(result.steps, 1)
                rows.append((result.extra["stopped_at"] - signal_at, handed_in, step_s))
    finally:
        r.xadd(protocol.inbox_key(RUN, SITE), {"kind": "shutdown"}, maxlen=1)
        try:
            trainer.wait(timeout=60)
        except subprocess.TimeoutExpired:
            trainer.kill()
        log.close()
        coordination.EmbeddedRedis(run_dir).stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--depth", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, tok = build_data(root)
        print(f"{'ranks':>5} {'depth':>5} {'stop latency s (median, max)':>29} {'hand-in s (median)':>19} "
              f"{'step time s':>11} {'latency / step':>14}")
        for nproc in (1, 2):
            rows = measure(nproc, args.depth, args.repeats, root, data, tok)
            latency = [row[0] for row in rows]
            step = statistics.median(row[2] for row in rows)
            print(f"{nproc:>5} {args.depth:>5} {statistics.median(latency):>18.3f}, {max(latency):>8.3f} "
                  f"{statistics.median(row[1] for row in rows):>19.3f} {step:>11.3f} "
                  f"{statistics.median(latency) / step:>14.2f}")


if __name__ == "__main__":
    main()
