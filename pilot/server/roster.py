"""The node roster: which Flower node serves which site.

New nodes are asked their name (a QUERY, which also warm-starts their site trainer); the answers are
collected without blocking the loop, so a node that is slow to answer (a busy machine, a trainer starting) is
not lost, only late. A node whose query fails is not used again (a restarted SuperNode comes back under a new
id); of two nodes with one name, the one that identified itself last serves the site. A failure is pinned
on the node whose message failed, never on whichever node serves the site now.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from pilot.protocol import IDENTIFY

REDISCOVER_S = 5.0          # how often the server looks for SuperNodes that (re)connected


class Roster:
    def __init__(self, grid: Grid, site_record: Callable[[], ConfigRecord], handshake_timeout: float,
                 emit: Callable[..., None]):
        self.grid, self.site_record, self.handshake_timeout, self.emit = grid, site_record, handshake_timeout, emit
        self.sites: dict[str, int] = {}                        # site name -> Flower node id
        self.node_names: dict[int, tuple[str, float]] = {}     # node id -> (site name, when it said so)
        self.dead_nodes: set[int] = set()                      # nodes that failed: never used again
        self.seen_sites: set[str] = set()                      # every site that connected during this run
        self.pending_queries: dict[str, tuple[int, float]] = {}   # message id -> (node, when asked)
        self.last_discovery = 0.0

    def discover(self, force: bool = False) -> None:
        """Ask new nodes their name and take in the answers; `force`: wait up to handshake-timeout for them."""
        self._collect_names()
        if not force and time.monotonic() - self.last_discovery < REDISCOVER_S:
            return
        self.last_discovery = time.monotonic()
        node_ids = set(self.grid.get_node_ids()) - self.dead_nodes
        self.node_names = {n: v for n, v in self.node_names.items() if n in node_ids}
        asked = {node for node, _ in self.pending_queries.values()}
        new = sorted(node_ids - set(self.node_names) - asked)
        if new:
            queries = [Message(RecordDict({IDENTIFY: self.site_record()}), dst_node_id=n, message_type=MessageType.QUERY)
                       for n in new]
            for message_id, node in zip(self.grid.push_messages(queries), new, strict=True):
                self.pending_queries[message_id] = (node, time.monotonic())
        deadline = time.monotonic() + (self.handshake_timeout if force else 0)
        while force and self.pending_queries and time.monotonic() < deadline:
            time.sleep(0.5)
            self._collect_names()
        # a query unanswered for handshake-timeout is asked again (the node may have missed it)
        late = [m for m, (_, at) in self.pending_queries.items() if time.monotonic() - at > self.handshake_timeout]
        for message_id in late:
            del self.pending_queries[message_id]
        self._update_sites()

    def _collect_names(self) -> None:
        """Take in the answers to name queries that have arrived (never waits)."""
        if not self.pending_queries:
            return
        for reply in self.grid.pull_messages(list(self.pending_queries)):
            asked = self.pending_queries.pop(reply.metadata.reply_to_message_id, None)
            if asked is None:
                continue
            node = asked[0]
            if reply.has_error():
                self.dead_nodes.add(node)
            else:
                self.node_names[node] = (str(reply.content[IDENTIFY]["name"]), time.monotonic())
        self._update_sites()

    def _update_sites(self) -> None:
        latest: dict[str, tuple[int, float]] = {}
        for node, (name, seen) in self.node_names.items():
            if name not in latest or seen > latest[name][1]:
                latest[name] = (node, seen)
        sites = {name: node for name, (node, _) in latest.items()}
        if sites != self.sites:
            self.emit("sites", connected=sorted(sites))
        self.sites = sites
        self.seen_sites |= set(sites)

    def node_failed(self, node: int) -> None:
        """Flower says `node` is gone: never use it again. A site it served is forgotten only if that node still
        serves it (a restarted SuperNode may already have identified itself under a new id)."""
        self.dead_nodes.add(node)
        self.node_names.pop(node, None)
        for site, serving in list(self.sites.items()):
            if serving == node:
                del self.sites[site]
