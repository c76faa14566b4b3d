"""The local provisioner: each site a flower-supernode process on this host, with its own GPU set."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis

from pilot import coordination
from pilot.provision.controller import (
    CLOSE_TIMEOUT_S,
    DRAIN_TIMEOUT_S,
    OPEN_TIMEOUT_S,
    READY_MARKER,
    STOP_TIMEOUT_S,
    ProvisionCancelled,
    ProvisionError,
)
from pilot.provision.sites import SiteSpec, check_sites
from pilot.site.process import alive, drain_trainer, family, find_trainers, stop_processes, stop_trainer


@dataclass
class LocalNode:
    process: subprocess.Popen
    log_path: Path
    log_offset: int
    port: int
    ready: bool = False
    known: list[psutil.Process] = field(default_factory=list)   # its family when it came up (psutil checks
                                                                # a PID's start time: no PID-reuse mistakes)


class LocalProvisioner:
    """Each site is a `flower-supernode` process on this host (its own process group, its own ClientAppIo
    port, `CUDA_VISIBLE_DEVICES` = the site's GPU set, empty for CPU). Closing a site lets its trainer hand
    in its work, asks it to shut down (inbox "shutdown"), and stops the SuperNode, the trainer and every
    process either started (SIGTERM, then SIGKILL): nothing outlives the window."""

    def __init__(self, sites: Sequence[SiteSpec], superlink: str, *, log_dir: str | Path, run_id: str = "",
                 redis_client: redis.Redis | None = None, startup_delay_s: float = 0.0,
                 root_certificates: str | Path | None = None, auth_key_dir: str | Path | None = None,
                 supernode: Sequence[str] = ("flower-supernode",), env: dict[str, str] | None = None,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S, stop_timeout_s: float = STOP_TIMEOUT_S):
        self.sites = {s.name: s for s in check_sites(list(sites), "LocalProvisioner")}
        self.superlink = superlink
        self.log_dir = Path(log_dir)
        self.run_id = run_id
        self.r = redis_client
        self.startup_delay_s = startup_delay_s
        self.root_certificates = Path(root_certificates) if root_certificates else None
        self.auth_key_dir = Path(auth_key_dir) if auth_key_dir else None
        self.supernode = list(supernode)
        self.env = env
        self.drain_timeout_s = drain_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.nodes: dict[str, LocalNode] = {}
        self.lock = threading.Lock()

    # -------------------------------------------------------------- pure parts
    def command(self, site: str, port: int) -> list[str]:
        """The site's SuperNode command line (the seed's --node-config form, its own ClientAppIo port)."""
        spec = self.sites[site]
        if self.root_certificates is None:
            security = ["--insecure"]
        else:
            security = ["--root-certificates", str(self.root_certificates)]
            if self.auth_key_dir is not None:
                security += ["--auth-supernode-private-key", str(self.auth_key_dir / site)]
        return [*self.supernode, *security, "--superlink", self.superlink, "--port", str(port),
                "--node-config", f'name="{site}" partition-id={spec.partition_id}']

    def environment(self, site: str) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in self.sites[site].gpu_ids)   # "": no GPU (CPU)
        binary = shutil.which(self.supernode[0], path=env.get("PATH"))
        if binary:  # the SuperNode starts flower-superexec by name: it must find it beside itself
            env["PATH"] = os.pathsep.join([str(Path(binary).parent), env.get("PATH", "")])
        return env

    # -------------------------------------------------------------- the interface
    def open_site(self, site: str, *, timeout_s: float = OPEN_TIMEOUT_S,
                  cancel: threading.Event | None = None) -> None:
        if site not in self.sites:
            raise ProvisionError(f"unknown site {site!r}; known: {sorted(self.sites)}")
        cancel = cancel or threading.Event()
        with self.lock:
            node = self.nodes.get(site)
            if node is not None and node.process.poll() is None and node.ready:
                return
        if node is not None:
            self._stop_node(site)
        if cancel.wait(self.startup_delay_s):   # models a real machine's boot; a closed window stops the wait
            raise ProvisionCancelled(f"{site}: window closed before the node started")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{site}.supernode.log"
        port = coordination.free_port()
        with open(log_path, "ab") as log:
            offset = log.tell()
            try:
                process = subprocess.Popen(self.command(site, port), stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=self.environment(site),
                                           start_new_session=True)
            except OSError as error:
                raise ProvisionError(f"{site}: cannot start {self.supernode[0]}: {error}") from None
        node = LocalNode(process, log_path, offset, port)
        with self.lock:
            self.nodes[site] = node
        deadline = time.monotonic() + timeout_s
        while True:
            if READY_MARKER in self._log_since(node):
                node.ready, node.known = True, family(process.pid)
                return
            code = process.poll()
            if code is not None:
                tail = self._log_since(node).decode(errors="replace").strip().splitlines()[-3:]
                self._stop_node(site)
                raise ProvisionError(f"{site}: SuperNode exited with code {code}: {' | '.join(tail) or 'no output'}")
            if cancel.is_set():
                self._stop_node(site)
                raise ProvisionCancelled(f"{site}: window closed while the node was starting")
            if time.monotonic() > deadline:
                self._stop_node(site)
                raise ProvisionError(f"{site}: SuperNode not connected to {self.superlink} after {timeout_s:g} s "
                                     f"(log: {log_path})")
            time.sleep(0.1)

    def close_site(self, site: str, *, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        if site not in self.sites:
            raise ProvisionError(f"unknown site {site!r}; known: {sorted(self.sites)}")
        if self.r is not None and self.run_id:
            drain_trainer(self.r, self.run_id, site, min(self.drain_timeout_s, timeout_s / 2))
        self._stop_node(site)        # first: no ClientApp of it can start a new trainer afterwards
        self._stop_trainer(site)
        left = [p.pid for p in self.trainer_processes(site)]
        if left:
            raise ProvisionError(f"{site}: trainer processes {left} survived SIGKILL")

    def status(self, site: str) -> str:
        with self.lock:
            node = self.nodes.get(site)
        if node is None or node.process.poll() is not None:
            return "down"
        return "up" if node.ready else "starting"

    def pids(self, site: str) -> list[int]:
        """The site's processes now: its SuperNode with everything it started, and its trainer processes."""
        with self.lock:
            node = self.nodes.get(site)
        procs = family(node.process.pid) if node is not None and node.process.poll() is None else []
        return sorted({p.pid for p in procs} | {p.pid for p in self.trainer_processes(site)})

    def close(self) -> None:
        """Stop every site (for a shell that exits without a controller)."""
        for site in self.sites:
            self.close_site(site)

    # -------------------------------------------------------------- internals
    def _log_since(self, node: LocalNode) -> bytes:
        with open(node.log_path, "rb") as log:
            log.seek(node.log_offset)
            return log.read()

    def _stop_node(self, site: str) -> None:
        with self.lock:
            node = self.nodes.pop(site, None)
        if node is None:
            return
        # its family now, and what it had started when it came up (children of a SuperNode that died are
        # nobody's children anymore)
        procs = {p.pid: p for p in [*node.known, *family(node.process.pid)] if alive(p)}
        stop_processes(list(procs.values()), self.stop_timeout_s)
        try:
            node.process.wait(timeout=5)    # reap it: no zombie left behind
        except subprocess.TimeoutExpired:
            pass

    def trainer_processes(self, site: str) -> list[psutil.Process]:
        """The site's trainer processes on this host (one still starting has registered nothing yet)."""
        return find_trainers(site, self.run_id) if self.run_id else []

    def _stop_trainer(self, site: str) -> None:
        if self.run_id:
            stop_trainer(self.r, self.run_id, site, self.stop_timeout_s)
