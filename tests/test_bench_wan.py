"""The emulated WAN of the benchmarks (bench/wan.py), measured with sockets: the delaying proxy really delays
(each way, without limiting the rate) and a namespace's tbf link really limits the rate, both directions."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from bench.wan import DelayProxy, Wan, wan_available

ONE_WAY_S = 0.1


def echo_server(host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    """Echoes every connection back; a line "SINK n\\n" instead reads n bytes and answers "ok\\n";
    "SEND n\\n" sends n bytes."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, 0))
    srv.listen(8)

    def handle(conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rb")
            line = f.readline()
            if line.startswith(b"SINK"):
                n = int(line.split()[1])
                while n > 0:
                    n -= len(f.read1(min(n, 1 << 20)))
                conn.sendall(b"ok\n")
            elif line.startswith(b"SEND"):
                n = int(line.split()[1])
                block = b"x" * (1 << 20)
                while n > 0:
                    conn.sendall(block[:n])
                    n -= len(block[:n])
            else:
                conn.sendall(line)
                while data := f.read1(1 << 16):
                    conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


CLIENT = r"""
import socket, sys, time
host, port, mode, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.create_connection((host, port))
t0 = time.perf_counter()
if mode == "echo":
    s.sendall(b"ping\n"); f = s.makefile("rb"); f.readline()
elif mode == "sink":
    s.sendall(b"SINK %d\n" % n); block = b"x" * (1 << 20); left = n
    while left > 0:
        s.sendall(block[:left]); left -= len(block[:left])
    s.makefile("rb").readline()
else:
    s.sendall(b"SEND %d\n" % n); left = n
    while left > 0:
        left -= len(s.recv(1 << 20))
print(time.perf_counter() - t0)
"""


def timed_client(prefix: list[str], host: str, port: int, mode: str, n: int = 0) -> float:
    out = subprocess.run([*prefix, sys.executable, "-c", CLIENT, host, str(port), mode, str(n)], capture_output=True,
                         text=True, timeout=120, check=True)
    return float(out.stdout.strip())


def test_the_proxy_delays_each_way_without_limiting_the_rate():
    srv, port = echo_server()
    proxy = DelayProxy(("127.0.0.1", 0), ("127.0.0.1", port), ONE_WAY_S).start()
    try:
        rtt = min(timed_client([], "127.0.0.1", proxy.port, "echo") for _ in range(2))
        assert 2 * ONE_WAY_S <= rtt < 2 * ONE_WAY_S + 0.15, rtt
        n = 40 << 20
        upload = timed_client([], "127.0.0.1", proxy.port, "sink", n)  # n bytes one way, a line back
        download = timed_client([], "127.0.0.1", proxy.port, "send", n)
        # the delay is paid once, not per byte: 40 MB take about a round trip plus copying, far from 40 x 0.1 s
        assert upload < 2 * ONE_WAY_S + 3.0, upload
        assert download < 2 * ONE_WAY_S + 3.0, download
        undelayed = DelayProxy(("127.0.0.1", 0), ("127.0.0.1", port), ONE_WAY_S,
                               undelayed_peers={"127.0.0.1"}).start()
        assert timed_client([], "127.0.0.1", undelayed.port, "echo") < ONE_WAY_S
        undelayed.close()
    finally:
        proxy.close()
        srv.close()


@pytest.mark.skipif(bool(wan_available()), reason=wan_available() or "")
def test_a_namespace_link_is_limited_by_tbf_and_reaches_the_server_through_the_proxy():
    rate_mbit = 100
    n = 12_500_000 * 2      # 2 s at 100 Mbit/s
    with Wan(sites=1, rate_mbit=rate_mbit) as wan:
        srv, port = echo_server(wan.bridge_ip)   # straight over the link, no proxy
        try:
            site = wan.exec_prefix(0)
            for mode in ("sink", "send"):        # upload (the site's end), download (the bridge's port)
                seconds = timed_client(site, wan.bridge_ip, port, mode, n)
                mbit = n * 8 / seconds / 1e6
                assert 0.5 * rate_mbit < mbit < 1.1 * rate_mbit, (mode, mbit)
        finally:
            srv.close()
        # a service on the server's loopback is reached only through the proxy, delayed
        local, local_port = echo_server("127.0.0.1")
        try:
            proxy = wan.proxy(local_port, ONE_WAY_S)
            rtt = timed_client(wan.exec_prefix(0), wan.bridge_ip, proxy.port, "echo")
            assert 2 * ONE_WAY_S <= rtt < 2 * ONE_WAY_S + 0.15, rtt
            with pytest.raises(subprocess.CalledProcessError):   # the namespace's own loopback has no server
                timed_client(wan.exec_prefix(0), "127.0.0.1", local_port, "echo")
        finally:
            local.close()
    assert wan.namespaces[0] not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
