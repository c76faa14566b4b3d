"""`pilot demo` at its smallest: the whole system end to end (embedded Redis, energy simulation, Flower, three
site trainers, the two centralized baselines, the report), checked against the run's own logs; and Ctrl-C leaves
no process behind."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import psutil
import pytest

from pilot.report.html import render_png, rendered_dom
from tests.conftest import PROJECT_ROOT, VENV_BIN, subprocess_env

pytestmark = pytest.mark.e2e   # real Flower runs: minutes each (quick tier: -m 'not e2e')

# 03:00-15:00 UTC on 2025-08-09 of the shipped scenario: paused, then client_1 alone, then two and three sites
SMALL = ["--start", "2025-08-09T03:00:00Z", "--days", "0.5", "--speedup", "1440", "--round-s", "7200",
         "--token-budget", "10000000"]


def demo_processes(marker: str) -> list[psutil.Process]:
    """Live processes whose command line names the run (its directory or id)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and any(marker in p for p in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def start_demo(tmp_path, run_id: str, text_shards, tiny_tokenizer, *extra: str) -> subprocess.Popen:
    env = subprocess_env(PILOT_HOME=str(tmp_path / "home"), HOME=str(tmp_path))
    return subprocess.Popen([str(VENV_BIN / "pilot"), "demo", "--run-id", run_id, "--data-dir", str(text_shards),
                             "--tokenizer-dir", str(tiny_tokenizer), *SMALL, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=PROJECT_ROOT)


def test_the_demo_runs_end_to_end_and_its_report_matches_its_logs(tmp_path, text_shards, tiny_tokenizer):
    run_id = "demo-test"
    demo = start_demo(tmp_path, run_id, text_shards, tiny_tokenizer)
    try:
        output, _ = demo.communicate(timeout=420)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, output
    run_dir = tmp_path / "home" / "runs" / run_id
    assert not demo_processes(str(run_dir)), "the demo left processes behind"

    events = read_jsonl(run_dir / "logs" / "events.jsonl")
    finished = [e for e in events if e["kind"] == "finished"]
    assert finished and finished[-1]["outcome"] == "energy simulation finished", output
    regimes = {e["regime"] for e in events if e["kind"] == "regime"}
    assert {"paused", "solo", "federated"} <= regimes, regimes
    results = [e for e in events if e["kind"] == "site-result" and e["status"] == "ok"]
    tokens = sum(e["tokens"] for e in results)
    assert tokens == finished[-1]["tokens"] > 0

    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary["run"]["tokens"] == tokens
    # the baseline trained the same tokens, on one site
    baseline = read_jsonl(run_dir / "baseline" / "metrics.jsonl")
    assert baseline[-1]["tokens"] == tokens == summary["baseline"]["tokens"]
    assert summary["run"]["final_val_bpb"] == pytest.approx(
        [e["val_bpb"] for e in events if e["kind"] == "round-end" and e["val_bpb"] is not None][-1])
    assert summary["baseline"]["final_val_bpb"] == pytest.approx([b["val_bpb"] for b in baseline if "val_bpb" in b][-1])
    # and the data-parallel equivalent: the three sites' batch, a third of the steps, the same tokens (to a batch)
    sites_batch = read_jsonl(run_dir / "baseline-sites" / "metrics.jsonl")
    one_batch = baseline[-1]["tokens"] // baseline[-1]["step"]
    assert sites_batch[-1]["tokens"] // sites_batch[-1]["step"] == 3 * one_batch
    assert tokens - 3 * one_batch < sites_batch[-1]["tokens"] <= tokens
    assert summary["baseline_sites"]["steps"] == sites_batch[-1]["step"] == tokens // (3 * one_batch)
    assert summary["baseline_sites"]["final_val_bpb"] == pytest.approx(
        [b["val_bpb"] for b in sites_batch if "val_bpb" in b][-1])
    # windows: the report's curtailed time per site is what the energy log says, over the run's span
    steps = read_jsonl(run_dir / "logs" / "steps.jsonl")
    energy = read_jsonl(run_dir / "logs" / "energy.jsonl")
    config = json.loads((run_dir / "logs" / "energy_config.json").read_text())
    run_times = [e["sim_ts"] for e in events + steps if e.get("sim_ts") is not None]
    begin, end = min(run_times), max(run_times + [e["sim_ts"] for e in energy])
    for site in ("client_0", "client_1", "client_2"):
        opened, curtailed_s = None, 0.0
        for e in (e for e in energy if e["site"] == site):
            if e["curtailed"] and opened is None:
                opened = e["sim_ts"]
            elif not e["curtailed"] and opened is not None:
                curtailed_s, opened = curtailed_s + max(0.0, min(e["sim_ts"], end) - max(opened, begin)), None
        if opened is not None:
            curtailed_s += end - max(opened, begin)
        assert summary["sites"][site]["curtailed_s"] == pytest.approx(curtailed_s, rel=0.01), site
        trained = sum(e["seconds_training"] for e in results if e["site"] == site)
        assert summary["sites"][site]["train_wall_s"] == pytest.approx(trained, rel=1e-3), site
    # energy: training kWh = each site's GPUs at training power for its training time in simulated hours
    kw = {s["name"]: s["gpus"] * s["gpu_train_kw"] for s in config["sites"]}
    train_kwh = sum(kw[e["site"]] * e["seconds_training"] * config["speedup"] / 3600 for e in results)
    assert summary["energy"]["total"]["train_kwh"] == pytest.approx(train_kwh, rel=0.05)

    # the page, as a browser builds it, compares the run with both baselines, labelled
    dom = rendered_dom(run_dir / "report" / "index.html")
    assert "centralized, one site" in dom and "centralized, the sites" in dom and "Both baselines" in dom
    png = tmp_path / "report.png"
    render_png(run_dir / "report" / "index.html", png)
    from PIL import Image
    pixels = Image.open(png).convert("RGB").getcolors(maxcolors=1 << 20)
    assert pixels is not None and len(pixels) > 50, "the rendered report is blank"


def test_ctrl_c_stops_every_process_of_the_demo(tmp_path, text_shards, tiny_tokenizer):
    run_id = "demo-interrupted"
    demo = start_demo(tmp_path, run_id, text_shards, tiny_tokenizer, "--days", "5")
    run_dir = tmp_path / "home" / "runs" / run_id
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "logs" / "steps.jsonl").exists():  # training has begun: every process is up
            assert demo.poll() is None and time.monotonic() < deadline, demo.stdout.read() if demo.poll() else ""
            time.sleep(0.5)
        assert len(demo_processes(str(run_dir))) >= 5   # server, SuperLink, energy simulation, trainers, Redis
        demo.send_signal(signal.SIGINT)
        try:   # it stops the server, SuperLink, energy simulation and trainers in turn, each given a grace
            output, _ = demo.communicate(timeout=120)
        except subprocess.TimeoutExpired as late:
            left = [p.cmdline()[:3] for p in demo_processes(str(run_dir))]
            raise AssertionError(f"the demo did not end within 120 s of Ctrl-C; still running: {left}; "
                                 f"it printed: {late.output}") from late
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130, output
    left = demo_processes(str(run_dir))
    assert not left, [p.cmdline() for p in left]
