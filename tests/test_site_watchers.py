"""The stop watcher's recent reading (pilot/site/watchers.py, recent_clear): a round a site carried steps into
starts without a Redis round trip of its own only when the watcher's thread, armed for that round of that server,
found nothing against it a moment ago; a closed window, another server or an old reading never pass."""

from __future__ import annotations

import time

import torch

from nanochat.distributed import DistInfo
from nanochat.tokenizer import Tokenizer
from nanochat.trainer import TrainConfig, Trainer, plan_training
from pilot import protocol
from pilot.energy.events import site_key
from pilot.site.watchers import StopWatcher

RUN, SITE = "watch", "client_0"


def test_only_a_fresh_clear_reading_of_the_same_round_and_server_stands(redis_client, tiny_tokenizer):
    cfg = TrainConfig(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=128, num_iterations=10,
                      compile="off")
    plan = plan_training(cfg, Tokenizer.from_directory(tiny_tokenizer).get_vocab_size(), world_size=1)
    trainer = Trainer.create(cfg, plan, DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
    redis_client.set(protocol.server_current_key(RUN), "srv")
    redis_client.set(protocol.server_alive_key(RUN), "srv")
    redis_client.hset(site_key(RUN, SITE), mapping={"curtailed": 1})
    watcher = StopWatcher(redis_client, RUN, SITE, trainer)
    assert not watcher.recent_clear(2, "srv")            # nothing read yet
    watcher.arm(2, "srv")                                 # carrying into round 2
    time.sleep(0.5)
    assert watcher.recent_clear(2, "srv")
    assert not watcher.recent_clear(3, "srv") and not watcher.recent_clear(2, "other-server")
    assert not watcher.recent_clear(2, "srv", within_s=0.0)
    redis_client.hset(site_key(RUN, SITE), mapping={"curtailed": 0})   # the window closes
    deadline = time.monotonic() + 5
    while not trainer.stop_event.is_set() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert trainer.stop_event.is_set() and watcher.reason
    assert not watcher.recent_clear(2, "srv")
    watcher.disarm()
