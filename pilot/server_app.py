"""Pilot ServerApp: the Flower shell around the federation's regime loop (pilot/federation.py)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pilot import settings
from pilot.federation import Federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    federation = Federation(grid, settings.resolve(context.run_config))
    try:
        federation.run()
    finally:
        federation.close()
