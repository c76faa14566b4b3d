"""Pilot ServerApp: the Flower shell around the federation's loop (pilot/server/loop.py)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pilot import settings
from pilot.server.loop import Federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    federation = Federation(grid, settings.load(context.run_config))
    try:
        federation.run()
    finally:
        federation.close()
