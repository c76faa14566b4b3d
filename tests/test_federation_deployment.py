"""A real deployment on loopback: SuperLink, one SuperNode per site (the seed's --node-config form), the
ServerApp and ClientApps in their own processes. A SuperNode killed mid-round: the round completes with
the others, and the site rejoins once its SuperNode is back."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import psutil
import pytest

from pilot import protocol
from pilot.coordination import connect, free_port, release
from pilot.ops.local import wait_until
from pilot.site.process import kill_tree
from tests.conftest import PROJECT_ROOT, VENV_BIN, subprocess_env

pytestmark = pytest.mark.e2e   # real Flower runs: minutes each (quick tier: -m 'not e2e')

SITES = ("client_0", "client_1", "client_2")


def supernode(env, link_port: int, site: str, index: int) -> subprocess.Popen:
    return subprocess.Popen(
        [str(VENV_BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
         "--port", str(free_port()), "--node-config", f'name="{site}" partition-id={index}'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def deployment_home(tmp_path) -> tuple[int, dict]:
    """A Flower home whose local-deployment connection is a SuperLink on a free port, and its environment."""
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    link_port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    return link_port, subprocess_env(HOME=str(tmp_path), FLWR_HOME=str(flwr_home), PILOT_SITE_THREADS="1")


def start_superlink(link_port: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(VENV_BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                             "--port", str(link_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def tiny_run_config(run_id: str, run_dir, text_shards, tiny_tokenizer, *extra: str) -> str:
    """Every site trains whenever connected (curtailment "always"), a depth-2 model on the test shards."""
    return " ".join([f'run-id="{run_id}"', f'run-dir="{run_dir}"', f'data-dir="{text_shards}"',
                     f'tokenizer-dir="{tiny_tokenizer}"', 'curtailment="always"', "depth=2", "max-seq-len=128",
                     "device-batch-size=4", "total-batch-size=1024", "eval-tokens=1024", *extra])


# slow: its promise (the round completes with the others; the site trains again once its SuperNode is back) is
# CI's in test_faults_supernode_restart.py; this is the slower variant (three sites, the node back only after
# Flower reported it lost)
@pytest.mark.slow
def test_deployment_survives_a_killed_supernode(tmp_path, text_shards, tiny_tokenizer):
    run_dir, run_id = tmp_path / "run", "deploy"
    link_port, env = deployment_home(tmp_path)
    r = connect(run_dir=run_dir)
    events_key = protocol.server_events_key(run_id)

    def events(kind: str) -> list[dict]:
        return [f for _, f in r.xrange(events_key) if f["kind"] == kind]

    link = start_superlink(link_port, env)
    nodes = {site: supernode(env, link_port, site, i) for i, site in enumerate(SITES)}
    run = None
    try:
        time.sleep(3)
        run_config = tiny_run_config(run_id, run_dir, text_shards, tiny_tokenizer, "round-duration=6",
                                     "stop-grace=45", "max-rounds=9")
        run = subprocess.Popen([str(VENV_BIN / "flwr"), "run", ".", "local-deployment", "--stream", "--run-config",
                                run_config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=PROJECT_ROOT)
        deadline = time.monotonic() + 150
        while not [e for e in events("round-end") if e["sites"] == ",".join(SITES) and int(e["tokens"]) > 0]:
            assert time.monotonic() < deadline and run.poll() is None, "no round with all three sites"
            time.sleep(0.5)
        starts = len(events("round-start"))
        while len(events("round-start")) == starts:  # kill client_1's SuperNode in the middle of a round
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.2)
        time.sleep(1.0)
        nodes["client_1"].send_signal(signal.SIGKILL)
        nodes["client_1"].wait()
        while not events("site-failed"):
            assert time.monotonic() < deadline + 60 and run.poll() is None, "the lost site was never noticed"
            time.sleep(0.5)
        nodes["client_1"] = supernode(env, link_port, "client_1", 1)
        output, _ = run.communicate(timeout=240)
        assert run.returncode == 0, output
        assert "finished outcome=max rounds" in output, output
    finally:
        for proc in [run, link, *nodes.values()]:
            if proc is not None and proc.poll() is None:
                proc.kill()
    failed = events("site-failed")
    assert failed[0]["site"] == "client_1"
    ends = events("round-end")
    failed_round = int(failed[0]["round"])
    same_round = [e for e in ends if int(e["round"]) == failed_round]
    assert same_round and same_round[0]["sites"] == "client_0,client_2", "the round completes with the others"
    rejoined = [e for e in ends if int(e["round"]) > failed_round and "client_1" in e["sites"].split(",")]
    assert rejoined, "the site rejoins after its SuperNode restarts"
    assert json.loads(rejoined[-1]["loss"])["client_1"] > 0
    release(r, run_dir)


def server_apps(link_pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(link_pid).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "flwr-serverapp" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def test_the_server_provisions_its_sites_and_stops_them(tmp_path, text_shards, tiny_tokenizer):
    """provisioner="local": no SuperNode is started by hand; the ServerApp brings both sites up (in parallel),
    trains with them, and at the end stops their SuperNodes and site trainers."""
    run_dir, run_id = tmp_path / "run", "provisioned"
    link_port, env = deployment_home(tmp_path)
    r = connect(run_dir=run_dir)
    link = start_superlink(link_port, env)
    try:
        time.sleep(3)
        run_config = tiny_run_config(run_id, run_dir, text_shards, tiny_tokenizer, "round-duration=5",
                                     "max-rounds=2", 'provisioner="local"', 'provision-sites="client_0,client_1"',
                                     f'provision-superlink="127.0.0.1:{link_port}"')
        run = subprocess.run([str(VENV_BIN / "flwr"), "run", ".", "local-deployment", "--stream", "--run-config",
                              run_config], capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=240)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "finished outcome=max rounds" in run.stdout, run.stdout
        # the ServerApp process goes on for its close(): stopping the provisioned sites
        wait_until(lambda: not server_apps(link.pid), 60)
    finally:
        kill_tree(psutil.Process(link.pid))
    events = [f for _, f in r.xrange(protocol.server_events_key(run_id))]
    release(r, run_dir)
    done = {(e["site"], e["op"]) for e in events if e["kind"] == "provision-done"}
    assert done == {(s, op) for s in ("client_0", "client_1") for op in ("open", "close")}, events
    ends = [e for e in events if e["kind"] == "round-end"]
    assert "client_0,client_1" in [e["sites"] for e in ends], ends
    # a round reached a live trainer straight from the server (not only through the SuperNode's poll), and
    # whichever copy came first, every round was trained once per site
    results = [(e["round"], e["site"], e["via"]) for e in events if e["kind"] == "site-result"]
    assert len({(n, s) for n, s, _ in results}) == len(results), results
    assert "server" in {via for _, _, via in results}, results
    # nothing of the run is left: no SuperNode of this SuperLink, no site trainer of this run
    left = [p for p in psutil.process_iter(["cmdline", "status"])
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(f"127.0.0.1:{link_port}" in c or str(run_dir) in c
                                                               for c in p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]
