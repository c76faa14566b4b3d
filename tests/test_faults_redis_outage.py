"""Fault 2: Redis stops answering mid-round (the redis-server is frozen with SIGSTOP: connections stay open, no
reply comes, as in a network partition). No answer is no fresh signal: the site stops within one optimizer step
of the bound, waits for Redis, and then hands in its result; every step it took is in its metrics stream and
counted in the result (no work lost)."""

from __future__ import annotations

import time

from pilot.site.watchers import READ_TIMEOUT_S, SIGNAL_FRESH_S, STOP_POLL_S
from tests.fault_harness import PrivateRedis, SiteHarness, copy_shards, wait_for

RUN = "fault-redis-outage"
SLACK_S = 0.5


def test_a_frozen_redis_stops_the_site_within_the_bound_and_its_result_arrives_after(tmp_path, text_shards,
                                                                                     tiny_tokenizer):
    shards = copy_shards(text_shards, tmp_path / "data")
    redis_server = PrivateRedis(tmp_path)
    site = None
    try:
        site = SiteHarness(redis_server.url, RUN, tmp_path / "data", tiny_tokenizer, tmp_path / "trainer.log")
        site.request(1, shards)
        wait_for(lambda: len(site.steps(1)) >= 3, 60, "the site to train")

        frozen_at = time.time()
        redis_server.freeze()
        time.sleep(SIGNAL_FRESH_S + READ_TIMEOUT_S + 4.0)   # well past the bound: the site has stopped by now
        redis_server.thaw()
        thawed_at = time.time()

        result = site.result(1, timeout=60)
        steps = site.steps(1)
        last_step = max(float(s["wall_ts"]) for s in steps)
        step_s = max(float(s["seconds"]) for s in steps)
        assert result.status == "ok" and result.reason.startswith("Redis unreachable"), result.reason
        # the promise: stopped within one step of the bound (a read that gets no answer fails after READ_TIMEOUT_S)
        assert last_step <= frozen_at + SIGNAL_FRESH_S + READ_TIMEOUT_S + step_s + STOP_POLL_S + SLACK_S, \
            (last_step - frozen_at, step_s)
        assert last_step < thawed_at
        # nothing lost: every step is in the metrics stream, and the result counts exactly those
        assert [int(s["step"]) for s in steps] == list(range(1, len(steps) + 1))
        assert result.steps == len(steps) and result.tokens == len(steps) * site.tokens_per_step
        assert site.store.get(result.weights_digest) is not None, "its weights were uploaded"
        assert site.process.poll() is None

        # and the site goes on: the next round trains
        site.request(2, shards, digest=result.weights_digest, cursors=result.cursors)
        wait_for(lambda: len(site.steps(2)) >= 2, 60, "the next round to train")
        site.stop_round(2)
        assert site.result(2).status == "ok"
        print(f"Redis frozen: last step ended {last_step - frozen_at:.2f} s after the freeze (bound "
              f"{SIGNAL_FRESH_S} s + read timeout {READ_TIMEOUT_S} s; one step {step_s:.3f} s); result handed in "
              f"after the thaw")
    finally:
        if site is not None:
            site.close()
        redis_server.close()
