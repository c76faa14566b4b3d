"""round-steps (DiLoCo's H): a site hands in after exactly that many optimizer steps, and the next round's H
counts from there; the trainer stays up between rounds (one real trainer process, a real weights server)."""

from __future__ import annotations

from tests.fault_harness import SiteHarness, copy_shards

RUN = "round-steps"


def test_a_site_hands_in_after_round_steps_steps(redis_server, tmp_path, text_shards, tiny_tokenizer):
    shards = copy_shards(text_shards, tmp_path / "data")
    site = SiteHarness(redis_server.url, RUN, tmp_path / "data", tiny_tokenizer, tmp_path / "trainer.log")
    try:
        site.request(1, shards, round_steps=3)
        first = site.result(1)
        assert (first.status, first.reason, first.steps) == ("ok", "round steps", 3), first
        assert [int(s["step"]) for s in site.steps(1)] == [1, 2, 3]            # no stop key was ever set
        assert first.tokens == 3 * site.tokens_per_step
        site.request(2, shards, digest=first.weights_digest, cursors=first.cursors, round_steps=2)
        second = site.result(2)
        assert (second.reason, second.steps) == ("round steps", 2) and len(site.steps(2)) == 2
        assert second.trainer_pid == first.trainer_pid
    finally:
        site.close()
