"""The simulation publishing to a real Redis, and the consumer API the federated server uses."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest

from pilot.energy import sites
from pilot.energy.events import EnergyEvents
from pilot.energy.publisher import RunMismatch
from pilot.energy.simulation import Simulation

T0 = datetime(2025, 3, 1, tzinfo=UTC).timestamp()

# two MOER sites over two hours at 5-minute steps; below 100 is curtailed:
#   a: 00:10-00:30 and 00:50-01:10      b: 00:20 to the end
# so five transitions: a opens 00:10, b opens 00:20, a closes 00:30, a opens 00:50, a closes 01:10
A_LOW = {2, 3, 4, 5, 10, 11, 12, 13}
B_LOW = set(range(4, 24))
EXPECTED = [("a", True, 10), ("b", True, 20), ("a", False, 30), ("a", True, 50), ("a", False, 70)]


@pytest.fixture
def moer_scenario(tmp_path) -> sites.Scenario:
    rows = ["timestamp,CAISO_NORTH,SPP_TX"]
    for i in range(24):
        when = datetime.fromtimestamp(T0 + i * 300, tz=UTC).isoformat()
        rows.append(f"{when},{60 if i in A_LOW else 400},{80 if i in B_LOW else 250}")
    (tmp_path / "moer.csv").write_text("\n".join(rows) + "\n")
    site = 'signal = "moer"\ngpus = 2\ngpu_train_kw = 0.7\ngpu_idle_kw = 0.1\nmoer_trace = "moer.csv"\n'
    (tmp_path / "scenario.toml").write_text(f"""
[scenario]
start = "2025-03-01T00:00:00Z"
end = "2025-03-01T02:00:00Z"
step_s = 300
threshold = 100

[[sites]]
name = "a"
region = "CAISO_NORTH"
{site}
[[sites]]
name = "b"
region = "SPP_TX"
{site}""")
    return sites.load_scenario(tmp_path / "scenario.toml")


def as_tuples(events):
    return [(e.site, e.curtailed, round((e.sim_ts - T0) / 60)) for e in events]


def quiet(_text: str) -> None:
    pass


def test_a_late_consumer_receives_all_five_transitions_in_order_once(redis_client, moer_scenario):
    summary = Simulation(moer_scenario, redis_client, "late", speedup=0, log=quiet).run()
    assert summary.status == "finished" and summary.last_step == 23 and summary.transitions == 5

    consumer = EnergyEvents(redis_client, "late", consumer="server")
    events = consumer.read(block_ms=100)
    assert as_tuples(events) == EXPECTED
    assert [e.id for e in events] == sorted((e.id for e in events), key=lambda i: tuple(map(int, i.split("-"))))
    consumer.commit(events[-1].id)
    assert consumer.read(block_ms=50) == []
    # a restarted consumer with the same name goes on after its cursor; another one starts from the beginning
    assert EnergyEvents(redis_client, "late", consumer="server").read(block_ms=50) == []
    assert as_tuples(EnergyEvents(redis_client, "late", consumer="report").read()) == EXPECTED
    # follow() commits each event once the caller comes back for the next one
    follower = EnergyEvents(redis_client, "late", consumer="follower")
    stream = follower.follow(block_ms=50)
    assert as_tuples([next(stream), next(stream)]) == EXPECTED[:2]
    assert follower.cursor() == events[0].id
    stream.close()
    assert as_tuples(EnergyEvents(redis_client, "late", consumer="follower").read()) == EXPECTED[1:]
    # a consumer that handled only the first two sees the remaining three
    partial = EnergyEvents(redis_client, "late", consumer="slow")
    partial.commit(events[1].id)
    assert as_tuples(partial.read()) == EXPECTED[2:]

    states = consumer.current_states()
    assert set(states) == {"a", "b"}
    assert not states["a"].curtailed and states["b"].curtailed
    assert states["b"].since == T0 + 20 * 60 and states["b"].power_kw == pytest.approx(1.4)
    assert states["a"].power_kw == pytest.approx(0.2) and states["a"].value == 400.0
    assert consumer.curtailed_sites() == []  # a finished simulation is no live signal: nobody may train
    assert consumer.staleness().startswith("energy simulation finished")
    clock = consumer.clock()
    assert clock.status == "finished" and clock.step == 23 and clock.sim_ts == T0 + 23 * 300
    assert clock.now() == clock.sim_ts  # a finished run's clock stands still


def test_a_blocked_consumer_wakes_for_each_transition_at_high_speedup(redis_client, moer_scenario):
    received, errors = [], []
    consumer = EnergyEvents(redis_client, "live", consumer="server")   # redis-py clients are thread-safe

    def follow():
        try:
            while len(received) < len(EXPECTED):
                batch = consumer.read(block_ms=10_000)
                if not batch:
                    errors.append("read timed out")
                    return
                received.extend(batch)
                consumer.commit(batch[-1].id)
        except Exception as error:  # noqa: BLE001 - reported to the test below
            errors.append(repr(error))

    reader = threading.Thread(target=follow)
    reader.start()
    # two simulated hours in about a second: 7200 simulated seconds per wall second
    Simulation(moer_scenario, redis_client, "live", speedup=7200, log=quiet).run()
    reader.join(timeout=20)
    assert not errors
    assert as_tuples(received) == EXPECTED


def test_stop_and_resume_continue_the_same_run(redis_client, moer_scenario):
    first = Simulation(moer_scenario, redis_client, "resume", speedup=0, log=quiet).run(until_step=9)
    assert first.status == "stopped" and first.last_step == 8
    consumer = EnergyEvents(redis_client, "resume")
    assert consumer.clock().step == 8 and consumer.clock().status == "stopped"
    # the hysteresis state and clock come back from Redis: the rest of the run, nothing twice
    second = Simulation(moer_scenario, redis_client, "resume", speedup=0, log=quiet).run()
    assert second.first_step == 9 and second.status == "finished"
    assert as_tuples(consumer.history()) == EXPECTED
    third = Simulation(moer_scenario, redis_client, "resume", speedup=0, log=quiet).run()
    assert third.status == "nothing-to-do" and as_tuples(consumer.history()) == EXPECTED


def test_a_stop_request_ends_on_a_whole_step(redis_client, moer_scenario):
    stop = threading.Event()
    sim = Simulation(moer_scenario, redis_client, "stop", speedup=0, stop=stop, log=quiet)
    original = sim.publisher.stage_step

    def stage_then_stop(step, *args, **kwargs):
        original(step, *args, **kwargs)
        if step == 11:
            stop.set()

    sim.publisher.stage_step = stage_then_stop
    summary = sim.run()
    assert summary.status == "stopped" and summary.last_step == 11
    consumer = EnergyEvents(redis_client, "stop")
    assert consumer.clock().step == 11 and consumer.clock().status == "stopped"
    assert all(state.step == 11 for state in consumer.current_states().values())
    assert as_tuples(consumer.history()) == EXPECTED[:4]


def test_a_run_id_belongs_to_one_scenario(redis_client, moer_scenario, tmp_path):
    Simulation(moer_scenario, redis_client, "owned", speedup=0, log=quiet).run(until_step=2)
    changed = tmp_path / "scenario.toml"
    changed.write_text(changed.read_text().replace("threshold = 100", "threshold = 90"))
    with pytest.raises(RunMismatch, match="different scenario"):
        Simulation(sites.load_scenario(changed), redis_client, "owned", speedup=0, log=quiet).run()
    # a change only in a site's options (its own threshold) counts too
    changed.write_text(changed.read_text().replace("threshold = 90", "threshold = 100").replace(
        'moer_trace = "moer.csv"\n', 'moer_trace = "moer.csv"\nthreshold = 120\n', 1))
    with pytest.raises(RunMismatch, match="different scenario"):
        Simulation(sites.load_scenario(changed), redis_client, "owned", speedup=0, log=quiet).run()
    # the same scenario again is the same run
    assert Simulation(moer_scenario, redis_client, "owned", speedup=0, log=quiet).run().first_step == 2
