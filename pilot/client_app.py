"""Pilot ClientApp: thin. Flower may start a fresh process for every message, so it owns no training state.

QUERY: name the site, and warm up its trainer (it loads model and data now, so that the site's first window is
spent training). TRAIN: make sure the site's persistent trainer runs (pilot/site/process.py), hand it the round
request through Redis (as the server signed it: pilot/signing.py) and relay its result. It imports no torch: a ClientApp process starts in well under a
second.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import WARNING
from typing import Any

import redis
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from pilot import coordination, protocol, signing
from pilot.protocol import IDENTIFY, RESULT_KEY, ROUND_KEY, RoundRequest, RoundResult, site_name
from pilot.site import process

app = ClientApp()


def redis_url(run: ConfigRecord, context: Context) -> str:
    """A SuperNode at another site reaches Redis by its own address (and, in a secure deployment, as its own
    user): its node config wins, then its own $PILOT_REDIS_URL, then the server's URL."""
    return coordination.resolve_url(context.node_config.get("redis-url"), fallback=run["redis-url"])


def server_key(run: Mapping[str, Any]) -> str:
    """The server's public key as the authenticated Flower channel brought it ("" from a server that signs nothing)."""
    return str(run.get(signing.SERVER_KEY, "") or "")


def ensure_trainer(r: redis.Redis, site: str, run: ConfigRecord, context: Context) -> float | None:
    """Start the site's trainer unless it runs; it is started trusting the server key of this message, and a
    live trainer that trusts another key (the server's key changed, or it was started before servers signed)
    is restarted: it would refuse every request of this server."""
    run_id, key = str(run["run-id"]), server_key(run)
    if key and r.exists(protocol.alive_key(run_id, site)) and not process.trusts_key(r, run_id, site, key):
        log(WARNING, "pilot: the trainer of %s trusts another server key: restarting it for key %s", site,
            signing.fingerprint(key))
        process.stop_trainer(r, run_id, site)
    return process.ensure_trainer(r, site, run_id, str(run["run-dir"]), nproc=int(run["site-nproc"]),
                                  device=str(run["site-device"]), redis_url=redis_url(run, context), server_key=key)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    site = site_name(context.node_config)
    run = msg.content[IDENTIFY]
    if "run-id" in run:
        r = coordination.connect(redis_url(run, context), wait=True)
        ensure_trainer(r, site, run, context)
        r.close()
    return Message(RecordDict({IDENTIFY: ConfigRecord({"name": site})}), reply_to=msg)


def wait_for_result(r: redis.Redis, run_id: str, site: str, request: RoundRequest, after_id: str,
                    launched_at: float | None) -> RoundResult:
    outbox = protocol.outbox_key(run_id, site)
    while True:
        for _, entries in r.xread({outbox: after_id}, block=1000) or []:
            for entry_id, fields in entries:
                after_id = entry_id
                result = RoundResult.from_json(fields["result"])
                if result.round == request.round and result.server_id == request.server_id:
                    return result
        if not r.exists(protocol.alive_key(run_id, site)):
            starting = launched_at is not None and time.monotonic() - launched_at < process.TRAINER_START_TIMEOUT_S
            if not starting:
                return RoundResult(round=request.round, site=site, status="error", server_id=request.server_id,
                                   reason=f"the trainer of {site} died (see {protocol.trainer_key(run_id, site)})")
        else:
            launched_at = None  # it is up: from now on, silence means death


def inbox_entry(config: Mapping[str, Any], site: str) -> tuple[RoundRequest, dict[str, str | int] | None, str]:
    """The TRAIN record's request as the trainer's inbox entry: the JSON exactly as the server wrote it (its
    signature covers those fields) with its signature. A request that the key in the same record refuses would
    only wait in the inbox: (request, None, why) then."""
    raw = str(config["request"])
    request = RoundRequest.from_json(raw)
    signature, key = str(config.get(signing.SIGNATURE_KEY, "") or ""), server_key(config)
    if key:
        try:
            signing.verify_request(raw, signature, key, site=site)
        except signing.RequestRefused as error:
            return request, None, str(error)
    return request, signing.inbox_fields(raw, signature, request.round), ""


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Relay one round to this site's trainer and its result back."""
    site = site_name(context.node_config)
    config = msg.content[ROUND_KEY]
    run_id = str(config["run-id"])
    request, entry, refusal = inbox_entry(config, site)
    if entry is None:
        result = RoundResult(round=request.round, site=site, status="error", server_id=request.server_id,
                             reason=refusal)
        return Message(RecordDict({RESULT_KEY: ConfigRecord({"result": result.to_json()})}), reply_to=msg)
    r = coordination.connect(redis_url(config, context), wait=True)  # the run is going: ride out a Redis restart
    launched_at = ensure_trainer(r, site, config, context)
    last = r.xrevrange(protocol.outbox_key(run_id, site), count=1)
    after_id = last[0][0] if last else "0-0"
    # the server may have delivered the round straight to the trainer, which may be done with it already
    result = process.handed_in(r, run_id, site, request.round, request.server_id)
    if result is None:
        process.deliver(r, run_id, site, entry, via="clientapp")
        result = wait_for_result(r, run_id, site, request, after_id, launched_at)
    r.close()
    return Message(RecordDict({RESULT_KEY: ConfigRecord({"result": result.to_json()})}), reply_to=msg)
