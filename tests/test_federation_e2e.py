"""The curtailment-aware federation end to end: a scripted MOER trace drives three sites through every
regime; real Flower (simulation engine), real Redis, real site trainers, real text."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
import torch

from pilot import protocol
from pilot.coordination import connect, release
from tests.conftest import PROJECT_ROOT, VENV_BIN, subprocess_env
from tests.test_flower_connections import flwr_env_for, stop_local_superlink

pytestmark = pytest.mark.e2e   # real Flower runs: minutes each (quick tier: -m 'not e2e')

# curtailed sites in each 5-minute step of the scripted trace: 0 -> 1 -> 2 -> 3 -> 1 -> 0 -> 2
PHASES = [set(), {"client_0"}, {"client_0", "client_1"}, {"client_0", "client_1", "client_2"}, {"client_1"},
          set(), {"client_0", "client_2"}]
STEP_S = 300
WALL_S_PER_STEP = 10.0      # long enough for a round with a trainer that starts on this small machine
START = datetime(2025, 6, 1, tzinfo=UTC)


def write_scenario(folder) -> None:
    rows = ["timestamp,R0,R1,R2"]
    for i, curtailed in enumerate(PHASES):
        when = (START + timedelta(seconds=STEP_S * i)).isoformat()
        rows.append(",".join([when] + ["50" if f"client_{k}" in curtailed else "500" for k in range(3)]))
    (folder / "trace.csv").write_text("\n".join(rows) + "\n")
    sites = "".join(
        f'\n[[sites]]\nname = "client_{k}"\nregion = "R{k}"\nsignal = "moer"\ngpus = 1\ngpu_train_kw = 0.7\n'
        f'gpu_idle_kw = 0.1\nmoer_trace = "trace.csv"\n' for k in range(3))
    end = (START + timedelta(seconds=STEP_S * len(PHASES))).isoformat()
    (folder / "scenario.toml").write_text(
        f'[scenario]\nstart = "{START.isoformat()}"\nend = "{end}"\nstep_s = {STEP_S}\nthreshold = 100.0\n'
        f"min_on_s = 0\nmin_off_s = 0\n{sites}")


def dedup(items: list) -> list:
    return [x for i, x in enumerate(items) if i == 0 or x != items[i - 1]]


def test_scripted_curtailment_passes_through_every_regime(tmp_path, text_shards, tiny_tokenizer):
    run_dir, run_id = tmp_path / "run", "e2e"
    write_scenario(tmp_path)
    r = connect(run_dir=run_dir)  # the run's embedded Redis: server, sites and energy simulation share it
    flwr_home, env = flwr_env_for(tmp_path)
    run_config = " ".join([
        f'run-id="{run_id}"', f'run-dir="{run_dir}"', f'data-dir="{text_shards}"', f'tokenizer-dir="{tiny_tokenizer}"',
        "token-budget=10000000", "depth=2", "max-seq-len=128", "device-batch-size=4", "total-batch-size=1024",
        "eval-tokens=2048"])
    server = subprocess.Popen([str(VENV_BIN / "flwr"), "run", ".", "local-simulation", "--stream",
                               "--run-config", run_config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, cwd=PROJECT_ROOT)
    energy = None
    try:
        events_key = protocol.server_events_key(run_id)
        deadline = time.monotonic() + 90
        while not any(f["kind"] == "sites" for _, f in r.xrange(events_key)):
            assert time.monotonic() < deadline and server.poll() is None, "the server never saw its sites"
            time.sleep(0.5)
        energy = subprocess.Popen(
            [sys.executable, str(PROJECT_ROOT / "energy_simulation.py"), "--scenario", str(tmp_path / "scenario.toml"),
             "--run-id", run_id, "--run-dir", str(run_dir), "--speedup", str(STEP_S / WALL_S_PER_STEP)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
        output, _ = server.communicate(timeout=170)
        assert server.returncode == 0, output
        assert "finished outcome=energy simulation finished" in output, output
        energy.wait(timeout=30)
    finally:
        for proc in (server, energy):
            if proc is not None and proc.poll() is None:
                proc.kill()
        stop_local_superlink(flwr_home)

    events = [f for _, f in r.xrange(protocol.server_events_key(run_id))]
    release(r, run_dir)
    regimes = dedup([e["regime"] for e in events if e["kind"] == "regime"])
    assert regimes == ["paused", "solo", "federated", "solo", "paused", "federated"], regimes
    starts = [e for e in events if e["kind"] == "round-start"]
    member_sets = dedup([set(e["sites"].split(",")) for e in starts])
    assert member_sets == [p for p in PHASES if p], member_sets

    # data: within a round, sites hold disjoint shards; across rounds, a shard's committed cursor only advances
    for start in starts:
        held = [s for shards in json.loads(start["shards"]).values() for s in shards]
        assert len(held) == len(set(held)), start
    ends = [e for e in events if e["kind"] == "round-end"]
    assert all(e["reason"] for e in ends)
    bpbs = [float(e["val_bpb"]) for e in ends if e["val_bpb"] != "-"]
    assert len(bpbs) >= 3 and bpbs[-1] < bpbs[0], bpbs
    assert (run_dir / "global" / "LATEST").exists()
    # the final model is nanochat's model file, holding the last checkpoint's global weights
    from nanochat.checkpoint import load_model
    from pilot.server import checkpoint as server_checkpoint
    final = load_model(run_dir / "final_model.safetensors").state_dict()
    last = server_checkpoint.load(server_checkpoint.latest(run_dir)).weights
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in last)
    check_run_logs(run_dir, events)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_run_logs(run_dir, stream_events: list[dict]) -> None:
    """RUN_DIR/logs holds what the Redis stream holds, typed, and every step every site took."""
    logs = run_dir / "logs"
    events = read_jsonl(logs / "events.jsonl")
    assert [e["kind"] for e in events] == [e["kind"] for e in stream_events]
    results = [e for e in events if e["kind"] == "site-result" and e["status"] == "ok"]
    steps = read_jsonl(logs / "steps.jsonl")
    for site in {r["site"] for r in results}:
        site_steps = [s for s in steps if s["site"] == site]
        # every step each site reported in its round results is in the log, once, in order
        assert len(site_steps) == sum(r["steps"] for r in results if r["site"] == site), site
        assert [s["step"] for s in site_steps] == sorted({s["step"] for s in site_steps}), site
        assert sum(s["tokens"] for s in site_steps) == sum(r["tokens"] for r in results if r["site"] == site)
    slack = STEP_S / WALL_S_PER_STEP  # one wall second of simulated time: the clock is read every 0.2 s
    for r in results:  # a round's steps happened inside its simulated span, as the energy clock saw it
        inside = [s for s in steps if s["site"] == r["site"] and s["round"] == r["round"]]
        assert all(r["sim_start"] - slack <= s["sim_ts"] <= r["sim_end"] + slack for s in inside), r
    ends = [e for e in events if e["kind"] == "round-end"]
    assert sum(e["tokens"] for e in ends) == ends[-1]["total_tokens"]
    assert all(isinstance(e["sites"], list) for e in ends)
    # the phases are timed where they happen: a site's set-up and upload, the server's aggregation, and its
    # evaluation and checkpoint (off the path), each within the round's own span
    for r in results:   # (sync rounds: the upload is on the path when the site took a step)
        assert 0 <= r["set_up_s"] <= r["seconds_total"], r
        assert (r["upload_s"] is not None) == (r["steps"] > 0) and 0 <= (r["upload_s"] or 0) <= r["seconds_total"], r
    # the global model reached a site that held the last one as a bf16 delta, at half the bytes of the weights
    # (a site that held no recent one fetched them whole; a lone site's own result was adopted: held)
    assert {r["fetch"] for r in results} <= {"held", "delta", "whole"}, results
    whole = [r["fetch_bytes"] for r in results if r["fetch"] == "whole"]
    deltas = [r["fetch_bytes"] for r in results if r["fetch"] == "delta"]
    assert whole and deltas, [(r["round"], r["site"], r["fetch"]) for r in results]
    assert max(deltas) < 0.55 * min(whole), (deltas, whole)
    for e in ends:
        assert e["aggregate_s"] >= 0 and e["checkpoint_s"] > 0 and e["evaluate_s"] >= 0, e
        assert (e["evaluate_s"] > 0) == (e["val_bpb"] is not None), e
    energy = read_jsonl(logs / "energy.jsonl")
    openings = [(e["site"], e["sim_ts"]) for e in energy if e["curtailed"] == 1]
    assert len(openings) == sum(len(p - q) for p, q in zip(PHASES, [set()] + PHASES[:-1], strict=True))
    config = json.loads((logs / "energy_config.json").read_text())
    assert [s["name"] for s in config["sites"]] == ["client_0", "client_1", "client_2"]
    assert config["speedup"] == STEP_S / WALL_S_PER_STEP
    assert config["scenario_path"] == str((run_dir.parent / "scenario.toml").resolve())  # the report reads its MOER


def test_the_run_ends_when_its_data_runs_out(tmp_path, text_shards, tiny_tokenizer):
    """A small corpus: every shard is trained to its end, once, and the run finishes with "data exhausted"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.test_flower_connections import flwr_env_for, stop_local_superlink

    data = tmp_path / "data"
    data.mkdir()
    source = sorted(text_shards.glob("shard_*.parquet"))
    for i in range(5):  # 4 small training shards + validation, real text
        texts = pq.read_table(source[i], columns=["text"]).column("text").to_pylist()[:6]
        pq.write_table(pa.table({"text": [t[:3000] for t in texts]}), data / f"shard_{i:05d}.parquet")
    run_dir, run_id = tmp_path / "run", "data-end"
    flwr_home, env = flwr_env_for(tmp_path)
    run_config = " ".join([
        f'run-id="{run_id}"', f'run-dir="{run_dir}"', f'data-dir="{data}"', f'tokenizer-dir="{tiny_tokenizer}"',
        'curtailment="always"', "round-duration=5", "token-budget=100000000", "depth=2", "max-seq-len=128",
        "device-batch-size=4", "total-batch-size=1024", "eval-tokens=1024"])
    try:
        result = subprocess.run([str(VENV_BIN / "flwr"), "run", ".", "local-simulation", "--stream",
                                 "--run-config", run_config], capture_output=True, text=True, env=env,
                                cwd=PROJECT_ROOT, timeout=240)
    finally:
        stop_local_superlink(flwr_home)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "finished outcome=data exhausted" in output, output
    r = connect(run_dir=run_dir)
    from pilot.server.ledger import Ledger
    records = Ledger(r, run_id).records()
    starts = [f for _, f in r.xrange(protocol.server_events_key(run_id)) if f["kind"] == "round-start"]
    release(r, run_dir)
    assert sorted(records) == [f"shard_{i:05d}.parquet" for i in range(4)] and all(x.done for x in records.values())
    for start in starts:  # never one shard at two sites in a round
        held = [s for shards in json.loads(start["shards"]).values() for s in shards]
        assert len(held) == len(set(held))
    assert (run_dir / "final_model.safetensors").exists()
