"""Seconds and peak memory to synchronise a d20-sized model between a server and 1 or 2 sites on loopback.

One sync, there and back: the server has the round's global weights (fp32); every site gets them and sends
its update back. Side by side in one run, every party its own process (peak RSS = its VmHWM):

  (d) floor       a raw loopback TCP socket moves the same bytes (fp32 both ways), no hashing, no tensors
  (b) fp32        the blob data plane (pilot/dataplane/): the server publishes (one hash pass), each site fetches
                  into its staging buffer (verified), loads it into its live model, trains (not timed), and
                  uploads its fp32 weights (verified by the server)
  (c) bf16 delta  the same, but the site uploads the pseudo-gradient start - end in bf16 (pilot/dataplane/payload.py,
                  written over its staging buffer) and the server decodes it to fp32 weights
  (a) Flower      Flower's message path (deployment: flower-superlink + one flower-supernode per site; the
                  ServerApp of bench/flower_sync sends an ArrayRecord and times until every ClientApp sent
                  it back). Needs ~12 GB at d20 for one site: see --flower-layers.

The machine may be shared: each data-plane path runs --rounds syncs (5) and the table shows the best after
the first (steady state: buffers reused), the first in brackets; the floor is the best of as many.
Ratios are against the floor with the same number of sites.

    .venv/bin/python bench/sync.py                               # d20 (20 layers), 1 and 2 sites, all paths
    .venv/bin/python bench/sync.py --layers 4 --skip-flower      # smaller and without Flower
    .venv/bin/python bench/sync.py --flower-layers 4             # Flower at 4 layers, the rest at d20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE / "flower_sync"))
from sync_app import d20_like_state, param_count, peak_rss_bytes  # noqa: E402  (the one definition of the d20 shapes)

sys.path.insert(0, str(ROOT))
from pilot.coordination import wait_for_port  # noqa: E402

TOKEN = "bench-token"
SOCKET_CHUNK = 4 << 20
WORKER_THREADS = 1      # torch threads per worker process: 2 cores are shared by server and sites
GB = 1e9


# ====================================================================== worker processes
# Each party runs `sync.py --worker ROLE`: it reads one command a line on stdin and answers one JSON line.
class Floor:
    """Both ends of the raw socket floor: no torch, 4 MB buffers, bytes in and out."""

    def __init__(self) -> None:
        self.listener: socket.socket | None = None
        self.threads: list[threading.Thread] = []

    def listen(self, sites: str, nbytes: str) -> dict:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.threads = [threading.Thread(target=self._serve_one, args=(int(nbytes),)) for _ in range(int(sites))]
        for thread in self.threads:
            thread.start()
        return {"port": self.listener.getsockname()[1]}

    def _serve_one(self, nbytes: int) -> None:
        assert self.listener is not None
        conn, _ = self.listener.accept()
        with conn:
            send_bytes(conn, nbytes)
            recv_bytes(conn, nbytes)

    def wait(self) -> dict:
        for thread in self.threads:
            thread.join()
        return {}

    def exchange(self, port: str, nbytes: str) -> dict:
        """A site: receive nbytes, send them back."""
        with socket.create_connection(("127.0.0.1", int(port))) as conn:
            recv_bytes(conn, int(nbytes))
            send_bytes(conn, int(nbytes))
        return {}


def send_bytes(conn: socket.socket, nbytes: int) -> None:
    payload = memoryview(bytearray(SOCKET_CHUNK))
    sent = 0
    while sent < nbytes:
        n = min(SOCKET_CHUNK, nbytes - sent)
        conn.sendall(payload[:n])
        sent += n


def recv_bytes(conn: socket.socket, nbytes: int) -> None:
    buffer = bytearray(SOCKET_CHUNK)
    got = 0
    while got < nbytes:
        n = conn.recv_into(buffer, min(SOCKET_CHUNK, nbytes - got))
        if not n:
            raise ConnectionError(f"peer closed after {got} of {nbytes} bytes")
        got += n


class BlobSide:
    """The server side of the data plane: global weights, a BlobServer, decoding of the updates."""

    def __init__(self, layers: int) -> None:
        import torch

        from pilot.dataplane.server import BlobServer
        from pilot.dataplane.store import BlobStore

        torch.set_num_threads(WORKER_THREADS)
        self.weights = d20_like_state(layers)
        self.store = BlobStore()
        self.server = BlobServer(self.store, token=TOKEN).start()
        self.decoded: dict | None = None   # one fp32 buffer for decoded bf16 updates, reused

    def publish(self) -> dict:
        self.store.retain(set())
        self.weights["lm_head.weight"][0, 0] += 1e-3  # a new round: new global weights, a new digest
        digest = self.store.publish(self.weights)
        return {"url": self.server.url, "digest": digest}

    def collect(self, kind: str, *digests: str) -> dict:
        """Every site's update is in the store (each upload returned once the server had verified it):
        turn each into fp32 weights, as the aggregation does, then keep its memory for the next round."""
        import torch

        from pilot.dataplane.payload import decode_update

        for digest in digests:
            blob = self.store.get(digest)
            assert blob is not None and blob.metadata.get("payload") == kind, f"update {digest[:12]} missing"
            if kind == "delta-bf16" and self.decoded is None:
                self.decoded = {k: torch.empty_like(v) for k, v in self.weights.items()}
            weights = decode_update(blob.tensors, self.weights, kind, out=self.decoded)
            assert weights["lm_head.weight"].dtype == torch.float32
            self.store.recycle(digest)
        return {}


class BlobSite:
    """A site of the data plane: its live model and one staging buffer (two copies of the model)."""

    def __init__(self, layers: int, index: int) -> None:
        import torch

        torch.set_num_threads(WORKER_THREADS)
        self.index = index
        self.live = d20_like_state(layers)
        self.staging = {k: torch.zeros_like(v) for k, v in self.live.items()}  # memory touched, as a live one

    def fetch(self, url: str, digest: str) -> dict:
        from pilot.dataplane.client import fetch_blob

        fetch_blob(url, digest, token=TOKEN, into=self.staging)
        for name, tensor in self.live.items():  # set_weights: the round starts from the global model
            tensor.copy_(self.staging[name])
        return {}

    def train(self) -> dict:
        for tensor in self.live.values():  # stands in for the round's optimizer steps (not timed)
            tensor.mul_(0.999).add_(1e-4 * self.index)  # every site ends somewhere else
        return {}

    def upload(self, url: str, kind: str) -> dict:
        from pilot.dataplane.blob import TensorBlob
        from pilot.dataplane.client import upload_blob
        from pilot.dataplane.payload import encode_update

        # bf16: the delta is written over the staging buffer (no third copy); fp32: the live weights themselves
        payload = encode_update(self.staging, self.live, kind, reuse_start=kind == "delta-bf16")
        return {"digest": upload_blob(url, TensorBlob(payload, {"payload": kind}), token=TOKEN)}


def worker(role: str, layers: int, index: int) -> None:
    party = Floor() if role == "floor" else BlobSide(layers) if role == "server" else BlobSite(layers, index)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "quit":
            break
        answer = {"peak_rss": peak_rss_bytes()} if command == "rss" else getattr(party, command)(*args)
        print(json.dumps(answer), flush=True)


# ====================================================================== the orchestrator
class Party:
    """A worker process and its command line."""

    def __init__(self, role: str, layers: int, index: int):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", role, "--layers", str(layers),
                                      "--index", str(index)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def send(self, *words: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[3]} died (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, *words: object) -> dict:
        self.send(*words)
        return self.answer()

    def close(self) -> int:
        peak = self.ask("rss")["peak_rss"]
        self.send("quit")
        self.proc.wait(timeout=60)
        return peak


def all_at_once(parties: list[Party], *words: object) -> tuple[float, list[dict]]:
    """Send one command to every party, wait for every answer: seconds until the last one."""
    start = time.perf_counter()
    for party in parties:
        party.send(*words)
    answers = [party.answer() for party in parties]
    return time.perf_counter() - start, answers


@contextlib.contextmanager
def parties(roles: list[str], layers: int) -> Iterator[list[Party]]:
    started: list[Party] = []
    try:
        for index, role in enumerate(roles):
            started.append(Party(role, layers, index))
        for party in started:
            party.answer()  # ready: all start at once (importing torch takes seconds)
        yield started
    finally:
        for party in started:
            if party.proc.poll() is None:
                party.proc.kill()


def run_floor(sites: int, nbytes: int, repeats: int) -> dict:
    with parties(["floor"] * (1 + sites), layers=0) as (server, *site_parties):
        times = []
        for _ in range(repeats):
            port = server.ask("listen", sites, nbytes)["port"]
            seconds, _ = all_at_once(site_parties, "exchange", port, nbytes)
            server.ask("wait")
            times.append(seconds)
        return {"seconds": min(times), "rounds": times, "server_rss": [("server", server.close())],
                "site_rss": [("site", max(p.close() for p in site_parties))]}


def run_data_plane(sites: int, layers: int, kind: str, rounds: int) -> dict:
    """`rounds` syncs in the same processes; the best after the first (steady state: memory reused)."""
    with parties(["server"] + ["site"] * sites, layers) as (server, *site_parties):
        history = []
        for _ in range(rounds):
            phases = {}
            start = time.perf_counter()
            published = server.ask("publish")
            phases["publish"] = time.perf_counter() - start
            phases["fetch"], _ = all_at_once(site_parties, "fetch", published["url"], published["digest"])
            all_at_once(site_parties, "train")
            phases["upload"], uploaded = all_at_once(site_parties, "upload", published["url"], kind)
            started = time.perf_counter()
            server.ask("collect", kind, *[u["digest"] for u in uploaded])
            phases["decode"] = time.perf_counter() - started
            history.append(phases)
        best = min(history[1:] or history, key=lambda p: sum(p.values()))
        return {"seconds": sum(best.values()), "rounds": [sum(p.values()) for p in history], "phases": best,
                "server_rss": [("server", server.close())],
                "site_rss": [("site", max(p.close() for p in site_parties))]}


# ---------------------------------------------------------------------- Flower's message path
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vmhwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakSampler(threading.Thread):
    """Peak RSS (VmHWM) of some processes and all their descendants, by role, sampled every 0.2 s (a
    ClientApp process exits after its message: its last sample is its peak up to then)."""

    def __init__(self, roots: dict[str, int]):
        super().__init__(daemon=True)
        self.roots, self.peaks, self.stop = roots, {}, threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            for role, pid in self.roots.items():
                with contextlib.suppress(psutil.Error):
                    self._note(role, pid)
                    for child in psutil.Process(pid).children(recursive=True):
                        name = " ".join(child.cmdline()[:2])
                        kind = "ServerApp" if "serverapp" in name else "ClientApp" if "clientapp" in name else \
                            f"{role} child"
                        self._note(kind, child.pid)
            self.stop.wait(0.2)

    def _note(self, role: str, pid: int) -> None:
        self.peaks[role] = max(self.peaks.get(role, 0), vmhwm(pid))


def run_flower(sites: int, layers: int, dtype: str, timeout: float) -> dict:
    """A SuperLink and `sites` SuperNodes on loopback, one run of bench/flower_sync: its seconds and peaks."""
    with tempfile.TemporaryDirectory(prefix="pilot-sync-flower-") as tmp:
        home = Path(tmp)
        port = free_port()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n[superlink.bench]\n'
                                          f'address = "127.0.0.1:{port}"\ninsecure = true\n')
        env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env, "cwd": tmp}
        procs = {"SuperLink": subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"], **quiet)}
        try:
            wait_for_port(port)
            for i in range(sites):
                procs[f"SuperNode {i}"] = subprocess.Popen(
                    [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                     "--port", str(free_port()), "--node-config", f'name="client_{i}"'], **quiet)
            sampler = PeakSampler({role: p.pid for role, p in procs.items()})
            sampler.start()
            result = home / "result.json"
            config = f'layers={layers} dtype="{dtype}" sites={sites} result="{result}" timeout={timeout}'
            run = subprocess.run([str(BIN / "flwr"), "run", str(HERE / "flower_sync"), "bench", "--run-config",
                                  config, "--stream"], capture_output=True, text=True, env=env, timeout=timeout + 60)
            deadline = time.monotonic() + 30
            while not result.exists() and time.monotonic() < deadline:
                time.sleep(0.5)
            sampler.stop.set()
            sampler.join()
            if not result.exists():
                raise RuntimeError(f"the Flower run wrote no result:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
            measured = json.loads(result.read_text())
        finally:
            for proc in procs.values():
                proc.kill()
                proc.wait()
    peaks = sampler.peaks
    clientapp = max([peaks.get("ClientApp", 0), *measured["clientapp_peak_rss"]])
    supernode = max(v for k, v in peaks.items() if k.startswith("SuperNode ") and "child" not in k)
    return {"seconds": measured["seconds"], "rounds": [measured["seconds"]],
            "server_rss": [("ServerApp", max(measured["serverapp_peak_rss"], peaks.get("ServerApp", 0))),
                           ("SuperLink", peaks.get("SuperLink", 0))],
            "site_rss": [("SuperNode", supernode), ("ClientApp", clientapp)]}


# ---------------------------------------------------------------------- the table
def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_text(pairs: list[tuple[str, int]]) -> str:
    return ", ".join(f"{name} {rss / GB:.2f}" for name, rss in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20, help="transformer blocks (20: d20, 560,988,160 params)")
    parser.add_argument("--sites", default="1,2", help="site counts to run, comma-separated")
    parser.add_argument("--rounds", type=int, default=5,
                        help="syncs per data-plane path (the best after the first is shown; the floor: best of as many)")
    parser.add_argument("--skip-flower", action="store_true", help="leave out Flower's message path")
    parser.add_argument("--flower-layers", type=int, default=None,
                        help="blocks for the Flower path (default: --layers; d20 there needs ~12 GB per site)")
    parser.add_argument("--flower-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--flower-timeout", type=float, default=600.0, help="seconds for one Flower round trip")
    parser.add_argument("--worker", choices=["floor", "server", "site"], help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.layers, args.index)

    import torch

    params = param_count(args.layers)
    fp32_bytes, bf16_bytes = 4 * params, 2 * params
    flower_layers = args.layers if args.flower_layers is None else args.flower_layers
    flower_bytes = param_count(flower_layers) * (4 if args.flower_dtype == "float32" else 2)
    print(f"state: {args.layers} layers, {params:,} parameters, {fp32_bytes / GB:.2f} GB fp32; "
          f"torch {torch.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"{available_bytes() / GB:.1f} GB available")

    rows = []
    for sites in [int(s) for s in args.sites.split(",")]:
        plan = [("(d) raw loopback socket (floor)", 2 * fp32_bytes, partial(run_floor, sites, fp32_bytes, args.rounds), 0),
                ("(b) data plane, fp32 weights", 2 * fp32_bytes,
                 partial(run_data_plane, sites, args.layers, "weights-fp32", args.rounds), (1 + 3 * sites) * fp32_bytes),
                ("(c) data plane, bf16 delta", fp32_bytes + bf16_bytes,
                 partial(run_data_plane, sites, args.layers, "delta-bf16", args.rounds), (2.5 + 2.5 * sites) * fp32_bytes)]
        if not args.skip_flower:
            label = f"(a) Flower messages, {args.flower_dtype}"
            if flower_layers != args.layers:
                label += f" at {flower_layers} layers"
            plan.append((label, 2 * flower_bytes,
                         partial(run_flower, sites, flower_layers, args.flower_dtype, args.flower_timeout),
                         (4 + 3 * sites) * flower_bytes))
        floor = None
        for label, moved, run, needs in plan:
            if needs > available_bytes():
                print(f"skipped {label}, {sites} site(s): needs ~{needs / GB:.0f} GB, "
                      f"{available_bytes() / GB:.1f} GB available", flush=True)
                continue
            print(f"running {label}, {sites} site(s) ...", flush=True)
            result = run()
            if floor is None:
                floor = result["seconds"]
            # the floor moves fp32 both ways: compare a smaller Flower state per byte
            scale = moved / (2 * fp32_bytes) if "Flower" in label and flower_layers != args.layers else 1.0
            rows.append((label, sites, moved, result, result["seconds"] / (floor * scale)))
            detail = "  ".join(f"{k} {v:.2f}" for k, v in result.get("phases", {}).items())
            every = " ".join(f"{t:.2f}" for t in result["rounds"])
            print(f"  {result['seconds']:.2f} s  {detail}  (every try: {every})", flush=True)

    print()
    print(f"{'path':<44} {'sites':>5} {'GB/site':>7} {'seconds':>8} {'x floor':>7}  "
          f"{'server-side peak RSS GB':<32} site-side peak RSS GB (per process)")
    for label, sites, moved, result, ratio in rows:
        seconds = f"{result['seconds']:.2f}"
        first = f" (first round {result['rounds'][0]:.2f})" if "phases" in result else ""
        print(f"{label:<44} {sites:>5} {moved / GB:>7.2f} {seconds:>8} {ratio:>7.1f}  "
              f"{rss_text(result['server_rss']):<32} {rss_text(result['site_rss'])}{first}")
    print("\nseconds: one sync there and back (publish, fetch + load, upload, decode), all sites at once; "
          "x floor: against the raw socket with as many sites" + (
              ", per byte where Flower ran a smaller state" if flower_layers != args.layers else "") + ".")


if __name__ == "__main__":
    main()
