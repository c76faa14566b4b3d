"""A ServerApp whose SuperLink is gone ends itself: its heartbeat goes down (the sites' orphan timeout starts), it
records nothing more, and its process exits, whatever its main thread is doing. A real listening socket stands
for the SuperLink's runtime API, a real redis-server for the run's state, and the server is a real process
whose main thread is stuck in a wait that no signal ends."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time

from pilot import protocol
from pilot.server.incarnation import link_probe
from tests.conftest import PROJECT_ROOT, subprocess_env


def listening_socket() -> tuple[socket.socket, str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener, f"127.0.0.1:{listener.getsockname()[1]}"


def test_the_link_probe_says_whether_the_runtime_api_accepts_connections():
    listener, address = listening_socket()
    probe = link_probe(address)
    assert probe()
    listener.close()
    assert not probe()
    assert link_probe(None)(), "a grid without an address (in-process simulation) has no lifeline to lose"


def test_a_server_whose_superlink_is_gone_takes_its_heartbeat_down_and_exits(redis_server, redis_client):
    listener, address = listening_socket()
    run = "link-lost"
    # the server: its main thread waits on a lock nobody releases (as Flower's SIGINT would find it: blocked)
    script = textwrap.dedent(f"""
        import threading, redis
        from pilot.server import incarnation
        incarnation.LINK_LOST_S, incarnation.LINK_EXIT_S = 3.0, 2.0
        r = redis.Redis.from_url({redis_server.url!r}, decode_responses=True)
        server = incarnation.Incarnation(r, {run!r}, lifeline=incarnation.link_probe({address!r}))
        print(server.id, flush=True)
        stuck = threading.Lock(); stuck.acquire(); stuck.acquire()
        """)
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env(), cwd=PROJECT_ROOT)
    try:
        server_id = server.stdout.readline().strip()
        deadline = time.monotonic() + 10
        while redis_client.get(protocol.server_alive_key(run)) != server_id:
            assert time.monotonic() < deadline, "the server never beat"
            time.sleep(0.1)
        time.sleep(2 * protocol.HEARTBEAT_S)
        assert server.poll() is None and redis_client.get(protocol.server_alive_key(run)) == server_id, \
            "a server whose SuperLink is there lives on"

        listener.close()   # the SuperLink is gone
        gone = time.monotonic()
        while redis_client.get(protocol.server_alive_key(run)) is not None:
            assert time.monotonic() - gone < 3.0 + 2 * protocol.HEARTBEAT_S + 3, "the heartbeat stayed up"
            time.sleep(0.1)
        heartbeat_down = time.monotonic() - gone
        assert heartbeat_down >= 3.0, "the lifeline gave up before LINK_LOST_S"
        assert server.wait(timeout=2.0 + 5) == 1, "the server's process did not exit"
        exited = time.monotonic() - gone
        assert redis_client.get(protocol.server_current_key(run)) == server_id, "it gave up nothing it did not own"
        print(f"SuperLink gone: heartbeat down after {heartbeat_down:.1f} s, process exited after {exited:.1f} s")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
