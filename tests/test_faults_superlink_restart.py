"""Fault 9: the SuperLink is SIGKILLed in the middle of a round and restarted. A real deployment on loopback
(SuperLink, one SuperNode per site, `flwr run`), with the SuperLink's state in a database file (`--database`,
the recommended setting) or in memory (Flower's default).

What happens (measured; docs/deployment.md): the run does not survive. `flwr run --stream` exits at once, the
ServerApp process loses its SuperLink and exits within seconds (Flower's parent monitor, or, when that path
hangs, as measured on a loaded CI machine, Pilot's own lifeline: LINK_LOST_S + LINK_EXIT_S), and a restarted
SuperLink does not start it again. The promise Pilot keeps instead:
- no site trains on without a server: a site in the middle of a round stops when the server's heartbeat has
  been gone for the orphan timeout (`PILOT_ORPHAN_TIMEOUT_S`, 900 s by default; 15 s here), and its trainer exits;
- nothing the dead server did not checkpoint counts: a new `flwr run` with the same run-id resumes from the last
  checkpoint with its round and tokens, and its first round is the next one (the dead incarnation's half round
  is trained again from the checkpoint's ledger, never added in);
- with `--database` the SuperNodes reconnect to the restarted SuperLink by themselves; in memory they are
  restarted with it (as a supervisor restarting the whole host would)."""

from __future__ import annotations

import signal
import subprocess
import time

import psutil
import pytest

from pilot import protocol
from pilot.coordination import connect, release
from pilot.server import checkpoint
from pilot.site import process
from pilot.site.process import kill_tree
from tests.conftest import PROJECT_ROOT, VENV_BIN
from tests.test_federation_deployment import deployment_home, supernode, tiny_run_config

pytestmark = pytest.mark.e2e   # real Flower runs: a few minutes

SITES = ("client_0", "client_1")
ORPHAN_S = 15.0
SLACK_S = 3.0   # the watcher's poll, one step of a depth-2 model, a busy 2-core machine


def left_behind(link_port: int) -> None:
    """Stop what this SuperLink started (a ServerApp still in its close(), or orphaned by the SuperLink's death)."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(f"127.0.0.1:{link_port}" in part for part in proc.info["cmdline"] or []):
                kill_tree(proc, 3)
        except psutil.Error:
            continue


def server_app_processes(link_pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(link_pid).children(recursive=True):
        try:
            if "flwr-serverapp" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def superlink(link_port: int, env: dict, database: str | None) -> subprocess.Popen:
    command = [str(VENV_BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port)]
    return subprocess.Popen(command + (["--database", database] if database else []),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


# "memory" (no --database: the supervisor also restarts the SuperNodes) behaves the same (docs/deployment.md);
# it costs another four minutes, so CI runs the database case and PILOT_SLOW_TESTS=1 runs both (for a change
# to Flower)
@pytest.mark.timeout(900)   # two runs, a ServerApp's death, its heartbeat's lapse and the orphan timeout between
@pytest.mark.parametrize("state", ["database", pytest.param("memory", marks=pytest.mark.slow)])
def test_a_superlink_restart_ends_the_run_and_a_new_run_resumes_from_the_checkpoint(state, tmp_path, text_shards,
                                                                                    tiny_tokenizer):
    run_dir, run_id = tmp_path / "run", f"fault-superlink-{state}"
    link_port, env = deployment_home(tmp_path)
    env["PILOT_ORPHAN_TIMEOUT_S"] = str(ORPHAN_S)
    database = str(tmp_path / "superlink.db") if state == "database" else None
    r = connect(run_dir=run_dir)
    events_key = protocol.server_events_key(run_id)

    def events(kind: str, after: str = "-") -> list[dict]:
        """Events of a kind, those after the entry `after` (exclusive: the mark itself is the old run's)."""
        return [f for _, f in r.xrange(events_key, min=after if after == "-" else f"({after}") if f["kind"] == kind]

    def steps() -> list[dict]:
        return [f for s in SITES for _, f in r.xrange(protocol.metrics_key(run_id, s))]

    def flwr_run(max_rounds: int) -> subprocess.Popen:
        config = tiny_run_config(run_id, run_dir, text_shards, tiny_tokenizer, "round-duration=5", "stop-grace=45",
                                 f"max-rounds={max_rounds}")
        return subprocess.Popen([str(VENV_BIN / "flwr"), "run", ".", "local-deployment", "--stream", "--run-config",
                                 config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=PROJECT_ROOT)

    started = time.monotonic()
    link = superlink(link_port, env, database)
    nodes = {site: supernode(env, link_port, site, i) for i, site in enumerate(SITES)}
    first = second = None
    try:
        time.sleep(3)
        first = flwr_run(max_rounds=1000)
        deadline = time.monotonic() + 180
        while len([e for e in events("round-end") if int(e["tokens"]) > 0]) < 2:
            assert time.monotonic() < deadline and first.poll() is None, "the run never got going"
            time.sleep(0.5)
        starts = len(events("round-start"))
        while len(events("round-start")) == starts:   # the middle of the next round
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.2)
        while not any(r.hget(protocol.trainer_key(run_id, s), "status") == "training" for s in SITES):
            assert time.monotonic() < deadline and first.poll() is None, "no site trains in the round"
            time.sleep(0.2)
        time.sleep(1.0)

        server_apps = server_app_processes(link.pid)
        assert server_apps, "no flwr-serverapp process under the SuperLink"
        old_server = r.get(protocol.server_current_key(run_id))
        link.send_signal(signal.SIGKILL)
        link.wait()
        killed_at = time.time()
        first.communicate(timeout=60)
        assert first.returncode != 0, "flwr run outlived its SuperLink"
        # the ServerApp is gone (the process itself: Flower may end it before its close() ran), then its
        # heartbeat (taken down by close(), else lapsing within its TTL), and nothing of the run moves again
        _, alive = psutil.wait_procs(server_apps, timeout=60)
        assert not alive, "the ServerApp outlived its SuperLink"
        deadline = time.monotonic() + protocol.ALIVE_TTL_S + 5
        while r.get(protocol.server_alive_key(run_id)) is not None:
            assert time.monotonic() < deadline, "the dead ServerApp's heartbeat did not lapse"
            time.sleep(0.2)
        server_gone_at = time.time()
        ends_before = events("round-end")
        # the sites stop: every trainer leaves its round within the orphan timeout, and exits
        deadline = time.monotonic() + ORPHAN_S + 30
        while any(r.hget(protocol.trainer_key(run_id, s), "status") not in ("stopped", None) for s in SITES):
            assert time.monotonic() < deadline, {s: r.hgetall(protocol.trainer_key(run_id, s)) for s in SITES}
            time.sleep(0.5)
        last_step = max(float(s["wall_ts"]) for s in steps())
        assert last_step <= server_gone_at + ORPHAN_S + SLACK_S, (last_step - server_gone_at, "trained on")
        orphan_steps = [s for s in steps() if float(s["wall_ts"]) > killed_at]
        saved = checkpoint.load(checkpoint.latest(run_dir))
        assert (saved.round, saved.tokens) == (int(ends_before[-1]["round"]), int(ends_before[-1]["total_tokens"]))
        resume_mark = r.xrevrange(events_key, count=1)[0][0]

        link = superlink(link_port, env, database)
        if state == "memory":   # Flower forgot every node: the supervisor restarts them with the SuperLink
            for node in nodes.values():
                node.kill()
                node.wait()
            nodes = {site: supernode(env, link_port, site, i) for i, site in enumerate(SITES)}
        time.sleep(3)
        second = flwr_run(max_rounds=saved.round + 2)
        output, _ = second.communicate(timeout=240)
        assert second.returncode == 0, output
        assert "finished outcome=max rounds" in output, output
    finally:
        for proc in [first, second, link, *nodes.values()]:
            if proc is not None and proc.poll() is None:
                proc.kill()
        process.stop_trainers(r, run_id, grace_s=5)
        left_behind(link_port)

    # the new run resumed from the checkpoint: its round and tokens, then the next round
    resumed = events("resume", after=resume_mark)
    assert resumed and f"round {saved.round}, {saved.tokens} tokens" in resumed[0]["detail"], resumed
    ends = events("round-end", after=resume_mark)
    # the old server died before the new one started (waited for above), and recorded nothing after: every
    # event since is the new incarnation's, and says so
    new_server = resumed[0]["server"]
    assert new_server and new_server != old_server
    assert {e["server"] for _, e in r.xrange(events_key, min=f"({resume_mark}")} == {new_server}
    assert [int(e["round"]) for e in ends] == [saved.round + 1, saved.round + 2], ends
    assert int(ends[0]["total_tokens"]) == saved.tokens + int(ends[0]["tokens"]), "only the new rounds count"
    assert int(ends[-1]["total_tokens"]) == saved.tokens + sum(int(e["tokens"]) for e in ends)
    assert any(int(e["tokens"]) > 0 for e in ends), "the resumed run trained"
    print(f"SuperLink ({state}) killed mid-round {saved.round + 1}: the ServerApp was gone "
          f"{server_gone_at - killed_at:.1f} s later (heartbeat lapsed); {len(orphan_steps)} steps after the kill, "
          f"the last {last_step - server_gone_at:.1f} s after that (orphan timeout {ORPHAN_S:.0f} s), all discarded; "
          f"resumed at round {saved.round}, {saved.tokens} tokens; {time.monotonic() - started:.0f} s")
    release(r, run_dir)
