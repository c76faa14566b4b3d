"""One command stops a run: Ctrl-C on `pilot run local-simulation --stream` ends the round in progress with a
checkpoint, then leaves no process of the run (server, Ray, site trainers, the embedded Redis); `pilot stop` on
an unknown run is an error that says where it looked."""

from __future__ import annotations

import signal
import subprocess
import time

import psutil
import pytest

from pilot import coordination, protocol
from tests.conftest import PROJECT_ROOT, VENV_BIN, subprocess_env
from tests.test_flower_connections import flwr_env_for

pytestmark = pytest.mark.e2e   # a real Flower simulation run: a minute or two


def mentioning(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(text in part for part in proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_ctrl_c_on_pilot_run_stops_everything_of_the_run(tmp_path, text_shards, tiny_tokenizer):
    run_dir = tmp_path / "run"
    flwr_home, env = flwr_env_for(tmp_path)
    config = " ".join([
        'run-id="ctrlc"', f'run-dir="{run_dir}"', f'data-dir="{text_shards}"', f'tokenizer-dir="{tiny_tokenizer}"',
        'curtailment="always"', "round-duration=4", "token-budget=100000000", "depth=2", "max-seq-len=128",
        "device-batch-size=4", "total-batch-size=1024", "eval-tokens=1024"])
    run = subprocess.Popen([str(VENV_BIN / "pilot"), "run", "local-simulation", "--stream", "--run-config", config],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=PROJECT_ROOT)
    try:
        deadline = time.monotonic() + 180
        r = None
        while True:
            assert run.poll() is None and time.monotonic() < deadline, "no round trained"
            state = coordination.EmbeddedRedis(run_dir).read_state()
            if state is not None and r is None:
                r = coordination.client_from_url(state.url)
            if r is not None and [f for _, f in r.xrange(protocol.server_events_key("ctrlc"))
                                  if f["kind"] == "round-end" and int(f["tokens"]) > 0]:
                break
            time.sleep(0.5)
        trainers = [p for p in mentioning(str(run_dir)) if "pilot.site.trainer" in " ".join(p.cmdline())]
        assert trainers, "the site trainers run"
        run.send_signal(signal.SIGINT)
        output, _ = run.communicate(timeout=240)
        assert run.returncode == 130, output
        assert "pilot stop" not in output or "stopped" in output
        # the server ended the round it was in and wrote its final model before it went
        assert (run_dir / "final_model.safetensors").exists(), output
        assert "run ctrlc: server stopped" in output, output
        psutil.wait_procs(trainers, timeout=20)
        assert not mentioning(str(run_dir)), [p.cmdline() for p in mentioning(str(run_dir))]
        assert not mentioning(str(flwr_home)), "the local SuperLink, Ray and the simulation are gone"
        state = coordination.EmbeddedRedis(run_dir).read_state()
        assert state is None or not coordination.EmbeddedRedis(run_dir).alive(state), "the embedded Redis stopped"
    finally:
        if run.poll() is None:
            run.kill()
        from pilot.ops.local import stop_local_superlink
        stop_local_superlink(flwr_home)


def test_pilot_stop_of_an_unknown_run_says_where_it_looked(tmp_path):
    done = subprocess.run([str(VENV_BIN / "pilot"), "stop", "nosuchrun", "--run-dir", str(tmp_path / "x")],
                          capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert done.returncode == 2 and "no run 'nosuchrun' is running here" in done.stderr
    assert str(tmp_path / "x" / "redis") in done.stderr
