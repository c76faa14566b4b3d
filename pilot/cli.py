"""`pilot`: the front door. Each subcommand is a thin shell around a module that does the work."""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
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
    """Check the run configuration here, where the person typing sees the answer, then hand over to flwr."""
    try:
        settings.load(settings.parse_run_config(args.run_config or ""))
    except settings.SettingError as error:
        print(f"pilot run: refused: {error}", file=sys.stderr)
        return 2
    command = ["flwr", "run", str(PROJECT_ROOT), args.connection, *(["--run-config", args.run_config] if args.run_config else []),
               *(["--stream"] if args.stream else [])]
    print("pilot run: run configuration checked; " + shlex.join(command), flush=True)
    os.environ.update({k: v for k, v in flwr_environment().items() if k not in os.environ})
    os.execvp(command[0], command)
    return 0  # not reached


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
