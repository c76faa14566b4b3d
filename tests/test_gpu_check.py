"""bench/gpu_check.py where there is no GPU: it says so, checks that everything the GPU run uses imports and
parses, and exits 0. Its peak table and its one-site Flower home are checked as plain functions."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT_ROOT / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_without_gpu_it_says_so_checks_imports_and_exits_0():
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "gpu_check: no GPU" in out and "sees no CUDA device" in out
    for checked in ("ok  nanochat.gpt: a d2 model on the CPU, one forward",
                    "ok  nanochat.trainer: the d20 plan (560,988,160 parameters",
                    "ok  scripts.base_train --dry_run --depth 20 ...: exit 0, 560,988,160 parameters",
                    "ok  .flwr/config.toml [local-simulation-gpu]",
                    "ok  flwr run --help"):
        assert checked in out, out
    assert "import checks passed" in out


def test_bad_arguments_are_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--nproc", "0"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--nproc must be >= 1" in proc.stderr


def test_peak_table_and_the_one_site_flower_home(tmp_path):
    gc = load_script()
    assert gc.peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert gc.peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert gc.peak_flops("NVIDIA A100-SXM4-80GB", None) == 312e12
    assert gc.peak_flops("NVIDIA L4", None) == 121e12 and gc.peak_flops("NVIDIA L40S", None) == 362e12
    assert gc.peak_flops("NVIDIA A10G", None) is None                    # unknown: --peak-tflops
    assert gc.peak_flops("NVIDIA A10G", 70) == 70e12
    config = tomllib.loads((gc.flwr_home_for(tmp_path, 1) / "config.toml").read_text())["superlink"]
    original = tomllib.loads((PROJECT_ROOT / ".flwr" / "config.toml").read_text())["superlink"]
    assert config["local-simulation-gpu"]["options"]["num-supernodes"] == 1
    assert config["local-simulation-gpu"]["options"]["backend"] == original["local-simulation-gpu"]["options"]["backend"]
    assert config["local-simulation"] == original["local-simulation"]
    rows = [{"check": "a", "status": "ok", "tokens/s": "1,000", "MFU": "40.0%", "notes": "n"}]
    header, line = gc.table(rows).splitlines()
    assert header.split()[:3] == ["check", "status", "tokens/s"] and "40.0%" in line and line.endswith("n")
