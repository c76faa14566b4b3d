"""Seconds to bring N sites up and down with the local provisioner: in parallel (the controller's default)
against one site at a time (max_parallel=1), side by side.

A real flower-superlink on loopback; each site is a real flower-supernode that counts as up once the
SuperLink has accepted it. `--startup-delay` adds a modelled machine boot to every open (the reason to
provision in parallel: boots overlap). Each row is the median of `--repeats` runs.

    .venv/bin/python bench/provision.py [--sites 3] [--repeats 3] [--startup-delay 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pilot.coordination import free_port
from pilot.provision.controller import ProvisionController, RetryPolicy
from pilot.provision.local import LocalProvisioner
from pilot.provision.sites import parse_sites
from pilot.site.process import family, stop_processes

VENV_BIN = Path(sys.executable).parent


def flower_env(home: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(home),
            "FLWR_HOME": str(home / "flwr"), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def wait_settled(controller: ProvisionController, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not controller.settled():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not settled after {timeout_s} s: {controller.states()}")
        time.sleep(0.02)


def one_run(address: str, env: dict[str, str], names: list[str], log_dir: Path, parallel: int,
            startup_delay: float) -> dict[str, float]:
    """Seconds from the windows opening to every site up, then from closing to every site down."""
    opens: list[float] = []
    lock = threading.Lock()

    def on_event(kind: str, fields: dict) -> None:
        if kind == "provision-done" and fields["op"] == "open":
            with lock:
                opens.append(fields["seconds"])
        if kind == "provision-failed":
            print(f"  failed: {fields}", file=sys.stderr)

    prov = LocalProvisioner(parse_sites(",".join(names)), address, log_dir=log_dir, env=env,
                            startup_delay_s=startup_delay)
    controller = ProvisionController(prov, names, on_event=on_event, max_parallel=parallel,
                                     policy=RetryPolicy(open_timeout_s=60, backoff_base_s=0.5))
    try:
        started = time.monotonic()
        controller.reconcile(names)
        wait_settled(controller)
        up = time.monotonic() - started
        started = time.monotonic()
        controller.reconcile(())
        wait_settled(controller)
        down = time.monotonic() - started
    finally:
        controller.close(timeout_s=60)
    return {"up": up, "down": down, "open_site": statistics.median(opens)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--startup-delay", type=float, default=2.0, help="modelled boot seconds per site")
    args = parser.parse_args()
    names = [f"client_{i}" for i in range(args.sites)]
    with tempfile.TemporaryDirectory(prefix="provision-bench-") as tmp:
        home = Path(tmp)
        env = flower_env(home)
        port = free_port()
        link = subprocess.Popen([str(VENV_BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                 str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        address = f"127.0.0.1:{port}"
        try:
            one_run(address, env, names[:1], home / "warmup", 1, 0.0)   # the SuperLink is up, caches warm
            results = {}
            for label, parallel in (("one at a time", 1), ("parallel", args.sites)):
                runs = [one_run(address, env, names, home / f"{label}-{i}", parallel, args.startup_delay)
                        for i in range(args.repeats)]
                results[label] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        finally:
            stop_processes(family(link.pid))
            link.wait(timeout=10)
    base = results["one at a time"]
    print(f"{args.sites} sites, startup delay {args.startup_delay:g} s, median of {args.repeats} runs, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'mode':<15}{'all up (s)':>12}{'ratio':>8}{'all down (s)':>14}{'ratio':>8}{'one open (s)':>14}")
    for label, r in results.items():
        print(f"{label:<15}{r['up']:>12.2f}{r['up'] / base['up']:>8.2f}{r['down']:>14.2f}"
              f"{r['down'] / base['down']:>8.2f}{r['open_site']:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
