"""Regime policy (pure) and the data ledger (real Redis)."""

from __future__ import annotations

from pilot.server.ledger import Ledger
from pilot.server.policy import FEDERATED, PAUSED, SOLO, Round, end_reason, members, regime


def test_regime_by_number_of_training_sites():
    assert regime(frozenset()) == PAUSED
    assert regime({"client_0"}) == SOLO
    assert regime({"client_0", "client_2"}) == FEDERATED
    assert members({"client_0", "client_1"}, {"client_1", "client_2"}) == {"client_1"}


def test_round_ends_on_membership_change_or_duration():
    fed = Round(3, frozenset({"a", "b"}), started_at=1000.0, duration=600.0)
    assert fed.deadline == 1600.0
    assert end_reason(fed, 1599.0, {"a", "b"}) is None
    assert end_reason(fed, 1600.0, {"a", "b"}) == "round duration reached"
    assert end_reason(fed, 1100.0, {"a"}) == "window closed: b"
    assert end_reason(fed, 1100.0, {"a", "b", "c"}) == "window opened: c"
    assert end_reason(fed, 1100.0, {"c"}) == "window closed: a, b"

    solo = Round(4, frozenset({"a"}), started_at=1000.0, duration=600.0)
    assert solo.deadline is None
    assert end_reason(solo, 10**9, {"a"}) is None, "a lone site trains on with no round trip"
    assert end_reason(solo, 1001.0, {"a", "b"}) == "window opened: b"
    assert end_reason(solo, 1001.0, set()) == "window closed: a"


SHARDS = [f"shard_{i:05d}.parquet" for i in range(5)]


def test_sites_get_disjoint_shards_and_keep_them(redis_client):
    ledger = Ledger(redis_client, "run-a")
    ledger.init(SHARDS)
    a = ledger.assign("client_0", world_size=1)
    b = ledger.assign("client_1", world_size=1)
    assert a.shards == SHARDS[:2] and b.shards == SHARDS[2:4]
    assert a.cursors is None
    assert ledger.assign("client_0", world_size=1).shards == a.shards  # the same shards next round
    ledger.init(SHARDS)  # a resumed server registers again: nothing is reset
    assert ledger.records()[SHARDS[0]].owner == "client_0"
    assert Ledger(redis_client, "run-b").records() == {}, "ledgers are per run"


def test_commit_release_and_take_over(redis_client):
    ledger = Ledger(redis_client, "run")
    ledger.init(SHARDS)
    a = ledger.assign("client_0", world_size=2)
    # client_0 finished its first shard and is in the middle of the second
    cursors = [{"file": SHARDS[1], "row": 40, "offset": 7}, {"file": SHARDS[1], "row": 41, "offset": 0}]
    ledger.commit("client_0", a.shards, cursors, world_size=2)
    records = ledger.records()
    assert records[SHARDS[0]].done and not records[SHARDS[1]].done
    assert records[SHARDS[1]].cursors == cursors

    # client_0 dies: its unfinished shard is free again, and picked up first, from the committed cursors
    assert ledger.release("client_0") == [SHARDS[1]]
    same_size = ledger.assign("client_1", world_size=2)
    assert same_size.shards == [SHARDS[1], SHARDS[2]]
    assert same_size.cursors == cursors
    ledger.release("client_1")
    # a site with another world size starts after the furthest row: skips rather than trains rows twice
    other = ledger.assign("client_2", world_size=1)
    assert other.shards[0] == SHARDS[1]
    assert other.cursors == [{"file": SHARDS[1], "row": 41, "offset": 0}]


def test_ledger_is_exhausted_when_every_shard_is_done(redis_client):
    ledger = Ledger(redis_client, "run")
    ledger.init(SHARDS[:2])
    assert not ledger.exhausted()
    a = ledger.assign("client_0", world_size=1)
    ledger.finish(a.shards)
    assert ledger.exhausted()
    assert ledger.assign("client_0", world_size=1).shards == []


def test_a_shard_a_site_cannot_read_goes_to_the_back_of_that_sites_queue(redis_client):
    ledger = Ledger(redis_client, "run-unreadable")
    shards = [f"shard_{i:05d}.parquet" for i in range(5)]
    ledger.init(shards)
    assert ledger.assign("a", world_size=1).shards == shards[:2]
    # a's round failed on shard 1 (the server's path for a failed result naming a file)
    ledger.mark_unreadable(shards[1], "a")
    ledger.release("a")
    assert ledger.assign("a", world_size=1).shards == [shards[0], shards[2]], "a trains other shards first"
    assert ledger.reserve_spares("a", [shards[0], shards[2]]) == [shards[3], shards[4]], "nor is it a's spare"
    assert ledger.assign("b", world_size=1).shards == [shards[1]], "another site takes it as usual"
    ledger.release("b")
    ledger.finish([shards[0], shards[2], shards[3], shards[4]])
    ledger.release("a")
    assert ledger.assign("a", world_size=1).shards == [shards[1]], "retried when nothing else is left"
    ledger.commit("a", [shards[1]], [{"file": shards[1], "row": 3, "offset": 0}], world_size=1)
    assert ledger.records()[shards[1]].unreadable_at == [], "read after all: the mark is gone"
    assert not ledger.exhausted()
