"""An emulated WAN on this one machine, for benchmarks (bench/utilisation.py) and their tests.

    bandwidth   every site lives in its own network namespace, joined to the root namespace by a veth pair
                whose root end is a port of one bridge (the server's side, BRIDGE_IP); a `tc ... tbf` qdisc on
                both ends limits each direction to the link's rate (netem is absent from these kernels)
    latency     a delaying TCP proxy of our own (DelayProxy), in the root namespace on the bridge address: it
                forwards to a service on 127.0.0.1 and releases every byte one_way_s after it arrived, in each
                direction, with a buffer far above the bandwidth-delay product (it adds delay, never a rate
                limit); connections from the root namespace itself (the server's own) pass undelayed

Server-side services listen on 127.0.0.1 only; a namespace has its own loopback, so a site reaches the server
only through the proxy on the bridge address (a forgotten 127.0.0.1 address fails loudly at the site).

    with Wan(sites=2, rate_mbit=1000) as wan:           # root only: `ip netns`, `tc`
        wan.proxy(port, one_way_s=0.05)                  # BRIDGE_IP:port -> 127.0.0.1:port, delayed
        subprocess.Popen(wan.exec_prefix(0) + ["cmd", ...])

What is not emulated: packet loss, and TCP's own dynamics over a long path (each TCP connection ends at the
proxy, so slow start and window growth see the short local round trip; every request/response still pays the
full round trip).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence

PROXY_BUFFER_BYTES = 64 << 20     # per direction and connection: >> 1 Gbit/s x 100 ms (12.5 MB)
READ_BYTES = 1 << 20


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check)


def wan_available() -> str:
    """"" if network namespaces and tc tbf work here, else why not (for skipping)."""
    if os.geteuid() != 0:
        return "not root: network namespaces need root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "no ip/tc commands"
    name = f"pwchk{os.getpid() % 100000}"
    try:
        made = run("ip", "netns", "add", name, check=False)
        if made.returncode != 0:
            return f"ip netns add failed: {made.stderr.strip()}"
        tbf = run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "100mbit",
                  "burst", "64kb", "limit", "1mb", check=False)
        if tbf.returncode != 0:
            return f"tc tbf failed: {tbf.stderr.strip()}"
        return ""
    finally:
        run("ip", "netns", "del", name, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.213-10.250 that no interface of this machine uses."""
    used = run("ip", "-4", "-o", "addr", check=False).stdout
    used_nets = [ipaddress.ip_interface(w).network for line in used.splitlines() for w in line.split()
                 if "/" in w and w[0].isdigit()]
    start = os.getpid() % 2000
    for i in range(2000):
        n = (start + i) % 2000
        net = ipaddress.ip_network(f"10.{213 + n // 250 % 38}.{n % 250}.0/24")
        if not any(net.overlaps(u) for u in used_nets):
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet for the emulated WAN")


def tbf_args(rate_mbit: float) -> list[str]:
    """tbf at `rate_mbit`: a burst of ~1 ms at that rate (>= 64 KB, so GSO packets pass), a queue of ~20 ms."""
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(64 * 1024, int(rate_bytes / 1000))
    limit = max(1 << 20, int(rate_bytes * 0.02))
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "limit", str(limit)]


class Wan:
    """`sites` network namespaces behind one bridge, each link limited to rate_mbit in both directions."""

    def __init__(self, sites: int, rate_mbit: float | None, tag: str | None = None):
        self.sites, self.rate_mbit = sites, rate_mbit
        tag = tag or f"{os.getpid() % 100000}"
        self.bridge = f"pwbr{tag}"[:15]
        self.namespaces = [f"pilotwan-{tag}-{i}" for i in range(sites)]
        self.host_veths = [f"pwh{tag}x{i}"[:15] for i in range(sites)]
        self.proxies: list[DelayProxy] = []
        self._up = False
        self.net = _free_subnet()
        hosts = list(self.net.hosts())
        self.bridge_ip = str(hosts[0])
        self.site_ips = [str(hosts[10 + i]) for i in range(sites)]

    # -------------------------------------------------------------- life
    def __enter__(self) -> Wan:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        atexit.register(self.down)
        self._up = True
        prefix = self.net.prefixlen
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{self.bridge_ip}/{prefix}", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        for i, ns in enumerate(self.namespaces):
            host = self.host_veths[i]
            run("ip", "netns", "add", ns)
            run("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "link", "set", host, "master", self.bridge)
            run("ip", "link", "set", host, "up")
            run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.site_ips[i]}/{prefix}", "dev", "eth0")
            run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            if self.rate_mbit:
                # download: the bridge's port toward the site; upload: the site's own end
                run("tc", "qdisc", "add", "dev", host, "root", *tbf_args(self.rate_mbit))
                run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", *tbf_args(self.rate_mbit))

    def down(self) -> None:
        """Stop the proxies, every process left in the namespaces, the namespaces and the bridge (idempotent)."""
        if not self._up:
            return
        self._up = False
        for proxy in self.proxies:
            proxy.close()
        for ns in self.namespaces:
            kill_namespace_processes(ns)
            run("ip", "netns", "del", ns, check=False)
        run("ip", "link", "del", self.bridge, check=False)
        with contextlib.suppress(Exception):
            atexit.unregister(self.down)

    # -------------------------------------------------------------- use
    def exec_prefix(self, site: int) -> list[str]:
        """Prefix of a command line that runs it inside site `site`'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[site]]

    def proxy(self, port: int, one_way_s: float, target_port: int | None = None) -> DelayProxy:
        """BRIDGE_IP:port -> 127.0.0.1:target_port (default: the same port), one_way_s each way for the sites."""
        proxy = DelayProxy((self.bridge_ip, port), ("127.0.0.1", target_port or port), one_way_s,
                           undelayed_peers={self.bridge_ip}).start()
        self.proxies.append(proxy)
        return proxy


def namespace_pids(ns: str) -> list[int]:
    out = run("ip", "netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def kill_namespace_processes(ns: str, grace_s: float = 5.0) -> None:
    """SIGTERM every process of namespace `ns` (the ones we started there), SIGKILL what is left after grace_s."""
    pids = namespace_pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while namespace_pids(ns) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in namespace_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------ the delaying proxy
class _Pipe:
    """One direction of a connection: a reader thread stamps what arrives, a writer sends it when it is due."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay_s: float, on_close):
        self.src, self.dst, self.delay = src, dst, delay_s
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.cond = threading.Condition()
        self.on_close = on_close
        self.bytes = 0

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(READ_BYTES)
                with self.cond:
                    while self.queued > PROXY_BUFFER_BYTES:   # back-pressure, far above the delay x the rate
                        self.cond.wait()
                    self.queue.append((time.monotonic() + self.delay, data))
                    self.queued += len(data)
                    self.cond.notify_all()
                if not data:
                    return
        except OSError:
            with self.cond:
                self.queue.append((time.monotonic(), b""))
                self.cond.notify_all()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue:
                        self.cond.wait()
                    due, data = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                with self.cond:
                    self.queue.popleft()
                    self.queued -= len(data)
                    self.cond.notify_all()
                if not data:
                    with contextlib.suppress(OSError):
                        self.dst.shutdown(socket.SHUT_WR)
                    break
                self.dst.sendall(data)
                self.bytes += len(data)
        except OSError:
            pass
        self.on_close()


class DelayProxy:
    """TCP proxy listen -> target that delays every byte by one_way_s in each direction (connections from
    `undelayed_peers` pass without delay). Threads: one acceptor, two per direction of a connection."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], one_way_s: float,
                 undelayed_peers: Sequence[str] = ()):
        self.listen, self.target, self.one_way_s = listen, target, one_way_s
        self.undelayed = set(undelayed_peers)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(listen)
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.connections = 0

    def start(self) -> DelayProxy:
        threading.Thread(target=self._accept, daemon=True, name=f"proxy-{self.port}").start()
        return self

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, (peer, _) = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            delay = 0.0 if peer in self.undelayed else self.one_way_s
            with self._lock:
                self._conns.update((client, upstream))
                self.connections += 1
            done = {"n": 0}

            def closed(client=client, upstream=upstream, done=done) -> None:
                with self._lock:
                    done["n"] += 1
                    if done["n"] < 2:
                        return
                    self._conns.difference_update((client, upstream))
                for s in (client, upstream):
                    with contextlib.suppress(OSError):
                        s.close()

            _Pipe(client, upstream, delay, closed).start()
            _Pipe(upstream, client, delay, closed).start()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
