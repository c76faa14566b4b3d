"""Pilot ServerApp: learns which node is which site; the regime loop builds on this."""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from pilot import settings
from pilot.sites import IDENTIFY

app = ServerApp()


def discover_sites(grid: Grid, timeout_s: float) -> dict[str, int]:
    """Ask every connected node for its site name: {site name: node id}. Waits for at least one node."""
    deadline = time.monotonic() + timeout_s
    node_ids = list(grid.get_node_ids())
    while not node_ids and time.monotonic() < deadline:
        time.sleep(1.0)
        node_ids = list(grid.get_node_ids())
    queries = [Message(RecordDict({IDENTIFY: ConfigRecord({})}), dst_node_id=node_id,
                       message_type=MessageType.QUERY) for node_id in node_ids]
    sites: dict[str, int] = {}
    for reply in grid.send_and_receive(queries, timeout=max(1.0, deadline - time.monotonic())):
        if reply.has_error():
            log(INFO, "node %s did not identify itself: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        name = str(reply.content[IDENTIFY]["name"])
        if name in sites:
            log(INFO, "site %s is served by two nodes (%s, %s): keeping the first", name, sites[name],
                reply.metadata.src_node_id)
            continue
        sites[name] = reply.metadata.src_node_id
    return sites


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = settings.resolve(context.run_config)
    sites = discover_sites(grid, timeout_s=config["handshake-timeout"])
    for name, node_id in sorted(sites.items()):
        log(INFO, "site %s is node %s", name, node_id)
    log(INFO, "pilot: %d site(s) connected: %s", len(sites), ", ".join(sorted(sites)) or "none")
