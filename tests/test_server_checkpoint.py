"""Global checkpoints: complete round trips, and never a half-written one, even under SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import torch

from pilot.server import checkpoint
from pilot.server.checkpoint import GlobalState
from tests.conftest import subprocess_env


def test_round_trip_and_retention(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    for rnd in (1, 2, 3):
        state = GlobalState(weights={"w": torch.full((3, 4), float(rnd)), "b": torch.arange(4.0)},
                            round=rnd, tokens=1000 * rnd, outer_state={"w": torch.ones(3, 4) * rnd},
                            info={"ledger": {"shard_00000.parquet": {"done": rnd > 2}}, "outer": "nesterov"})
        checkpoint.save(tmp_path, state)
    path = checkpoint.latest(tmp_path)
    assert path.name == "round_000003"
    loaded = checkpoint.load(path)
    assert loaded.round == 3 and loaded.tokens == 3000
    assert torch.equal(loaded.weights["w"], torch.full((3, 4), 3.0))
    assert torch.equal(loaded.outer_state["w"], torch.ones(3, 4) * 3)
    assert loaded.info == {"ledger": {"shard_00000.parquet": {"done": True}}, "outer": "nesterov"}
    assert sorted(p.name for p in (tmp_path / "global").iterdir()) == ["LATEST", "round_000002", "round_000003"]


WRITER = textwrap.dedent("""
    import sys, torch
    from pilot.server import checkpoint
    from pilot.server.checkpoint import GlobalState
    rnd = 0
    print("ready", flush=True)
    while True:
        rnd += 1
        checkpoint.save(sys.argv[1], GlobalState(weights={"w": torch.full((512, 1024), float(rnd))},
                                                   round=rnd, tokens=rnd))
""")


def test_sigkill_never_leaves_a_half_checkpoint(tmp_path):
    rng = random.Random(0)
    for attempt in range(4):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                                  text=True, env=subprocess_env())
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.2, 0.8))
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        path = checkpoint.latest(tmp_path)
        if path is None:
            continue
        loaded = checkpoint.load(path)
        assert torch.equal(loaded.weights["w"], torch.full((512, 1024), float(loaded.round))), attempt
        assert loaded.tokens == loaded.round
    assert checkpoint.latest(tmp_path) is not None


def test_saving_the_same_round_again_keeps_both_complete(tmp_path):
    for value in (1.0, 2.0):
        checkpoint.save(tmp_path, GlobalState(weights={"w": torch.full((2,), value)}, round=5))
    loaded = checkpoint.load(checkpoint.latest(tmp_path))
    assert loaded.round == 5 and torch.equal(loaded.weights["w"], torch.full((2,), 2.0))
