"""The global model reaches a site that holds the last one as a bf16 delta (half the bytes), and the site then
holds the server's view bit for bit; a site without that base fetches the weights whole. One real trainer
process, a real weights server whose access log says what was fetched, the server's own Publisher."""

from __future__ import annotations

import torch

from pilot.dataplane import payload
from pilot.server.publish import Publisher
from tests.fault_harness import SiteHarness, copy_shards

RUN = "global-delta"


def test_a_site_fetches_the_next_global_model_as_a_delta_and_holds_it_exactly(redis_server, tmp_path, text_shards,
                                                                              tiny_tokenizer):
    shards = copy_shards(text_shards, tmp_path / "data")
    site = SiteHarness(redis_server.url, RUN, tmp_path / "data", tiny_tokenizer, tmp_path / "trainer.log")
    publisher = Publisher(site.store)
    try:
        masters = dict(site.initial)
        sent = publisher.publish(masters)
        site.request(1, shards, digest=sent.digest, round_steps=2, update_payload="delta-bf16")
        first = site.result(1)
        assert (first.status, first.steps) == ("ok", 2), first
        # the server's outer step: masters minus the site's pseudo-gradient, and a move of "another site"
        kind, update = payload.read_update(site.store.get(first.weights_digest))
        g = torch.Generator().manual_seed(7)
        masters = {k: w - payload.as_delta(update, masters, kind)[k] - 1e-3 * torch.randn(w.shape, generator=g)
                   for k, w in masters.items()}
        second_sent = publisher.publish(masters)
        assert second_sent.delta_base == sent.digest
        site.store.served.clear()
        site.request(2, shards, digest=second_sent.digest, cursors=first.cursors, round_steps=2,
                     update_payload="delta-bf16", delta_digest=second_sent.delta_digest,
                     delta_base=second_sent.delta_base)
        second = site.result(2)
        assert (second.status, second.steps) == ("ok", 2), (second, site.output())
        # the site fetched the delta only; the whole weights were never asked for: the weights it made from the
        # delta hashed to the view's digest (else it says so and fetches them whole)
        assert second_sent.delta_digest in site.store.served and second_sent.digest not in site.store.served, \
            site.output()
        assert "did not apply" not in site.output()
        # and it handed in a bf16 pseudo-gradient, its start weights kept for the next delta
        kind, update = payload.read_update(site.store.get(second.weights_digest))
        assert kind == "delta-bf16"
        # a request whose delta is to weights this site does not hold: fetched whole
        third_sent = publisher.publish({k: w + 1e-3 for k, w in masters.items()})
        site.store.served.clear()
        site.request(3, shards, digest=third_sent.digest, cursors=second.cursors, round_steps=1,
                     update_payload="delta-bf16", delta_digest=third_sent.delta_digest, delta_base="0" * 64)
        third = site.result(3)
        assert third.status == "ok" and third_sent.digest in site.store.served
        assert third_sent.delta_digest not in site.store.served
    finally:
        site.close()
