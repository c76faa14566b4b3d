"""Which ServerApp runs this run: every start of the server is a new incarnation with its own id.

A new incarnation claims the run (pilot:{run}:server:current = its id) before it reads the checkpoint, and from
then on the one before it is superseded: it may still be alive for a while (a ServerApp whose SuperLink died
finishes its close(); a stopped process that is continued), and whatever it does after the claim must not land
in the run. So every write a server makes to the run's shared state (an event, a checkpoint, a trainer's
shutdown, the heartbeat) first asks `current()`. The question is one Redis GET; a Redis error is not a takeover
(an outage is answered by the clock and the watchers), so it answers "still current".

The heartbeat (pilot:{run}:server:alive = the id, with a TTL) tells site trainers a server is alive; it is
removed at the end only if it is still this incarnation's.

An incarnation also ends when its SuperLink is gone (the lifeline: the ServerApp's runtime API stops accepting
connections for LINK_LOST_S). A run does not survive its SuperLink (docs/deployment.md), and Flower's own way
out (its parent-process monitor raises SIGINT) waits for the main thread to run Python again, which a loaded
machine or a long blocking wait can delay by minutes, while the heartbeat keeps the sites' rounds going. So the
heartbeat thread itself ends the incarnation: heartbeat down (the sites' orphan timeout starts), nothing more
recorded (`current()` is False), and if the process is still there LINK_EXIT_S later it exits.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from logging import ERROR, WARNING

import redis
from flwr.common.logger import log

from pilot import protocol

LINK_LOST_S = 10.0    # the SuperLink refused connections this long: it is gone
LINK_EXIT_S = 10.0    # then the process has this long to end by Flower's own path before it exits


def link_probe(address: str | None, timeout_s: float = 1.0) -> Callable[[], bool]:
    """Whether the SuperLink at `address` ("host:port", the ServerApp's runtime API) accepts a connection.
    Without an address (a grid that has none, such as the simulation engine's) it is always there."""
    if not address or ":" not in address:
        return lambda: True
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")

    def alive() -> bool:
        try:
            socket.create_connection((host, int(port)), timeout=timeout_s).close()
            return True
        except OSError:
            return False
    return alive


class Incarnation:
    def __init__(self, client: redis.Redis, run_id: str, lifeline: Callable[[], bool] = lambda: True):
        self.r, self.run_id, self.lifeline = client, run_id, lifeline
        self.id = secrets.token_hex(6)
        self.r.set(protocol.server_current_key(run_id), self.id)
        self.link_lost = False
        self._stopped = threading.Event()
        threading.Thread(target=self._heartbeat, name="server-heartbeat", daemon=True).start()

    def current(self) -> bool:
        """True while no later incarnation has claimed the run (and its SuperLink is there)."""
        if self.link_lost:
            return False
        try:
            return self.r.get(protocol.server_current_key(self.run_id)) in (None, self.id)
        except redis.RedisError:
            return True

    def _heartbeat(self) -> None:
        unreachable_since = None
        while not self._stopped.is_set():
            if not self.current():
                break   # a later incarnation's heartbeat is the run's now
            if self.lifeline():
                unreachable_since = None
            elif unreachable_since is None:
                unreachable_since = time.monotonic()
            elif time.monotonic() - unreachable_since >= LINK_LOST_S:
                self._lose_link()
                return
            try:
                self.r.set(protocol.server_alive_key(self.run_id), self.id, ex=protocol.ALIVE_TTL_S)
            except redis.RedisError as error:
                log(WARNING, "pilot: heartbeat: %s", error)
            self._stopped.wait(protocol.HEARTBEAT_S)

    def _lose_link(self) -> None:
        log(ERROR, "pilot: the SuperLink has refused connections for %.0f s: this server ends (heartbeat down, "
            "nothing more recorded); a new `flwr run` resumes from the last checkpoint", LINK_LOST_S)
        self.link_lost = True
        self.end()
        time.sleep(LINK_EXIT_S)
        log(ERROR, "pilot: the ServerApp did not end %.0f s after its SuperLink: exiting", LINK_EXIT_S)
        os._exit(1)

    def end(self) -> None:
        """Stop the heartbeat and take it down (only if it is still this incarnation's)."""
        self._stopped.set()
        try:
            if self.r.get(protocol.server_alive_key(self.run_id)) == self.id:
                self.r.delete(protocol.server_alive_key(self.run_id))
        except redis.RedisError as error:
            log(WARNING, "pilot: could not take the heartbeat down: %s", error)
