"""`pilot`: the front door. Each subcommand is a thin shell around a module that does the work."""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
from pathlib import Path

from pilot import coordination, settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def flwr_environment() -> dict[str, str]:
    """What `flwr` needs to find this project's connections (.flwr/config.toml) and stay offline."""
    return {
        "FLWR_HOME": str(PROJECT_ROOT / ".flwr"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # the app's dependencies are this environment's: no per-run `uv sync` (it would pull CUDA torch)
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


def cmd_config(args: argparse.Namespace) -> int:
    if args.update_files:
        settings.update_files(PROJECT_ROOT)
        print(f"updated {PROJECT_ROOT / 'pyproject.toml'} and {PROJECT_ROOT / 'README.md'}")
        return 0
    print(settings.reference_markdown(), end="")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    for name, value in flwr_environment().items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def cmd_redis(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir) if args.run_dir else coordination.default_run_dir(args.run_id)
    server = coordination.EmbeddedRedis(run_dir)
    if args.action == "start":
        url = server.ensure()
        print(f"embedded redis-server of {run_dir} is up; for other processes of this run:")
        print(f"export {coordination.REDIS_URL_ENV}={shlex.quote(url)}")
    elif args.action == "status":
        state = server.read_state()
        if state and server.alive(state):
            print(f"running: pid {state.pid}, 127.0.0.1:{state.port}, data in {server.dir}")
        else:
            print(f"not running (data in {server.dir})")
            return 1
    else:
        print("stopped" if server.stop() else "was not running")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415

    from pilot.energy import plan, sites, traces  # noqa: PLC0415 - pandas only for this subcommand

    try:
        site_map = sites.parse_site_map(args.sites) if args.sites else None
        result = plan.plan_files(args.trace, args.threshold, site_map, args.min_on * 60, args.min_off * 60)
    except (traces.TraceError, sites.ScenarioError) as error:
        print(f"pilot plan: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else plan.format_text(result), end="\n" if args.json else "")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Check the run configuration here, where the person typing sees the answer, then run `flwr run` with it.
    Ctrl-C (or SIGTERM) stops the whole run: the server checkpoints and ends, the site trainers and the embedded
    Redis stop, and for a local simulation the SuperLink, Ray and their processes go too."""
    import signal  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from pilot.ops import local, stop  # noqa: PLC0415

    try:
        run = settings.load(settings.parse_run_config(args.run_config or ""))
    except settings.SettingError as error:
        print(f"pilot run: refused: {error}", file=sys.stderr)
        return 2
    if "gpu" in args.connection and not gpu_present():
        print(f"pilot run: {args.connection} places each site on a GPU, and this machine has none (torch sees no "
              f"CUDA device): Flower would fail with 'exit code 700'. Run `pilot run local-simulation` for CPU sites, "
              f"or see `python bench/gpu_check.py` on a GPU machine.", file=sys.stderr)
        return 2
    command = ["flwr", "run", str(PROJECT_ROOT), args.connection, *(["--run-config", args.run_config] if args.run_config else []),
               *(["--stream"] if args.stream else [])]
    print("pilot run: run configuration checked; " + shlex.join(command), flush=True)
    env = {**flwr_environment(), **os.environ}
    child = subprocess.Popen(command, env=env, start_new_session=True)   # our Ctrl-C is handled here, in order
    interrupted: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, _frame: interrupted.append(number))
    while child.poll() is None and not interrupted:
        time.sleep(0.2)
    if not interrupted:
        return child.returncode
    print("\npilot run: stopping the run (the server checkpoints first; Ctrl-C again is ignored)", flush=True)
    run_dir = Path(run.run.run_dir) if run.run.run_dir else coordination.default_run_dir(run.run.run_id)
    try:
        stop.stop_run(run.run.run_id, run_dir, run.run.redis_url, reason="Ctrl-C on pilot run")
    except (stop.NoSuchRun, coordination.RedisUnavailable) as error:
        print(f"pilot run: {error}", flush=True)
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
    if args.connection.startswith("local-simulation"):   # its SuperLink runs Ray and the simulation
        local.stop_local_superlink(Path(env["FLWR_HOME"]))
    return 130


def gpu_present() -> bool:
    import torch  # noqa: PLC0415 - seconds to import: only for the GPU connections

    return torch.cuda.is_available()


def cmd_stop(args: argparse.Namespace) -> int:
    from pilot.ops import stop  # noqa: PLC0415

    try:
        stop.stop_run(args.run_id, Path(args.run_dir) if args.run_dir else None, timeout_s=args.timeout)
    except stop.NoSuchRun as error:
        print(f"pilot stop: {error}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pilot",
        description="Pilot: pretrain nanochat GPTs across GPU sites while their grids curtail renewables.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", help="print the run-settings reference (Markdown)")
    p.add_argument("--update-files", action="store_true",
                   help="rewrite the settings in pyproject.toml and README.md from pilot/settings.py")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("run", help="check a run configuration, then `flwr run . CONNECTION` with it",
                       description="`flwr run` refuses an unknown setting with only 'Invalid run configuration'; this "
                                   "checks every key, type and range first and names the closest known key.")
    p.add_argument("connection", help="a connection of .flwr/config.toml: local-simulation, local-deployment, ...")
    p.add_argument("--run-config", default="", help='settings as flwr takes them: \'lr=0.5 run-id="r1"\'')
    p.add_argument("--stream", action="store_true", help="stream the run's log (as flwr run --stream)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("stop", help="stop everything of a run on this machine: server, site trainers, Redis")
    p.add_argument("run_id", help="the run's id (run setting run-id)")
    p.add_argument("--run-dir", default="", help="its directory (default: $PILOT_HOME/runs/RUN_ID)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds the server may take to checkpoint and end")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("env", help="print the environment `flwr` needs for this project (eval \"$(pilot env)\")")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("redis", help="start, inspect or stop the embedded Redis of a run")
    p.add_argument("action", choices=["start", "status", "stop"])
    p.add_argument("--run-id", default="default", help="the run (default: default)")
    p.add_argument("--run-dir", default="",
                   help="run directory (default: $PILOT_RUN_DIR, else $PILOT_HOME/runs/RUN_ID, PILOT_HOME=~/.cache/pilot)")
    p.set_defaults(func=cmd_redis)

    p = sub.add_parser("plan", help="replay MOER traces without Redis: curtailment windows per site and overlap",
                       description="Replay MOER trace files (WattTime wide or long CSV) and print, per site, "
                                   "curtailed minutes and windows, and the minutes with 0, 1, 2, ... sites "
                                   "curtailed at once. A sample's value holds until the next sample.")
    p.add_argument("--trace", action="append", required=True, metavar="FILE",
                   help="MOER trace CSV (repeat for several files)")
    p.add_argument("--threshold", type=float, default=100.0,
                   help="curtailed while MOER is below this, lbs CO2/MWh (default 100)")
    p.add_argument("--sites", default="", metavar="NAME=REGION,...",
                   help="sites and their regions, e.g. client_0=CAISO_NORTH,client_1=SPP_TX "
                        "(default: one site per region column, client_0, client_1, ...)")
    p.add_argument("--min-on", type=float, default=0.0, metavar="MIN",
                   help="hysteresis: minutes the signal must stay curtailed before a window opens (default 0)")
    p.add_argument("--min-off", type=float, default=0.0, metavar="MIN",
                   help="hysteresis: minutes the signal must stay uncurtailed before a window closes (default 0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_plan)

    from pilot.ops import certs  # noqa: PLC0415 - cryptography only where the parser is built

    p = sub.add_parser("certs", help="CA, TLS certificates, Redis password and site keys of a secure deployment",
                       description="Create a deployment's CA, SuperLink/Redis/weights-server certificates, Redis "
                                   "password and per-site SuperNode keys (pilot certs --out DIR), or register the "
                                   "sites' public keys with a running SuperLink (pilot certs register --out DIR "
                                   "--connection NAME). See docs/deployment.md.")
    certs.add_arguments(p)
    p.set_defaults(func=certs.run)

    # subcommands with their own parsers (`pilot demo --help` and so on): listed here, run by their modules
    for name, (_, summary) in DELEGATED.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


DELEGATED = {
    "demo": ("pilot.ops.demo", "the whole system on this machine in one command: live progress, baseline, report"),
    "watch": ("pilot.ops.watch", "live progress of a run in the terminal (read from its Redis)"),
    "report": ("pilot.report.cli", "HTML report of a run directory: windows, regimes, learning curves, energy"),
    "provision": ("pilot.provision.cli", "bring sites' SuperNodes up and down with their windows (local, Kubernetes)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except coordination.RedisUnavailable as error:
        print(f"pilot: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
