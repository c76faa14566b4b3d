"""Fault 8: non-finite numbers reach a site. Global weights holding a NaN are refused before a single step; finite
weights that blow up (a diverged global model: one MLP matrix at 1e30) give a NaN loss, which ends the round as
an error naming the step, before that step's update. Either way the trainer process lives on with its optimizer
state, forgets the weights it held, and the next round fetches the global model and trains finite steps."""

from __future__ import annotations

import math

import torch

from tests.fault_harness import SiteHarness, copy_shards, nan_weights, wait_for

RUN = "fault-nan"


def test_nan_weights_are_refused_and_a_nan_loss_ends_the_round_but_not_the_trainer(redis_client, redis_server,
                                                                                  tmp_path, text_shards,
                                                                                  tiny_tokenizer):
    shards = copy_shards(text_shards, tmp_path / "data")
    site = SiteHarness(redis_server.url, RUN, tmp_path / "data", tiny_tokenizer, tmp_path / "trainer.log")
    try:
        site.request(1, shards)
        wait_for(lambda: len(site.steps(1)) >= 2, 60, "the site to train")
        site.stop_round(1)
        first = site.result(1)
        assert first.status == "ok" and math.isfinite(first.loss)

        poisoned = site.store.publish(nan_weights(site.initial, "lm_head.weight"))
        site.request(2, shards, digest=poisoned, cursors=first.cursors)
        refused = site.result(2)
        assert refused.status == "error" and refused.steps == 0 and site.steps(2) == []
        assert "non-finite values in 1 tensor(s) (lm_head.weight): refused before training" in refused.reason

        diverged = {k: v.clone() for k, v in site.initial.items()}
        diverged["transformer.h.0.mlp.c_fc.weight"].fill_(1e30)      # finite, but the forward overflows
        site.request(3, shards, digest=site.store.publish(diverged), cursors=first.cursors)
        nan = site.result(3)
        assert nan.status == "error" and site.steps(3) == []
        assert nan.reason.startswith("non-finite training:") and "nan" in nan.reason and \
            "its step 1); the update was not applied" in nan.reason, nan.reason

        # the global model is still round 1's result: the site held it, but after the failures it fetches it
        served = site.store.served.count(first.weights_digest)
        site.request(4, shards, digest=first.weights_digest, cursors=first.cursors)
        wait_for(lambda: len(site.steps(4)) >= 2, 60, "round 4 to train")
        site.stop_round(4)
        fourth = site.result(4)
        assert site.store.served.count(first.weights_digest) == served + 1
        assert fourth.status == "ok" and fourth.steps >= 2 and math.isfinite(fourth.loss)
        assert all(math.isfinite(float(s["loss"])) for s in site.steps(4))
        assert fourth.trainer_pid == first.trainer_pid and site.process.poll() is None
        assert fourth.trainer_step == first.trainer_step + fourth.steps       # one process, one step counter
        uploaded = site.store.get(fourth.weights_digest).tensors
        assert all(bool(torch.isfinite(t).all()) for t in uploaded.values())
    finally:
        site.close()
