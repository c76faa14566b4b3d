"""The prototype's commands, run as its users type them: each gives its result or says what to do instead.

Real processes where they are cheap: the dataset download with no network, the d20 baseline with no GPU,
energy_simulation.py's range checks, `pilot plan` on a trace with a baseline region."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def run(args: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.run(args, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]     # nothing listens there once the socket is closed


# ------------------------------------------------------------------ python -m nanochat.dataset -n 240, offline
@pytest.mark.parametrize("base_url", [f"http://127.0.0.1:{closed_port()}/fineweb", "http://fineweb.invalid/x"])
def test_dataset_download_without_network_fails_fast_naming_the_offline_corpus(tmp_path, base_url):
    started = time.monotonic()
    proc = run([sys.executable, "-m", "nanochat.dataset", "-n", "240", "--data-dir", str(tmp_path),
                "--base-url", base_url], timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert "cannot reach" in proc.stderr and "shard_00000.parquet" in proc.stderr
    assert "python -m nanochat.offline_corpus" in proc.stderr
    assert elapsed < 30                                  # seconds, not the ~15 minutes of retrying every shard
    assert not list(tmp_path.glob("*.partial"))


def test_dataset_rejects_nonsense_arguments(tmp_path):
    proc = run([sys.executable, "-m", "nanochat.dataset", "-n", "2", "--workers", "0", "--data-dir", str(tmp_path)])
    assert proc.returncode == 2 and "--workers must be >= 1" in proc.stderr


# ------------------------------------------------------------------ torchrun ... base_train --depth 20, no GPU
D20 = ["--depth", "20", "--target_param_data_ratio", "20", "--device_batch_size", "8", "--run", "baseline"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for machines without a GPU")
def test_d20_baseline_without_gpu_says_so_and_what_to_run(tmp_path):
    env = {"NANOCHAT_BASE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "scripts.base_train", "--"]
    for command in (torchrun + D20, [sys.executable, "-m", "scripts.base_train"] + D20):
        started = time.monotonic()
        proc = run(command, env=env)
        assert proc.returncode != 0
        out = proc.stdout + proc.stderr
        assert "no GPU found" in out and "--depth 20" in out, out[-2000:]
        assert "python -m scripts.base_train --depth 2" in out and "--device_type cpu" in out
        assert time.monotonic() - started < 60
    assert not (tmp_path / "base_checkpoints").exists()


def test_gpu_check_function_lets_small_and_cpu_runs_through():
    from nanochat.distributed import gpu_job_without_gpu

    assert gpu_job_without_gpu("cpu", 20, 4) is None                  # asked for the CPU: it gets it
    assert gpu_job_without_gpu("", 2, 2) is None                      # tiny gloo ranks (the tests' own runs)
    if not torch.cuda.is_available():
        assert "torchrun with 4 ranks" in gpu_job_without_gpu("", 20, 4)
        assert "--device_type cuda" in gpu_job_without_gpu("cuda", 2, 1)


# ------------------------------------------------------------------ python energy_simulation.py
@pytest.mark.parametrize("args, message", [
    (["--speedup", "-1"], "--speedup must be a number >= 0"),
    (["--speedup", "nan"], "--speedup must be a number >= 0"),
    (["--days", "0"], "--days must be a number > 0"),
    (["--days", "-3"], "--days must be a number > 0"),
    (["--until", "2020-01-01T00:00:00Z"], "--until 2020-01-01T00:00:00Z is not after the scenario start"),
])
def test_energy_simulation_refuses_out_of_range_arguments(tmp_path, args, message):
    proc = run([sys.executable, "energy_simulation.py", "--run-dir", str(tmp_path / "run")] + args, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()               # refused before any Redis started


def test_energy_simulation_live_says_its_pace_and_when_windows_open():
    from pilot.energy import scenario as scenario_mod
    from pilot.energy import sites
    from pilot.energy.simulation import describe_pace, window_outlook

    scenario = sites.load_scenario(None)
    profiles = scenario_mod.site_profiles(scenario)
    lines = describe_pace(scenario, profiles, 0, 1.0)
    assert "wall-clock pace" in lines[0] and "--speedup 3600" in lines[0]
    outlook = window_outlook(scenario, profiles, 0)
    for site in scenario.sites:
        [line] = [text for text in lines if text.startswith(f"{site.name}:")]
        window = outlook[site.name]
        if window is None:
            assert "no curtailment window" in line
        elif window[0] > scenario.start.timestamp():
            assert "next window opens" in line and "of wall time at live pace" in line
            # the window is the first the policy would open: raw curtailment holds there, not before
            raw = scenario_mod.raw_curtailed(site, scenario, profiles[site.name])
            first = int((window[0] - scenario.start.timestamp()) // scenario.step_s)
            assert raw[first] and (scenario.min_on_s or not raw[:first].any())
    faster = describe_pace(scenario, profiles, 0, 3600)
    assert faster[0].startswith("speed-up 3600") and any("s of wall time" in text for text in faster[1:])


def test_a_paced_wait_reports_progress_instead_of_silence(monkeypatch):
    from pilot.energy import simulation, sites

    monkeypatch.setattr(simulation, "WAITING_EVERY_S", 0.2)
    lines: list[str] = []
    sim = simulation.Simulation(sites.load_scenario(None), client=None, run_id="x", speedup=1.0,
                                log=lines.append, publisher=object())
    sim._wait(0.7, "step 1")
    assert len(lines) >= 2 and all("waiting" in text and "--speedup 3600" in text for text in lines)
    stop = threading.Event()
    stop.set()
    sim.stop = sim.pacer.stop = stop
    started = time.monotonic()
    sim._wait(30, "step 2")                              # a stop request cuts the wait short
    assert time.monotonic() - started < 1


# ------------------------------------------------------------------ pilot plan on the prototype's traces
TRACE = """timestamp,CAISO_NORTH,SPP_TX,BASELINE_REGION
2025-03-01T00:00:00Z,120,50,300
2025-03-01T00:05:00Z,90,50,80
2025-03-01T00:10:00Z,80,150,320
2025-03-01T00:15:00Z,130,20,340
"""


def test_pilot_plan_offers_a_trace_region_no_site_uses_as_a_baseline(tmp_path):
    path = tmp_path / "moer.csv"
    path.write_text(TRACE)
    pilot = [str(VENV_BIN / "pilot"), "plan", "--trace", str(path), "--threshold", "100",
             "--sites", "client_0=CAISO_NORTH,client_1=SPP_TX"]
    proc = run(pilot + ["--json"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result["sites"]) == {"client_0", "client_1"}
    base = result["baselines"]["BASELINE_REGION"]
    assert base["curtailed_minutes"] == 5 and len(base["windows"]) == 1
    assert base["mean_moer"] == pytest.approx((300 + 80 + 320 + 340) / 4) and base["mean_moer_in_windows"] == 80
    text = run(pilot, timeout=60)
    assert text.returncode == 0 and "single-site baselines" in text.stdout and "BASELINE_REGION" in text.stdout
    # a site whose region the trace lacks is still an error, naming the regions the trace does have
    typo = run([str(VENV_BIN / "pilot"), "plan", "--trace", str(path), "--sites", "client_0=CAISO_NORHT"], timeout=60)
    assert typo.returncode == 2
    assert "no data for region(s) ['CAISO_NORHT']" in typo.stderr and "CAISO_NORTH" in typo.stderr


def test_energy_simulation_start_outside_the_scenario_is_refused(tmp_path):
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT, subprocess_env

    done = subprocess.run([sys.executable, "energy_simulation.py", "--start", "2030-01-01T00:00Z", "--days", "1",
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                          cwd=PROJECT_ROOT, env=subprocess_env())
    assert done.returncode == 2 and "--start 2030-01-01T00:00Z is outside the scenario" in done.stderr, done.stderr
