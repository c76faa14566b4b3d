"""Which ServerApp runs this run: every start of the server is a new incarnation with its own id.

A new incarnation claims the run (pilot:{run}:server:current = its id) before it reads the checkpoint, and from
then on the one before it is superseded: it may still be alive for a while (a ServerApp whose SuperLink died
finishes its close(); a stopped process that is continued), and whatever it does after the claim must not land
in the run. So every write a server makes to the run's shared state (an event, a checkpoint, a trainer's
shutdown, the heartbeat) first asks `current()`. The question is one Redis GET; a Redis error is not a takeover
(an outage is answered by the clock and the watchers), so it answers "still current".

The heartbeat (pilot:{run}:server:alive = the id, with a TTL) tells site trainers a server is alive; it is
removed at the end only if it is still this incarnation's.
"""

from __future__ import annotations

import secrets
import threading
from logging import WARNING

import redis
from flwr.common.logger import log

from pilot import protocol


class Incarnation:
    def __init__(self, client: redis.Redis, run_id: str):
        self.r, self.run_id = client, run_id
        self.id = secrets.token_hex(6)
        self.r.set(protocol.server_current_key(run_id), self.id)
        self._stopped = threading.Event()
        threading.Thread(target=self._heartbeat, name="server-heartbeat", daemon=True).start()

    def current(self) -> bool:
        """True while no later incarnation has claimed the run."""
        try:
            return self.r.get(protocol.server_current_key(self.run_id)) in (None, self.id)
        except redis.RedisError:
            return True

    def _heartbeat(self) -> None:
        while not self._stopped.is_set():
            if not self.current():
                break   # a later incarnation's heartbeat is the run's now
            try:
                self.r.set(protocol.server_alive_key(self.run_id), self.id, ex=protocol.ALIVE_TTL_S)
            except redis.RedisError as error:
                log(WARNING, "pilot: heartbeat: %s", error)
            self._stopped.wait(protocol.HEARTBEAT_S)

    def end(self) -> None:
        """Stop the heartbeat and take it down (only if it is still this incarnation's)."""
        self._stopped.set()
        try:
            if self.r.get(protocol.server_alive_key(self.run_id)) == self.id:
                self.r.delete(protocol.server_alive_key(self.run_id))
        except redis.RedisError as error:
            log(WARNING, "pilot: could not take the heartbeat down: %s", error)
