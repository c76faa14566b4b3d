"""The run's record on disk: the wall -> simulated timeline, step metrics drained from Redis, wandb offline."""

from __future__ import annotations

import json

from pilot import protocol
from pilot.server.runlog import RunLog, SimTimeline, metrics_cursors_key


def test_a_moment_belongs_to_the_step_that_was_current_then():
    timeline = SimTimeline()
    assert timeline.at(100.0) is None
    timeline.add(wall_ts=100.0, sim_ts=0.0, speedup=60.0, step_s=300)     # step 0 published at wall 100
    timeline.add(wall_ts=105.5, sim_ts=300.0, speedup=60.0, step_s=300)   # step 1, half a second late
    assert timeline.at(101.0) == 60.0                  # advanced from step 0 at the speed-up
    assert timeline.at(105.2) == 300.0                 # capped at step 0's end while step 1 was late
    assert timeline.at(106.5) == 360.0                 # from step 1 once it is there
    assert timeline.at(99.0) == -60.0                  # before the first anchor: extrapolated back
    timeline.add(wall_ts=200.0, sim_ts=600.0, speedup=0.0, step_s=300)    # finished: time stands still
    assert timeline.at(250.0) == 600.0


def test_steps_are_drained_once_in_order_with_their_simulated_time(tmp_path, redis_client):
    run = "runlog"
    for step in (1, 2, 3):
        redis_client.xadd(protocol.metrics_key(run, "client_0"),
                          {"round": "1", "step": str(step), "loss": f"{9 - step}.5", "tokens": "1024",
                           "seconds": "0.5", "wall_ts": f"{1000 + step}.000"})
    log = RunLog(tmp_path, run, redis_client, sim_time=lambda wall: wall * 10)
    assert log.drain_steps(["client_0", "client_1"]) == 3
    assert log.drain_steps(["client_0"]) == 0            # nothing twice
    redis_client.xadd(protocol.metrics_key(run, "client_0"),
                      {"round": "2", "step": "4", "loss": "4.25", "tokens": "1024", "seconds": "0.5",
                       "wall_ts": "1004.000"})
    log.close()
    again = RunLog(tmp_path, run, redis_client, sim_time=lambda wall: wall * 10)  # a restarted server goes on
    assert again.drain_steps(["client_0"]) == 1
    again.close()
    steps = [json.loads(line) for line in (tmp_path / "logs" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert steps[0] == {"site": "client_0", "round": 1, "step": 1, "loss": 8.5, "tokens": 1024, "seconds": 0.5,
                        "wall_ts": 1001.0, "sim_ts": 10010.0}
    assert redis_client.hget(metrics_cursors_key(run), "client_1") is None


def test_events_are_typed_json_and_nan_becomes_null(tmp_path, redis_client):
    log = RunLog(tmp_path, "typed", redis_client, sim_time=lambda wall: None)
    log.event("round-end", 5.0, None, {"sites": ["a", "b"], "loss": {"a": float("nan")}, "val_bpb": 2.5})
    log.energy("a", True, 123.0, 42.0)
    log.close()
    (event,) = [json.loads(line) for line in (tmp_path / "logs" / "events.jsonl").read_text().splitlines()]
    assert event == {"kind": "round-end", "wall_ts": 5.0, "sim_ts": None, "sites": ["a", "b"], "loss": {"a": None},
                     "val_bpb": 2.5}
    assert json.loads((tmp_path / "logs" / "energy.jsonl").read_text()) == {"site": "a", "curtailed": 1,
                                                                           "sim_ts": 123.0, "value": 42.0}


def test_wandb_offline_gets_the_figures(tmp_path, redis_client, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = "wandb-offline"
    redis_client.xadd(protocol.metrics_key(run, "client_0"),
                      {"round": "1", "step": "1", "loss": "7.5", "tokens": "1024", "seconds": "0.5",
                       "wall_ts": "1001.000"})
    log = RunLog(tmp_path, run, redis_client, sim_time=lambda wall: wall, wandb_mode="offline")
    assert log.wandb is not None
    log.drain_steps(["client_0"])
    log.event("round-end", 1002.0, 1002.0, {"round": 1, "total_tokens": 1024, "val_bpb": 3.0})
    log.close()
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb")), "wandb wrote no offline run"


def test_a_superseded_server_records_nothing_and_writes_no_checkpoint(tmp_path, redis_client):
    """Two incarnations of one run's server: once the second claims the run, the first's events, heartbeat and
    checkpoint never land (a ServerApp that outlives its SuperLink finishing its close())."""
    from pilot.server.incarnation import Incarnation
    from pilot.server.runlog import ServerEvents
    from pilot.server.training import AfterRound

    run = "superseded"
    first = Incarnation(redis_client, run)
    first_log = RunLog(tmp_path, run, redis_client, sim_time=lambda wall: None)
    first_events = ServerEvents(redis_client, run, first_log, lambda wall: None, first)
    first_events("round-end", round=3)
    assert redis_client.get(protocol.server_alive_key(run)) == first.id

    second = Incarnation(redis_client, run)
    assert (first.current(), second.current()) == (False, True)
    first_events("round-end", round=4)          # the old server's late after-round worker
    ServerEvents(redis_client, run, first_log, lambda wall: None, second)("resume", detail="round 3")
    stream = [fields for _, fields in redis_client.xrange(protocol.server_events_key(run))]
    assert [(e["kind"], e["server"]) for e in stream] == [("round-end", first.id), ("resume", second.id)]
    first_log.close()
    on_disk = [json.loads(line) for line in (tmp_path / "logs" / "events.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["server"]) for e in on_disk] == [("round-end", first.id), ("resume", second.id)]

    saved = []

    class Model:   # the worker's collaborator: evaluation and the checkpoint writer
        def evaluate(self, weights):
            return 1.5

        def save(self, state, val_bpb):
            saved.append(state.round)
            return tmp_path / f"round_{state.round}"

    class State:
        round, weights = 4, {}

    worker = AfterRound(Model(), on_done=lambda *a: None, on_error=lambda *a: None, still_current=first.current)
    worker.submit(State(), evaluate=True)
    worker.drain()
    assert saved == []
    worker = AfterRound(Model(), lambda *a: None, lambda *a: None, still_current=second.current)
    worker.submit(State(), evaluate=True)
    worker.drain()
    assert saved == [4]
    redis_client.set(protocol.server_alive_key(run), second.id)
    first.end()                                  # the old server's close() leaves the new heartbeat alone
    assert redis_client.get(protocol.server_alive_key(run)) == second.id
    second.end()
    assert redis_client.get(protocol.server_alive_key(run)) is None
