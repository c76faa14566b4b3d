"""Fault 7: the server dies in the middle of writing a checkpoint. A real process saves global states of tens of
MB (pilot/server/checkpoint.py) and is SIGKILLed while its hidden temporary checkpoint directory exists. The
promise: LATEST still names the previous complete checkpoint, which loads whole (round, tokens, every weight
and the outer-optimizer state); the next save prunes what the dead writer left and keeps at most
KEEP_CHECKPOINTS; a LATEST that is missing or names a checkpoint that is gone falls back to the newest complete
one."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from pilot.server import checkpoint
from pilot.server.checkpoint import KEEP_CHECKPOINTS, GlobalState
from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.fault_harness import wait_for

TOKENS_PER_ROUND = 1_000_000
SHAPE = (1024, 4096)   # 16 MB in fp32; four of them and an outer state: ~80 MB a checkpoint

# the writer: one checkpoint per round, forever, each state a pure function of its round
WRITER = """
import sys, torch
from pilot.server import checkpoint
from tests.test_faults_checkpoint import state_of
run_dir = sys.argv[1]
for number in range(1, 10**6):
    checkpoint.save(run_dir, state_of(number))
    print(number, flush=True)
"""


def state_of(number: int) -> GlobalState:
    g = torch.Generator().manual_seed(number)
    weights = {f"layer{i}.weight": torch.randn(SHAPE, generator=g) for i in range(4)}
    outer = {"layer0.weight.momentum": torch.full(SHAPE, float(number))}
    return GlobalState(weights=weights, round=number, tokens=number * TOKENS_PER_ROUND, outer_state=outer,
                       info={"ledger": {"shard_000.parquet": {"done": number % 2 == 0}}, "writer": "fault-test"})


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def assert_is_round(path: Path, number: int) -> None:
    loaded, expected = checkpoint.load(path), state_of(number)
    assert (loaded.round, loaded.tokens) == (number, number * TOKENS_PER_ROUND)
    assert loaded.weights.keys() == expected.weights.keys()
    for name, tensor in expected.weights.items():
        assert torch.equal(loaded.weights[name], tensor), name
    assert torch.equal(loaded.outer_state["layer0.weight.momentum"], expected.outer_state["layer0.weight.momentum"])
    assert loaded.info == expected.info


def half_written(root: Path, after: int) -> Path | None:
    """A hidden temporary checkpoint directory of a round later than `after` with bytes already in it."""
    for tmp in root.glob(".round_*.tmp-*"):
        try:
            number = int(tmp.name[len(".round_"):].split(".")[0])
            if number > after and any(f.stat().st_size > 0 for f in tmp.iterdir()):
                return tmp
        except (FileNotFoundError, ValueError):
            continue
    return None


def test_a_server_killed_mid_checkpoint_resumes_from_the_previous_complete_one(tmp_path):
    run_dir = tmp_path / "run"
    root = run_dir / "global"
    started = time.monotonic()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=PROJECT_ROOT, env=subprocess_env())
    try:
        wait_for(lambda: writer.poll() is not None or (root / "round_000002" / "state.json").exists(), 60,
                 "two complete checkpoints")
        assert writer.poll() is None, writer.stdout.read()
        caught = wait_for(lambda: half_written(root, after=2), 60, "a checkpoint half written", poll=0.002)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    dying = int(caught.name[len(".round_"):].split(".")[0])
    assert caught.exists(), "killed after the rename: the kill missed the write (rerun)"
    assert not (root / f"round_{dying:06d}").exists()
    assert leftovers(root), "the dead writer left its temporary directory"
    written_mb = sum(f.stat().st_size for f in caught.iterdir()) / 1e6

    # the promise: LATEST is the previous complete checkpoint, whole
    latest = checkpoint.latest(run_dir)
    assert latest == root / f"round_{dying - 1:06d}", (latest, dying)
    assert (root / "LATEST").read_text().strip() == latest.name
    assert_is_round(latest, dying - 1)

    # the resumed server saves again: the dead writer's leftovers are pruned, at most KEEP_CHECKPOINTS are kept
    checkpoint.save(run_dir, state_of(dying))
    assert leftovers(root) == [], leftovers(root)
    complete = sorted(p.name for p in checkpoint.complete(root))
    assert len(complete) <= KEEP_CHECKPOINTS and f"round_{dying:06d}" in complete, complete
    assert sorted(p.name for p in root.iterdir()) == sorted([*complete, "LATEST"])
    assert_is_round(checkpoint.latest(run_dir), dying)

    # LATEST naming a checkpoint that is gone, or missing: the newest complete one
    shutil.rmtree(root / f"round_{dying:06d}")
    assert checkpoint.latest(run_dir) == root / f"round_{dying - 1:06d}"
    assert_is_round(checkpoint.latest(run_dir), dying - 1)
    checkpoint.save(run_dir, state_of(dying + 1))
    (root / "LATEST").unlink()
    assert checkpoint.latest(run_dir) == root / f"round_{dying + 1:06d}"
    assert_is_round(checkpoint.latest(run_dir), dying + 1)
    print(f"killed while writing round {dying} ({written_mb:.0f} MB "
          f"in its temporary directory); resumed from round {dying - 1}; "
          f"{time.monotonic() - started:.1f} s")
