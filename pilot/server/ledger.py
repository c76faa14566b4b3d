"""The data ledger: which shard each site trains, and how far it got, kept in Redis.

Every site trains on shards no other site holds. A shard's record is committed only when the work on it was
aggregated into the global model, so the ledger always describes the global model: after a crash (of a
site, of the server) training resumes from committed positions, and the only rows trained twice are the
rows in flight when a site died, which are re-issued.

One Redis hash per run, `pilot:{run}:ledger`, field = shard file name, value = JSON:

    {"owner": "client_0" | null, "done": false,
     "cursors": [{"file": ..., "row": 118, "offset": 37}, ...] | null,    # one per rank of the owner
     "world_size": 2, "unreadable_at": ["client_1"]}

A shard a site could not read (its file missing or corrupt there: the site names it in a failed result) is
marked unreadable at that site and goes to the back of that site's queue: the site trains every other shard
first and retries it only when nothing else is left (the file may be back by then); other sites take it as
usual, and the mark is cleared when the site commits progress on it.

Cursors are the data loader's (nanochat/dataloader.py): in its file, rank r has finished its rows before
`row` (rows r, r + world_size, ...), and `offset` tokens of that row. The ranks of a site may stand in different
files at a round's end (one finished a shard, another has rows of it left): the record of the earliest of their
files keeps every rank's cursor, and only the files before the earliest are done, so no rank's rows are
skipped. A shard taken over by a site with another world size resumes after the furthest cursor: it skips a
few rows rather than train any twice.

Spares (data that never runs out mid-round): with its shards, each round the server reserves up to
SPARES_PER_SITE free shards for a site (owner = the site, not yet in its list) and lists them in the site's own
key `pilot:{run}:site:{name}:spare`. A site whose shards run out mid-round takes the next one from that list
(LPOP: a lease through Redis, no round trip through the server), trains on, and names the spares it took in its
result; the server commits its cursors over its shards and those spares. Unused spares stay the site's, and
are in its list again next round; a site that fails or leaves releases them like its other shards.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from pilot.coordination import key

SHARDS_PER_SITE = 2  # shards a site holds at once: enough for a round, few enough to keep data for latecomers
SPARES_PER_SITE = 2  # shards reserved for a site to lease mid-round when its own run out


@dataclass
class ShardRecord:
    owner: str | None = None
    done: bool = False
    cursors: list[dict] | None = None
    world_size: int = 1
    unreadable_at: list[str] = field(default_factory=list)   # sites that could not read its file

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> ShardRecord:
        return cls(**json.loads(raw))


@dataclass
class Assignment:
    """What a site trains this round: its shards in order, and where each rank starts in the first one."""

    shards: list[str]
    cursors: list[dict] | None     # per rank, for shards[0]; None = from its beginning

    def to_json(self) -> str:
        return json.dumps({"shards": self.shards, "cursors": self.cursors})


class Ledger:
    def __init__(self, client: redis.Redis, run_id: str):
        self.r = client
        self.key = key(run_id, "ledger")

    def init(self, shard_names: Sequence[str]) -> None:
        """Register training shards; known shards keep their records (a resumed run loses nothing)."""
        for name in shard_names:
            self.r.hsetnx(self.key, name, ShardRecord().to_json())

    def records(self) -> dict[str, ShardRecord]:
        return {name: ShardRecord.from_json(raw) for name, raw in sorted(self.r.hgetall(self.key).items())}

    def _put(self, records: dict[str, ShardRecord]) -> None:
        if records:
            self.r.hset(self.key, mapping={name: rec.to_json() for name, rec in records.items()})

    def assign(self, site: str, world_size: int, per_site: int = SHARDS_PER_SITE) -> Assignment:
        """The site's shards: those it holds (partly trained first), topped up with free ones."""
        records = self.records()
        held = [n for n, r in records.items() if r.owner == site and not r.done]
        held.sort(key=lambda n: records[n].cursors is None)
        held = held[:max(per_site, 1)] if len(held) > per_site else held   # its spares wait in the spare list
        free = [n for n, r in records.items() if r.owner is None and not r.done]
        # a partly trained free shard first: someone's unfinished work is picked up before new shards; a shard
        # this site could not read last: retried only when nothing else is left
        free.sort(key=lambda n: (site in records[n].unreadable_at, records[n].cursors is None))
        changed = {}
        while len(held) < per_site and free:
            name = free.pop(0)
            records[name].owner = site
            changed[name] = records[name]
            held.append(name)
        self._put(changed)
        held.sort(key=lambda n: records[n].cursors is None)  # at most the first one is partly trained
        if not held:
            return Assignment([], None)
        return Assignment(held, _start_cursors(records[held[0]], held[0], world_size))

    def commit(self, site: str, shards: Sequence[str], cursors: Sequence[dict], world_size: int) -> None:
        """Record aggregated progress: shards before the earliest file any rank's cursor is in are done; that
        file keeps every rank's cursor (a rank ahead in a later file resumes there)."""
        if not cursors:
            return
        order = list(shards)
        outside = sorted({c["file"] for c in cursors} - set(order))
        if outside:
            raise ValueError(f"{site}'s cursors are in {outside}, which are not among its shards {order}")
        current = min((c["file"] for c in cursors), key=order.index)
        before = set(order[: order.index(current)])
        records = self.records()
        changed = {}
        for name in order:
            rec = records.get(name)
            if rec is None:
                continue
            if name == current:
                rec.cursors, rec.world_size = [dict(c) for c in cursors], world_size
            elif name in before:
                rec.done, rec.cursors = True, None
            else:
                continue
            rec.unreadable_at = [s for s in rec.unreadable_at if s != site]   # it read the file after all
            changed[name] = rec
        self._put(changed)

    def reserve_spares(self, site: str, held: Sequence[str], per_site: int = SPARES_PER_SITE) -> list[str]:
        """Up to `per_site` shards the site may lease mid-round (its own, not in `held`, else free ones, which
        become its own); the list its spare key holds until the next round."""
        records = self.records()
        mine = [n for n, r in records.items() if r.owner == site and not r.done and n not in held]
        free = [n for n, r in records.items()
                if r.owner is None and not r.done and r.cursors is None and site not in r.unreadable_at]
        changed = {}
        while len(mine) < per_site and free:
            name = free.pop(0)
            records[name].owner = site
            changed[name] = records[name]
            mine.append(name)
        for name in mine[per_site:]:   # fewer spares now (others need the data): untouched ones go back
            if records[name].cursors is None:
                records[name].owner = None
                changed[name] = records[name]
        self._put(changed)
        return mine[:per_site]

    def finish(self, shards: Sequence[str]) -> None:
        """The site ran out of these shards: every row was trained."""
        records = self.records()
        changed = {n: records[n] for n in shards if n in records}
        for rec in changed.values():
            rec.done, rec.cursors = True, None
        self._put(changed)

    def mark_unreadable(self, shard: str, site: str) -> None:
        """The site could not read this shard's file: the shard goes to the back of that site's queue."""
        records = self.records()
        rec = records.get(shard)
        if rec is not None and site not in rec.unreadable_at:
            rec.unreadable_at.append(site)
            self._put({shard: rec})

    def release(self, site: str) -> list[str]:
        """The site is gone: its unfinished shards become free, resuming from their committed cursors."""
        records = self.records()
        changed = {n: r for n, r in records.items() if r.owner == site and not r.done}
        for rec in changed.values():
            rec.owner = None
        self._put(changed)
        return sorted(changed)

    def exhausted(self) -> bool:
        records = self.records()
        return bool(records) and all(r.done for r in records.values())


def _start_cursors(rec: ShardRecord, name: str, world_size: int) -> list[dict] | None:
    if rec.cursors is None:
        return None
    if rec.world_size == world_size:
        return [dict(c) for c in rec.cursors]
    # another world size interleaves rows differently: start every rank after the furthest row
    furthest = max(c["row"] + (1 if c.get("offset") else 0) for c in rec.cursors)
    return [{"file": name, "row": furthest, "offset": 0} for _ in range(world_size)]
