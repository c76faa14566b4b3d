"""Fault 4: one rank of a multi-rank site cannot do its part of a round. The ranks agree (one all-reduce of a flag
after each fallible part: fetch, data set-up, every step's data, upload) and fail the round together, with the
same reason; none is left in a collective the other skipped, and the next round trains on both."""

from __future__ import annotations

import dataclasses

import pyarrow.parquet as pq

from tests.fault_harness import CONFIG, SiteHarness, copy_shards, nan_weights, wait_for

RUN = "fault-ranks"


def tear_row_group(path, group: int) -> None:
    """Overwrite one row group's column data in place (the footer stays valid): it no longer decodes."""
    column = pq.ParquetFile(path).metadata.row_group(group).column(0)
    first = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    data = bytearray(path.read_bytes())
    data[first:first + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(data))


def test_two_ranks_fail_a_round_together_and_train_the_next(redis_client, redis_server, tmp_path, text_shards,
                                                            tiny_tokenizer):
    data = tmp_path / "data"
    shards = copy_shards(text_shards, data)
    torn = data / "shard_torn.parquet"          # small row groups: the bad one comes after a few steps
    pq.write_table(pq.read_table(data / shards[0]).slice(0, 64), torn, row_group_size=8)
    tear_row_group(torn, 3)
    config = dataclasses.replace(CONFIG, total_batch_size=256)
    site = SiteHarness(redis_server.url, RUN, data, tiny_tokenizer, tmp_path / "trainer.log", nproc=2,
                       config=config)
    try:
        # rank 0 alone fetches: it refuses weights holding a NaN, and rank 1 learns it instead of waiting for them
        site.request(1, shards, digest=site.store.publish(nan_weights(site.initial, "transformer.wte.weight")))
        refused = site.result(1)
        assert refused.status == "error" and refused.reason.startswith("rank 0: fetching the global weights")

        # both ranks read the torn shard; whichever hits the bad row group first, they leave the step together
        site.request(2, [torn.name])
        failed = site.result(2)
        assert failed.status == "error" and failed.extra["shard"] == torn.name
        assert "reading the round's shards: shard_torn.parquet: unreadable at its row group 3" in failed.reason
        assert failed.steps == 0 and len(site.steps(2)) >= 1, "steps were taken before the bad row group"
        wait_for(lambda: site.output().count(f"round 2 failed: {failed.reason}") == 2, 10,
                 "both ranks to report the same error")

        site.request(3, shards)
        wait_for(lambda: len(site.steps(3)) >= 2, 60, "round 3 to train")
        site.stop_round(3)
        ok = site.result(3)
        assert ok.status == "ok" and ok.world_size == 2 and [c["rank"] for c in ok.cursors] == [0, 1]
        assert ok.trainer_pid == refused.trainer_pid == failed.trainer_pid
    finally:
        site.close()
