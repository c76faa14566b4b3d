"""Pilot ClientApp: thin. Flower may start a fresh process for every message, so it owns no training
state; it answers for its site and (later) hands work to the site's persistent trainer."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from pilot.sites import IDENTIFY, site_name

app = ClientApp()


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the ServerApp which site this node serves."""
    record = ConfigRecord({"name": site_name(context.node_config)})
    return Message(RecordDict({IDENTIFY: record}), reply_to=msg)
