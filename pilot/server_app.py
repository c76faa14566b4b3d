"""Pilot ServerApp: the Flower shell around the federation's loop (pilot/server/loop.py)."""

from __future__ import annotations

from logging import ERROR

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from pilot import procmem, settings
from pilot.server.loop import Federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    procmem.return_freed_memory()   # a long-lived process that frees model-sized tensors every round
    try:
        run_settings = settings.load(context.run_config)
    except settings.SettingError as error:  # said where `flwr run --stream` shows it, then the run fails
        log(ERROR, "pilot: refused run configuration: %s", error)
        raise
    federation = Federation(grid, run_settings)
    try:
        federation.run()
    finally:
        federation.close()
