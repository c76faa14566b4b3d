"""`pilot`: the front door. Each subcommand is a thin shell around a module that does the work."""

from __future__ import annotations

import argparse
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
    print(settings.reference_markdown(), end="")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    for name, value in flwr_environment().items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def cmd_redis(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pilot",
        description="Pilot: pretrain nanochat GPTs across GPU sites while their grids curtail renewables.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", help="print the run-settings reference (Markdown)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("env", help="print the environment `flwr` needs for this project (eval \"$(pilot env)\")")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("redis", help="start, inspect or stop the embedded Redis of a run")
    p.add_argument("action", choices=["start", "status", "stop"])
    p.add_argument("--run-dir", default=str(coordination.default_run_dir()),
                   help="run directory (default: $PILOT_RUN_DIR or runs/default)")
    p.set_defaults(func=cmd_redis)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except coordination.RedisUnavailable as error:
        print(f"pilot: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
