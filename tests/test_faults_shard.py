"""Fault 6: a shard of the round is missing at the site. The loader says which file and why, the site reports the
round as an error naming it (not "exhausted" with 0 steps), and the server's path for a failed site releases its
shards undone: a shard is done only when its rows were trained."""

from __future__ import annotations

from pilot.server.ledger import Ledger
from tests.fault_harness import SITE, SiteHarness, copy_shards, wait_for

RUN = "fault-shard"


def test_a_missing_shard_is_an_error_naming_it_and_the_shard_stays_undone(redis_client, redis_server, tmp_path,
                                                                         text_shards, tiny_tokenizer):
    shards = copy_shards(text_shards, tmp_path / "data")
    ledger = Ledger(redis_client, RUN)
    ledger.init(shards)
    assignment = ledger.assign(SITE, world_size=1)
    assert assignment.shards == shards
    site = SiteHarness(redis_server.url, RUN, tmp_path / "data", tiny_tokenizer, tmp_path / "trainer.log")
    try:
        (tmp_path / "data" / shards[1]).unlink()          # deleted before the round
        site.request(1, assignment.shards)
        result = site.result(1)
        assert result.status == "error" and result.steps == 0 and not result.exhausted
        assert f"{shards[1]}: missing" in result.reason and result.extra["shard"] == shards[1], result.reason
        assert site.steps(1) == []                        # not one step on the round's data

        # what GlobalModel.aggregate does with a result that is not ok: mark the file it names, release, never finish
        ledger.mark_unreadable(result.extra["shard"], SITE)
        assert ledger.release(SITE) == sorted(shards)
        records = ledger.records()
        assert records[shards[1]].unreadable_at == [SITE] and records[shards[0]].unreadable_at == []
        assert not any(r.done for r in records.values()) and all(r.owner is None for r in records.values())
        assert not ledger.exhausted()

        # the same process trains the next round once the file is back
        (tmp_path / "data" / shards[1]).write_bytes((text_shards / shards[1]).read_bytes())
        site.request(2, ledger.assign(SITE, world_size=1).shards)
        wait_for(lambda: len(site.steps(2)) >= 1, 60, "round 2 to train")
        site.stop_round(2)
        second = site.result(2)
        assert second.status == "ok" and second.steps >= 1 and second.trainer_pid == result.trainer_pid
    finally:
        site.close()
