"""Global gradient-norm clipping (TrainConfig.grad_clip, --grad_clip): a real tiny model, one code path for one
process and for torchrun. The norm is that of the averaged gradient over all parameters (Muon and AdamW
together), the same number on every rank; a norm above the threshold is scaled down to it before any optimizer
sees the gradient, a norm below it leaves the step bit for bit as without clipping, and 0 turns it off.

This file is also the 2-rank worker: `torchrun --nproc_per_node=2 tests/test_train_grad_clip.py OUT_DIR`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

if __name__ != "__main__":
    from tests.conftest import PROJECT_ROOT, subprocess_env

from nanochat.distributed import DistInfo
from nanochat.trainer import TrainConfig, Trainer, format_progress, plan_training

VOCAB = 300
T, B = 32, 4
LOSS_SCALE = 10.0    # the tiny model's gradient norm at init is ~0.7: scaling the loss makes it ~7
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def tiny_cfg(world_size: int = 1, **overrides) -> TrainConfig:
    base = dict(depth=2, max_seq_len=T, device_batch_size=B, total_batch_size=B * T * 2, num_iterations=10,
                compile="off")
    return TrainConfig(**{**base, **overrides})


def micro_batch(step: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch k of optimizer step `step` (k = micro-step in one process, = rank under 2 ranks)."""
    gen = torch.Generator().manual_seed(1000 * step + k)
    return torch.randint(0, VOCAB, (B, T), generator=gen), torch.randint(0, VOCAB, (B, T), generator=gen)


def make_trainer(cfg: TrainConfig, dist_info: DistInfo = CPU, steps: int = 3, loss_scale: float = 1.0) -> Trainer:
    ws = dist_info.world_size
    trainer = Trainer.create(cfg, plan_training(cfg, VOCAB, ws), dist_info)
    accum = trainer.plan.grad_accum_steps
    trainer.train_batches = iter([micro_batch(s, k * ws + dist_info.rank) for s in range(steps) for k in range(accum)])
    if loss_scale != 1.0:
        model = trainer.model
        trainer.forward_model = lambda x, y: loss_scale * model(x, y)
    return trainer


def global_norm(tensors) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors])))


class ApplyRecorder:
    """Wraps every optimizer's step: the global norm of the gradients it is given and of those it applied."""

    def __init__(self, trainer: Trainer):
        self.before: list[list[torch.Tensor]] = []
        self.applied: list[list[torch.Tensor]] = []
        for opt in trainer.optimizers.values():
            original = opt.step

            def step(*args, _opt=opt, _original=original, **kwargs):
                reduced = kwargs.get("reduced")
                grads = (_opt.held_grads(reduced) if reduced is not None
                         else [p.grad for g in _opt.param_groups for p in g["params"] if p.grad is not None])
                self.before.append([g.clone() for g in grads])
                _original(*args, **kwargs)
                self.applied.append(grads)      # scaled in place by the step, if clipped

            opt.step = step

    def norms(self) -> tuple[float, float]:
        """(given, applied) global norms over everything recorded (use for a single step)."""
        return (global_norm([g for gs in self.before for g in gs]), global_norm([g for gs in self.applied for g in gs]))


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_a_norm_above_the_threshold_is_scaled_to_it_before_the_step():
    trainer = make_trainer(tiny_cfg(grad_clip=1.0), loss_scale=LOSS_SCALE)
    recorder = ApplyRecorder(trainer)
    result = trainer.step()
    before, applied = recorder.norms()
    assert before > 2.0                                        # the case under test: clipping is active
    assert result.grad_norm == pytest.approx(before, rel=1e-5)  # the logged norm is the pre-clip one
    assert applied == pytest.approx(1.0, rel=1e-5)
    for b, a in zip([g for gs in recorder.before for g in gs], [g for gs in recorder.applied for g in gs], strict=True):
        torch.testing.assert_close(a, b / before, rtol=1e-5, atol=1e-8)   # same direction, one global factor
    assert f"gnorm {before:.3f}" in format_progress(result, 10, 1.0, None)

    # the same step as torch.nn.utils.clip_grad_norm_ over all parameters, then the optimizers unclipped
    reference = make_trainer(tiny_cfg(grad_clip=0.0), loss_scale=LOSS_SCALE)
    adamw_step = reference.optimizers["adamw"].step

    def clip_then_step(*args, **kwargs):   # adamw steps first: clip every gradient once, before any update
        total = torch.nn.utils.clip_grad_norm_(reference.model.parameters(), 1.0)
        assert float(total) == pytest.approx(result.grad_norm, rel=1e-5)
        adamw_step(*args, **kwargs)

    reference.optimizers["adamw"].step = clip_then_step
    assert list(reference.optimizers) == ["adamw", "muon"]
    reference.step()
    for name, want in params(reference).items():
        torch.testing.assert_close(params(trainer)[name], want, rtol=1e-5, atol=1e-6)


def test_zero_disables_clipping():
    off = make_trainer(tiny_cfg(grad_clip=0.0), loss_scale=LOSS_SCALE)
    recorder = ApplyRecorder(off)
    result = off.step()
    before, applied = recorder.norms()
    assert result.grad_norm is None and before > 2.0
    assert applied == before                                   # the large gradient went in untouched
    huge = make_trainer(tiny_cfg(grad_clip=1e9), loss_scale=LOSS_SCALE)
    assert huge.step().grad_norm == pytest.approx(before, rel=1e-5)
    assert all(torch.equal(params(off)[k], v) for k, v in params(huge).items())


def test_a_norm_below_the_threshold_leaves_training_bit_for_bit_unchanged():
    """The default (1.0) against the tiny model's natural gradients (norm ~0.7): three steps exactly as with 0."""
    clipped, off = make_trainer(tiny_cfg()), make_trainer(tiny_cfg(grad_clip=0.0))
    assert clipped.cfg.grad_clip == 1.0
    for _ in range(3):
        a, b = clipped.step(), off.step()
        assert a.grad_norm is not None and 0 < a.grad_norm < 1.0
        assert a.loss == b.loss
    assert all(torch.equal(params(off)[k], v) for k, v in params(clipped).items())


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_bad_thresholds_are_refused(bad):
    with pytest.raises(ValueError, match="--grad_clip must be >= 0"):
        plan_training(tiny_cfg(grad_clip=bad), VOCAB, 1)


def test_two_gloo_ranks_compute_the_same_norm_and_update_as_one_process(tmp_path):
    """torchrun, 2 gloo ranks, each its own micro-batch; the gradient is averaged inside DistMuon/DistAdamW.
    Both ranks log the same pre-clip norm and hold the same weights, equal to one process with 2 accumulation
    steps over the same batches (where torch's clip_grad_norm_ semantics are plain)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
         str(tmp_path)], cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["norms"] == ranks[1]["norms"]               # exactly the same number on both ranks
    weights = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    single = make_trainer(tiny_cfg(grad_clip=1.0), loss_scale=LOSS_SCALE)
    norms = [single.step().grad_norm for _ in range(3)]
    assert norms == pytest.approx(ranks[0]["norms"], rel=1e-5)
    assert min(norms) > 1.0                                     # clipping was active at every step
    for k, want in params(single).items():
        torch.testing.assert_close(weights[0][k], want, rtol=1e-4, atol=1e-5)


def worker(out_dir: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    info = DistInfo(rank=rank, local_rank=rank, world_size=ws, device=torch.device("cpu"))
    trainer = make_trainer(tiny_cfg(grad_clip=1.0), info, loss_scale=LOSS_SCALE)
    assert trainer.plan.grad_accum_steps == 1
    norms = [trainer.step().grad_norm for _ in range(3)]
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"norms": norms}))
    save_file(params(trainer), out_dir / f"rank{rank}.safetensors")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":   # started by torchrun with PYTHONPATH at the project root
    worker(Path(sys.argv[1]))
