"""Pure policy of the training loop: the learning-rate schedule at its edges, Muon's momentum warm-up, the plan
(model size, horizon, gradient accumulation) and every bad-input error, all without processes."""

from __future__ import annotations

import pytest

from nanochat.trainer import TrainConfig, lr_multiplier, muon_momentum, plan_training, validate_config
from scripts.base_train import parse_args, train_config

SEED_ARGS = ["--", "--depth", "20", "--target_param_data_ratio", "20", "--device_batch_size", "8", "--run", "baseline"]


def test_schedule_edges_nanochat_defaults():
    n = 1000  # no warm-up, warm-down over the last 20%, floor 0
    assert lr_multiplier(0, n) == 1.0
    assert lr_multiplier(800, n) == 1.0                     # warm-down starts after step n - 200
    assert lr_multiplier(801, n) == pytest.approx(199 / 200)
    assert lr_multiplier(900, n) == pytest.approx(0.5)
    assert lr_multiplier(999, n) == pytest.approx(1 / 200)  # the last step taken still learns
    assert lr_multiplier(1000, n) == 0.0                     # exactly the floor at the horizon
    for past in (1001, 1200, 10 ** 9):                       # the reference went negative here
        assert lr_multiplier(past, n) == 0.0


def test_schedule_with_warmup_and_floor():
    n, floor = 100, 0.1
    kw = dict(warmup_ratio=0.1, warmdown_ratio=0.3, final_lr_frac=floor)
    assert lr_multiplier(0, n, **kw) == pytest.approx(0.1)  # (step + 1) / warmup: never zero at step 0
    assert lr_multiplier(9, n, **kw) == 1.0
    assert lr_multiplier(70, n, **kw) == 1.0
    assert lr_multiplier(85, n, **kw) == pytest.approx(0.5 + 0.5 * floor)
    assert lr_multiplier(100, n, **kw) == pytest.approx(floor)
    values = [lr_multiplier(s, n, **kw) for s in range(0, 3 * n)]
    assert min(values) == pytest.approx(floor) and all(v >= floor for v in values)
    assert values[9:71] == [1.0] * 62
    warmdown = values[70:101]
    assert all(a > b for a, b in zip(warmdown, warmdown[1:], strict=False))   # strictly decreasing


def test_schedule_degenerate_runs_and_bad_steps():
    assert lr_multiplier(0, 1) == 1.0 and lr_multiplier(1, 1) == 0.0
    assert [lr_multiplier(s, 3, warmdown_ratio=1.0) for s in range(5)] == pytest.approx([1.0, 2 / 3, 1 / 3, 0, 0])
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_multiplier(-1, 10)
    with pytest.raises(ValueError, match="num_iterations must be >= 1"):
        lr_multiplier(0, 0)


def test_muon_momentum_warmup():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10 ** 6) == pytest.approx(0.95)
    assert muon_momentum(0, warmup_steps=0) == pytest.approx(0.95)


def test_seed_command_plans_the_d20_baseline():
    """torchrun --standalone --nproc_per_node=4 -m scripts.base_train -- --depth 20 --target_param_data_ratio 20
    --device_batch_size 8 --run baseline (the leading "--" is accepted too)."""
    args = parse_args(SEED_ARGS)
    assert args.run == "baseline"
    plan = plan_training(train_config(args), vocab_size=65536, world_size=4)
    assert plan.num_params == 560_988_160
    assert plan.total_batch_size == 524_288
    assert plan.num_iterations == 21_400                     # 20 x 560,988,160 // 524,288
    assert plan.grad_accum_steps == 8                        # 524,288 / (4 x 8 x 2,048)
    assert plan.total_tokens == 21_400 * 524_288
    text = plan.describe()
    assert "parameters: 560,988,160" in text and "21,400 steps" in text


def test_plan_from_num_iterations_and_world_size():
    cfg = TrainConfig(depth=2, max_seq_len=64, device_batch_size=4, total_batch_size=1024, num_iterations=7)
    one, two = plan_training(cfg, 4096, 1), plan_training(cfg, 4096, 2)
    assert (one.num_iterations, one.grad_accum_steps, two.grad_accum_steps) == (7, 4, 2)
    assert one.num_params == 2 * 4096 * 128 + 2 * 12 * 128 ** 2


@pytest.mark.parametrize("overrides, world, match", [
    (dict(depth=0), 1, "unknown depth 0"),
    (dict(depth=5), 1, "unknown depth 5: width 64 x 5 = 320 is not a multiple of head_dim 128"),
    (dict(total_batch_size=1000), 4, r"--total_batch_size 1,000 tokens is not divisible by .* 8 x 2048 x 4 = "
                                     r"65,536; use a multiple of 65,536"),
    (dict(total_batch_size=524288, device_batch_size=3), 1, r"3 x 2048 x 1 = 6,144; use a multiple of 6,144 "
                                                            r"\(e.g. 522,240 or 528,384\)"),
    (dict(device_batch_size=0), 1, "--device_batch_size must be >= 1"),
    (dict(num_iterations=-1, target_param_data_ratio=0), 1, "set a horizon"),
    (dict(warmdown_ratio=1.5), 1, r"--warmdown_ratio must be in \[0, 1\]"),
    (dict(final_lr_frac=-0.1), 1, r"--final_lr_frac must be in \[0, 1\]"),
    (dict(warmup_ratio=0.6, warmdown_ratio=0.6), 1, "exceed 1"),
    (dict(compile="yes"), 1, "--compile must be auto, on or off"),
])
def test_bad_input_is_a_clear_value_error(overrides, world, match):
    cfg = TrainConfig(**{**dict(device_batch_size=8), **overrides})
    with pytest.raises(ValueError, match=match):
        validate_config(cfg, world)


def test_too_small_ratio_is_refused():
    cfg = TrainConfig(depth=2, max_seq_len=64, device_batch_size=4, total_batch_size=1 << 20,
                      target_param_data_ratio=0.01)
    with pytest.raises(ValueError, match="less than one step"):
        plan_training(cfg, 512, 1)
