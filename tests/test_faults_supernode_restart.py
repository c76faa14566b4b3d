"""Fault 3: a SuperNode restarts quickly (systemd, Kubernetes, the local provisioner's health check). A real
deployment on loopback: SuperLink, one SuperNode per site, the ServerApp and ClientApps in their own processes.
One site's SuperNode is SIGKILLed in the middle of a round and started again at once under the same name: its
new node identifies itself before Flower reports the old one unavailable (~30 s). The promise: the failure is
pinned on the old node, never on the site's new one, so the site trains again in a later round (tokens > 0),
the roster shows it back, and the run finishes."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import psutil
import pytest

from pilot import protocol
from pilot.coordination import connect, release
from pilot.site.process import kill_tree
from tests.conftest import PROJECT_ROOT, VENV_BIN
from tests.test_federation_deployment import deployment_home, start_superlink, supernode, tiny_run_config

pytestmark = pytest.mark.e2e   # a real Flower run: a few minutes

SITES = ("client_0", "client_1")
VICTIM = "client_1"


def left_behind(link_port: int) -> None:
    """Stop what this SuperLink started (a ServerApp still in its close(), or orphaned by the SuperLink's death)."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(f"127.0.0.1:{link_port}" in part for part in proc.info["cmdline"] or []):
                kill_tree(proc, 3)
        except psutil.Error:
            continue


def test_a_quickly_restarted_supernode_trains_again(tmp_path, text_shards, tiny_tokenizer):
    run_dir, run_id = tmp_path / "run", "fault-supernode-restart"
    link_port, env = deployment_home(tmp_path)
    r = connect(run_dir=run_dir)
    events_key = protocol.server_events_key(run_id)

    def events(kind: str, after: str = "-") -> list[dict]:
        return [{**f, "id": i} for i, f in r.xrange(events_key, min=after) if f["kind"] == kind]

    link = start_superlink(link_port, env)
    nodes = {site: supernode(env, link_port, site, i) for i, site in enumerate(SITES)}
    run, output = None, ""
    started = time.monotonic()
    try:
        time.sleep(3)
        run_config = tiny_run_config(run_id, run_dir, text_shards, tiny_tokenizer, "round-duration=5",
                                     "stop-grace=25", "max-rounds=6")
        run = subprocess.Popen([str(VENV_BIN / "flwr"), "run", ".", "local-deployment", "--stream", "--run-config",
                                run_config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=PROJECT_ROOT)
        deadline = time.monotonic() + 180
        while not [e for e in events("round-end") if e["sites"] == ",".join(SITES) and int(e["tokens"]) > 0]:
            assert time.monotonic() < deadline and run.poll() is None, "no round with both sites"
            time.sleep(0.5)
        starts = len(events("round-start"))
        while len(events("round-start")) == starts:   # the middle of the next round
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.2)
        time.sleep(1.0)
        killed_round = int(events("round-start")[-1]["round"])
        killed_at = r.xrevrange(events_key, count=1)[0][0]   # every event after this one follows the kill
        nodes[VICTIM].send_signal(signal.SIGKILL)
        nodes[VICTIM].wait()
        nodes[VICTIM] = supernode(env, link_port, VICTIM, 1)   # at once, same name: a new node id
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output
        assert "finished outcome=max rounds" in output, output
    finally:
        for proc in [run, link, *nodes.values()]:
            if proc is not None and proc.poll() is None:
                proc.kill()
        left_behind(link_port)
    # the round it was killed in completes with the other site (whether or not the victim's result made it)
    killed_end = [e for e in events("round-end", after=killed_at) if int(e["round"]) == killed_round]
    assert killed_end and "client_0" in killed_end[0]["sites"].split(",") and int(killed_end[0]["tokens"]) > 0, \
        killed_end
    results = [e for e in events("site-result", after=killed_at) if e["site"] == VICTIM]
    trained_again = [e for e in results if int(e["round"]) > killed_round and e["status"] == "ok"
                     and int(e["tokens"]) > 0]
    assert trained_again, f"{VICTIM} never trained after its SuperNode restarted: {results}"
    ends = [e for e in events("round-end", after=killed_at)
            if int(e["round"]) > killed_round and VICTIM in e["sites"].split(",")]
    assert ends and int(ends[-1]["tokens"]) > 0 and json.loads(ends[-1]["loss"])[VICTIM] > 0, ends
    back = [e for e in events("sites", after=killed_at) if VICTIM in e["connected"].split(",")]
    assert back, "the roster never showed the restarted site"
    # a failure, if Flower reports one, is pinned on the old node: the site is not dropped for the run
    assert events("finished")[-1]["outcome"] == "max rounds"
    failed = [e for e in events("site-failed", after=killed_at)]
    print(f"SuperNode of {VICTIM} killed in round {killed_round} and restarted at once; trained again in rounds "
          f"{[int(e['round']) for e in trained_again]}; site-failed events: {[(e['round'], e['site']) for e in failed]}"
          f"; {time.monotonic() - started:.0f} s")
    release(r, run_dir)
