"""scripts.base_train end to end, as real processes on real text: SIGTERM and SIGKILL mid-run then --resume give
the uninterrupted run's losses; two gloo ranks under torchrun give one rank's losses; bad input fails before
any work; the seed's d20 command parses under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanochat import checkpoint as ckpt
from scripts import base_train
from tests.conftest import PROJECT_ROOT, subprocess_env

STEPS = 20
TINY = ["--depth", "2", "--max_seq_len", "64", "--device_batch_size", "4", "--total_batch_size", "512",
        "--num_iterations", str(STEPS), "--eval_every", "10", "--eval_tokens", "2048"]


@pytest.fixture(scope="module")
def data_args(text_shards: Path, tiny_tokenizer: Path) -> list[str]:
    return ["--data_dir", str(text_shards), "--tokenizer_dir", str(tiny_tokenizer)]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    # one intra-op thread per process, as torchrun gives each rank: the same arithmetic in every run
    return subprocess_env(NANOCHAT_BASE_DIR=str(tmp_path_factory.mktemp("nanochat_base")), OMP_NUM_THREADS="1")


def command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "scripts.base_train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "scripts.base_train", "--"]


def run(args: list[str], env: dict[str, str], nproc: int = 1, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command(nproc) + args, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def val_bpb(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["val_bpb"] for r in map(json.loads, lines) if "val_bpb" in r}


def interrupt(args: list[str], env: dict[str, str], run_dir: Path, after_steps: int, sig: int,
              nproc: int = 1, whole_group: bool = False) -> tuple[int, str]:
    """Start a run, send `sig` once `after_steps` steps are logged (to every process of the run if
    `whole_group`: the machine dies), return (exit code, output)."""
    proc = subprocess.Popen(command(nproc) + args, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=whole_group)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= after_steps):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"run ended or hung before step {after_steps}: {proc.communicate()[0][-3000:]}")
        time.sleep(0.02)
    if whole_group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_args, env) -> list[tuple[int, float]]:
    """The uninterrupted single-process run."""
    run_dir = tmp_path_factory.mktemp("reference")
    proc = run(TINY + data_args + ["--checkpoint_dir", str(run_dir)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = losses(run_dir)
    assert [s for s, _ in curve] == list(range(1, STEPS + 1))
    assert curve[-1][1] < curve[0][1] - 1.0                           # it learned something
    first_bpb = float(proc.stdout.split("step 00000 | val bpb ")[1].split()[0])
    bpb = val_bpb(run_dir)
    assert sorted(bpb) == [10, 20] and bpb[20] < first_bpb - 0.2       # periodic validation, and it improved
    assert (run_dir / "final_model.safetensors").is_file()
    assert ckpt.list_checkpoints(run_dir) == [STEPS]
    return curve


def test_sigterm_then_resume_continues_bit_for_bit(tmp_path, data_args, env, reference):
    args = TINY + data_args + ["--checkpoint_dir", str(tmp_path)]
    code, out = interrupt(args, env, tmp_path, after_steps=5, sig=signal.SIGTERM)
    assert code == base_train.EXIT_STOPPED, out[-3000:]
    assert "received SIGTERM: stopping at the next step boundary" in out
    stopped_at = ckpt.list_checkpoints(tmp_path)
    assert len(stopped_at) == 1 and 5 <= stopped_at[0] < STEPS, (stopped_at, out[-2000:])
    assert not (tmp_path / "final_model.safetensors").exists()        # a stop is not the end of training
    resumed = run(args + ["--resume"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / ckpt.step_dir_name(stopped_at[0])}" in resumed.stdout
    assert losses(tmp_path) == reference                                  # exactly, every step


def test_sigkill_then_resume_continues_bit_for_bit(tmp_path, data_args, env, reference):
    args = TINY + data_args + ["--checkpoint_dir", str(tmp_path), "--save_every", "3", "--keep_checkpoints", "2"]
    code, out = interrupt(args, env, tmp_path, after_steps=8, sig=signal.SIGKILL)
    assert code == -signal.SIGKILL
    saved = ckpt.list_checkpoints(tmp_path)
    assert saved and saved[-1] >= 6 and len(saved) <= 2, saved
    for step in saved:                                                     # whole, loadable checkpoints only
        ckpt.load_checkpoint(tmp_path / ckpt.step_dir_name(step))
    killed_curve = losses(tmp_path)
    assert len(killed_curve) > saved[-1] or killed_curve[-1][0] == saved[-1]
    resumed = run(args + ["--resume"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path) == reference      # steps logged after the last checkpoint were dropped and redone


def test_two_gloo_ranks_match_one_process_stop_together_and_resume_on_one(tmp_path, data_args, env, reference):
    """torchrun, 2 gloo ranks, each half of every micro-batch (--data_sharding rows): same global batch as the
    single process with 2 accumulation steps. SIGTERM to torchrun mid-run: both ranks stop at the same step
    boundary with one checkpoint, whose gathered optimizer state and cursor let ONE process finish the run
    (rows sharding resumes on any number of ranks)."""
    args = TINY + data_args + ["--checkpoint_dir", str(tmp_path), "--data_sharding", "rows"]
    code, out = interrupt(args, env, tmp_path, after_steps=5, sig=signal.SIGTERM, nproc=2)
    assert out.count("received SIGTERM") == 1 and "stopped at step" in out, out[-3000:]   # rank 0 prints
    stopped_at = ckpt.list_checkpoints(tmp_path)
    assert len(stopped_at) == 1 and stopped_at[0] < STEPS
    _, _, meta = ckpt.load_checkpoint(tmp_path / ckpt.step_dir_name(stopped_at[0]), load_optim=False)
    assert meta["world_size"] == 2 and meta["data_sharding"] == "rows"
    resumed = run(args + ["--resume"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 rank(s) x 4 x 64 x 2 accumulation step(s)" in resumed.stdout
    curve = losses(tmp_path)
    assert [s for s, _ in curve] == [s for s, _ in reference]
    for (_, got), (_, want) in zip(curve, reference, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_two_ranks_reading_their_own_documents_resume_exactly_after_the_machine_dies(tmp_path, data_args, env):
    """--data_sharding documents (the default): each rank has its own data cursor. SIGKILL to every process
    of a 2-rank torchrun run; --resume under 2 ranks reproduces the uninterrupted 2-rank run exactly; a
    resume on 1 rank is refused (its documents would differ)."""
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = run(TINY + data_args + ["--checkpoint_dir", str(straight_dir)], env, nproc=2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    args = TINY + data_args + ["--checkpoint_dir", str(killed_dir), "--save_every", "4"]
    code, out = interrupt(args, env, killed_dir, after_steps=6, sig=signal.SIGKILL, nproc=2, whole_group=True)
    assert code == -signal.SIGKILL
    last = ckpt.find_last_checkpoint(killed_dir)
    _, _, meta = ckpt.load_checkpoint(last, load_optim=False)
    assert [c["rank"] for c in meta["data_cursors"]] == [0, 1] and meta["data_cursors"][0] != meta["data_cursors"][1]
    refused = run(args + ["--resume"], env)
    assert refused.returncode == 2 and "resume with 2 rank(s)" in refused.stderr
    resumed = run(args + ["--resume"], env, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(killed_dir) == losses(straight_dir)
    assert val_bpb(killed_dir) == val_bpb(straight_dir)


@pytest.mark.parametrize("extra, message", [
    (["--depth", "5"], "unknown depth 5: width 64 x 5 = 320 is not a multiple of head_dim 128"),
    (["--depth", "0"], "unknown depth 0"),
    (["--total_batch_size", "1000"], "--total_batch_size 1,000 tokens is not divisible by"),
    (["--warmdown_ratio", "2"], r"--warmdown_ratio must be in [0, 1]"),
])
def test_bad_input_fails_before_any_work(tmp_path, data_args, capsys, extra, message):
    run_dir = tmp_path / "run"
    code = base_train.main(TINY + data_args + ["--checkpoint_dir", str(run_dir)] + extra)
    assert code == base_train.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not run_dir.exists()                                            # nothing was started or written


def test_missing_data_and_existing_run_are_refused(tmp_path, data_args, tiny_tokenizer, capsys, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    code = base_train.main(TINY + ["--tokenizer_dir", str(tmp_path / "none"), "--checkpoint_dir", str(tmp_path)])
    assert code == 2 and "no tokenizer in" in capsys.readouterr().err
    code = base_train.main(TINY + ["--tokenizer_dir", str(tiny_tokenizer), "--data_dir", str(tmp_path / "empty"),
                                   "--checkpoint_dir", str(tmp_path / "c")])
    assert code == 2 and "need at least 2 shards" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "wandb", None)                   # as where wandb is not installed
    code = base_train.main(TINY + data_args + ["--checkpoint_dir", str(tmp_path / "w"), "--wandb", "offline"])
    assert code == 2 and "--wandb offline needs the wandb package" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    ckpt.save_checkpoint(tmp_path / "c", 3, {}, None, {})
    code = base_train.main(TINY + data_args + ["--checkpoint_dir", str(tmp_path / "c")])
    assert code == 2 and "already holds checkpoints (last: step_000003); pass --resume" in capsys.readouterr().err


def test_seed_command_parses_under_torchrun(env):
    """The seed's d20 command, as written, with --dry_run: four ranks plan the same run, none trains."""
    proc = run(["--depth", "20", "--target_param_data_ratio", "20", "--device_batch_size", "8", "--run", "baseline",
                "--dry_run"], env, nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("parameters: 560,988,160") == 1                # printed once, by rank 0
    assert "horizon: 21,400 steps" in proc.stdout
    assert "524,288 tokens per step = 4 rank(s) x 8 x 2048 x 8 accumulation step(s)" in proc.stdout
