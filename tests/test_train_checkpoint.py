"""Checkpoints: safetensors + JSON round trips, pruning, atomicity under a failing write and under SIGKILL of a
real process that saves in a loop, and single-file model export."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanochat import checkpoint as ckpt
from nanochat.gpt import GPTConfig, build_model
from tests.conftest import PROJECT_ROOT, subprocess_env

SAVER = """
import sys, torch
from nanochat.checkpoint import find_last_checkpoint, load_checkpoint, save_checkpoint
d = sys.argv[1]
last = find_last_checkpoint(d)
step = 0 if last is None else load_checkpoint(last)[2]["step"]
print("ready", flush=True)
while True:
    step += 1
    w = torch.full((512, 1024), float(step))           # 2 MB per file: a save takes a few milliseconds
    save_checkpoint(d, step, {"w": w}, {"muon/w.momentum_buffer": 2 * w}, {"tag": step}, keep=3)
"""


def test_round_trip_listing_and_pruning(tmp_path):
    model_state = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    optim_state = {"adamw/a.step": torch.tensor(3.0), "adamw/a.exp_avg": torch.zeros(2, 3)}
    for step in (5, 10, 15):
        path = ckpt.save_checkpoint(tmp_path, step, model_state, optim_state, {"tokens": step * 100}, keep=2)
        assert path.name == f"step_{step:06d}"
    assert ckpt.list_checkpoints(tmp_path) == [10, 15]                  # keep=2 pruned step 5
    assert ckpt.find_last_checkpoint(tmp_path) == tmp_path / "step_000015"
    m, o, meta = ckpt.load_checkpoint(tmp_path / "step_000015")
    assert all(torch.equal(m[k], model_state[k]) and m[k].dtype == model_state[k].dtype for k in model_state)
    assert o.keys() == optim_state.keys() and o["adamw/a.step"].shape == ()
    assert meta["step"] == 15 and meta["tokens"] == 1500 and meta["format"] == ckpt.FORMAT
    # the same step saved again replaces the old one whole
    ckpt.save_checkpoint(tmp_path, 15, {"a": torch.zeros(1)}, None, {"tokens": 0})
    m, o, meta = ckpt.load_checkpoint(tmp_path / "step_000015")
    assert list(m) == ["a"] and o == {} and meta["tokens"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000010", "step_000015"]   # no leftovers
    assert oct(os.stat(tmp_path / "step_000015").st_mode & 0o077) != "0o0"               # not private to us


def test_non_checkpoints_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        ckpt.load_checkpoint(tmp_path)
    (tmp_path / "step_000001").mkdir()                                  # a directory without meta.json
    assert ckpt.list_checkpoints(tmp_path) == [] and ckpt.find_last_checkpoint(tmp_path) is None
    (tmp_path / "step_000001" / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="format 'something-else'"):
        ckpt.load_checkpoint(tmp_path / "step_000001")
    assert ckpt.list_checkpoints(tmp_path / "missing") == []


def test_a_failing_write_leaves_the_previous_checkpoint_alone(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {}, {})
    real_save = ckpt.save_file
    calls = []

    def failing_save(tensors, path, **kw):
        calls.append(path)
        if len(calls) == 2:   # the model file is written, then the optimizer file fails (disk full, ...)
            raise OSError("No space left on device")
        return real_save(tensors, path, **kw)

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(3)}, {"x": torch.zeros(1)}, {})
    assert ckpt.list_checkpoints(tmp_path) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]   # the temporary was removed
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "step_000001")[0]["w"], torch.ones(3))


def test_sigkill_during_saves_never_leaves_a_half_written_checkpoint(tmp_path):
    """A real process saves checkpoints back to back and is SIGKILLed at random moments, three times; every
    checkpoint that is listed afterwards loads whole and is internally consistent."""
    rng = random.Random(7)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], cwd=PROJECT_ROOT,
                                env=subprocess_env(), stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        before = ckpt.list_checkpoints(tmp_path)[-1:] or [0]
        deadline = time.monotonic() + 30
        while (ckpt.list_checkpoints(tmp_path)[-1:] or [0])[0] < before[0] + 3:   # a few saves in
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))   # somewhere inside a later save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        steps = ckpt.list_checkpoints(tmp_path)
        assert steps and steps == list(range(steps[0], steps[0] + len(steps)))
        for step in steps:
            m, o, meta = ckpt.load_checkpoint(tmp_path / ckpt.step_dir_name(step))
            assert meta["tag"] == step
            assert torch.all(m["w"] == step) and torch.all(o["muon/w.momentum_buffer"] == 2 * step)
    # a later save clears whatever temporary the killed writer left behind
    ckpt.save_checkpoint(tmp_path, 10 ** 6, {"w": torch.zeros(1)}, None, {})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_model_file_and_checkpoint_dir_load_as_models(tmp_path):
    config = GPTConfig(sequence_len=16, vocab_size=50, n_layer=1, n_head=1, n_kv_head=1, n_embd=32)
    model = build_model(config, seed=3)
    torch.nn.init.normal_(model.lm_head.weight)
    x = torch.randint(0, 50, (2, 8))
    expected = model(x)
    path = ckpt.save_model(tmp_path / "final_model.safetensors", model.state_dict(), config.to_dict(), {"step": 7})
    assert torch.equal(ckpt.load_model(path)(x), expected)
    ckpt.save_checkpoint(tmp_path / "run", 7, model.state_dict(), {}, {"model_config": config.to_dict()})
    assert torch.equal(ckpt.load_model(tmp_path / "run")(x), expected)                 # the last checkpoint
    assert torch.equal(ckpt.load_model(tmp_path / "run" / "step_000007")(x), expected)
    with pytest.raises(FileNotFoundError, match="no such model file"):
        ckpt.load_model(tmp_path / "final_model.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.load_model(tmp_path / "empty")
    ckpt.save_checkpoint(tmp_path / "x", 1, {"w": torch.ones(1)}, None, {})
    from safetensors.torch import save_file
    save_file({"w": torch.ones(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a nanochat model file"):
        ckpt.load_model(tmp_path / "plain.safetensors")
