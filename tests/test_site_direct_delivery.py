"""A round may reach the trainer twice: straight from the server (Redis) and through the ClientApp's relay
(Flower). The trainer takes it once, whichever copy comes first, and a copy of an older round relayed late is not
trained again. One real trainer process, a real weights server, the one delivery function both paths use."""

from __future__ import annotations

import time

from pilot import protocol, signing
from pilot.site import process
from tests.fault_harness import SITE, SiteHarness, copy_shards, wait_for

RUN = "direct-delivery"


def outbox_rounds(site: SiteHarness) -> list[int]:
    return [int(f["round"]) for _, f in site.r.xrange(protocol.outbox_key(RUN, SITE))]


def test_a_round_delivered_twice_is_trained_once(redis_server, tmp_path, text_shards, tiny_tokenizer):
    shards = copy_shards(text_shards, tmp_path / "data")
    site = SiteHarness(redis_server.url, RUN, tmp_path / "data", tiny_tokenizer, tmp_path / "trainer.log")

    def deliver(number: int, via: str, **fields) -> None:
        request = site.round_request(number, shards, **fields)
        process.deliver(site.r, RUN, SITE, signing.inbox_fields(request.to_json(), "", number), via=via)

    try:
        deliver(1, "server", round_steps=40)                   # the server's direct copy ...
        wait_for(lambda: site.steps(1), 60, "round 1 to start training")
        deliver(1, "clientapp", round_steps=40)                # ... and the ClientApp's relay, while it trains
        first = site.result(1)
        assert (first.status, first.steps, first.extra["via"]) == ("ok", 40, "server"), first
        wait_for(lambda: "this copy skipped" in site.output(), 30, "the second copy to be read and skipped")
        assert outbox_rounds(site) == [1] and len(site.steps(1)) == 40     # one result, 40 steps: once
        # the ClientApp finds a result that is in the outbox already (it relays that, and delivers nothing)
        assert process.handed_in(site.r, RUN, SITE, 1, "srv").steps == 40
        assert process.handed_in(site.r, RUN, SITE, 2, "srv") is None
        deliver(2, "clientapp", digest=first.weights_digest, cursors=first.cursors, round_steps=2)
        second = site.result(2)
        assert (second.status, second.steps, second.extra["via"]) == ("ok", 2, "clientapp")
        deliver(1, "clientapp", round_steps=3)                 # round 1 relayed late, after round 2: not again
        wait_for(lambda: site.output().count("this copy skipped") == 2, 30, "the late copy to be skipped")
        time.sleep(1.0)
        assert outbox_rounds(site) == [1, 2] and len(site.steps(1)) == 40
    finally:
        site.close()
