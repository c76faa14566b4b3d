"""Fault 5: the upload of a round's update fails (the weights server is gone when the round ends). The round is an
error, and the site no longer believes it holds the global weights: the next round fetches them, even when the
server offers the very same global weights again (nothing was aggregated), instead of training on from its own
unaggregated ones."""

from __future__ import annotations

import torch

from pilot.dataplane.server import BlobServer
from tests.fault_harness import TOKEN, SiteHarness, copy_shards, wait_for

RUN = "fault-upload"


def test_a_failed_upload_makes_the_next_round_fetch_the_global_weights(redis_client, redis_server, tmp_path,
                                                                        text_shards, tiny_tokenizer):
    shards = copy_shards(text_shards, tmp_path / "data")
    site = SiteHarness(redis_server.url, RUN, tmp_path / "data", tiny_tokenizer, tmp_path / "trainer.log")
    try:
        site.request(1, shards)
        wait_for(lambda: len(site.steps(1)) >= 2, 60, "the site to train")
        assert site.store.served.count(site.digest) == 1
        site.blobs.stop()                   # the weights server goes away: the upload finds a closed port
        site.stop_round(1)
        first = site.result(1)
        assert first.status == "error" and first.reason.startswith("uploading the round's update"), first.reason

        # the server aggregated nothing, so it offers the same global weights again, from a server that is back
        with BlobServer(site.store, token=TOKEN) as again:
            site.request(2, shards, blob_url=again.url)
            wait_for(lambda: len(site.steps(2)) >= 1, 60, "round 2 to train")
            site.stop_round(2)
            second = site.result(2)
        assert site.store.served.count(site.digest) == 2, "round 2 fetched the global weights again"
        assert second.status == "ok" and second.steps >= 1 and second.trainer_pid == first.trainer_pid
        # it trained from the global weights: its update is a few steps away from them, not a round's worth more
        uploaded = site.store.get(second.weights_digest).tensors
        assert not torch.equal(uploaded["lm_head.weight"], site.initial["lm_head.weight"])
    finally:
        site.close()
