"""The `pilot` front door and the run-settings reference."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from pilot import settings
from tests.conftest import PROJECT_ROOT, VENV_BIN, subprocess_env


def test_pilot_help_lists_subcommands():
    result = subprocess.run([str(VENV_BIN / "pilot"), "--help"], capture_output=True, text=True,
                            env=subprocess_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("config", "env", "redis"):
        assert command in result.stdout


def test_pilot_without_a_command_is_an_error():
    result = subprocess.run([sys.executable, "-m", "pilot.cli"], capture_output=True, text=True,
                            env=subprocess_env(), timeout=60)
    assert result.returncode == 2 and "COMMAND" in result.stderr


def test_pyproject_run_config_matches_the_settings_table():
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    run_config = pyproject["tool"]["flwr"]["app"]["config"]
    assert run_config == {s.key: s.default for s in settings.SETTINGS}


def test_readme_embeds_the_current_configuration_reference():
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert settings.reference_markdown() in readme, "README is stale: paste the output of `pilot config`"


def test_resolve_overlays_and_checks_types():
    values = settings.resolve({"round-duration": 60.0, "run-id": "r7"})
    assert values["round-duration"] == 60 and isinstance(values["round-duration"], int)
    assert values["run-id"] == "r7" and values["handshake-timeout"] == 60
    with pytest.raises(KeyError, match="round-durration"):
        settings.resolve({"round-durration": 60})
    with pytest.raises(TypeError, match="round-duration"):
        settings.resolve({"round-duration": "ten minutes"})


def test_training_hyperparameters_are_run_settings_and_bad_input_says_what_to_type():
    """The prototype's `--run-config "lr=0.0005"`: lr multiplies nanochat's three learning rates (the run's
    TrainConfig gets them); a typo names the closest key, a wrong type or range names what is expected."""
    tuned = settings.load({}).model.optimization()
    halved = settings.load({"lr": 0.5, "weight-decay": 0.1, "grad-clip": 0.0}).model.optimization()
    for name in ("matrix_lr", "embedding_lr", "unembedding_lr"):
        assert halved[name] == pytest.approx(tuned[name] / 2)
    assert halved["weight_decay"] == 0.1 and halved["grad_clip"] == 0.0
    assert settings.parse_run_config('lr=0.0005 run-id="x" depth=2') == {"lr": 0.0005, "run-id": "x", "depth": 2}
    with pytest.raises(settings.SettingError, match="unknown run setting 'matrix_lr'; did you mean 'matrix-lr'"):
        settings.load({"matrix_lr": 0.01})
    with pytest.raises(settings.SettingError, match="'warmup-ratio' must be >= 0.0 and <= 1.0, got 1.5"):
        settings.load({"warmup-ratio": 1.5})
    with pytest.raises(settings.SettingError, match=r"'depth' must be int \(e.g. depth=4\), got 'deep'"):
        settings.load({"depth": "deep"})
    with pytest.raises(settings.SettingError, match=r"'direct-delivery' must be bool \(e.g. direct-delivery=true\)"):
        settings.load({"direct-delivery": "yes"})   # the example is TOML: true, not Python's True
    with pytest.raises(settings.SettingError, match='strings need quotes: run-id="x"'):
        settings.parse_run_config("run-id=x")


def test_pilot_run_refuses_a_bad_run_configuration_before_flower_sees_it():
    """`flwr run` says only "Invalid run configuration" for a typo; `pilot run` names the key and the fix."""
    import subprocess
    import sys

    for text, message in [("round-durration=60", "did you mean 'round-duration'?"),
                          ('lr="fast"', "'lr' must be float"), ("lr=0.5 depth=0", "'depth' must be >= 1")]:
        done = subprocess.run([sys.executable, "-m", "pilot.cli", "run", "local-simulation", "--run-config", text],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr, (text, done.stderr)
        assert "flwr run" not in done.stdout, "nothing was handed to Flower"


def test_pilot_run_on_the_gpu_connection_without_a_gpu_says_what_to_run_instead():
    import os
    import subprocess
    import sys

    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this runs as "no GPU" on any machine, GPU or not
    done = subprocess.run([sys.executable, "-m", "pilot.cli", "run", "local-simulation-gpu", "--stream"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and "this machine has none" in done.stderr and "pilot run local-simulation" in done.stderr
