"""The federation's loop: it only sequences the parts of the round engine (pilot/server_app.py is its thin
Flower shell; Flower's `Strategy.start` is the shape).

    open the run    Redis, the event sink, the energy clock, the global model (resumed from the last
                    checkpoint if there is one) with its ledger, the weights server, the node roster,
                    provisioning; the training settings are published for the site trainers
    loop            which sites train now = curtailed (clock.py) & connected (roster.py)
                    none      -> paused: wait for the next energy event
                    one/more  -> a round: TRAIN messages to those sites only; end it when the policy says
                                 (policy.py) by setting the round's stop key; collect the results; fold them
                                 into the global model (training.py), evaluate, checkpoint
    end             when the policy says the run is over (policy.run_outcome): final_model written

Every decision goes to the event sink (runlog.ServerEvents): the console, the run's event stream, the run log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from logging import WARNING
from pathlib import Path

import redis
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from pilot import coordination, protocol, signing
from pilot.dataplane import payload
from pilot.dataplane.server import AnyUploadLimits, BlobServer, RoundTokens, UploadLimits, server_tls
from pilot.dataplane.store import BlobStore
from pilot.protocol import RESULT_KEY, ROUND_KEY, RoundRequest, RoundResult
from pilot.provision.run import start_provisioning
from pilot.server import policy
from pilot.server.clock import EnergyClock
from pilot.server.incarnation import Incarnation, link_probe
from pilot.server.ledger import SHARDS_PER_SITE, SPARES_PER_SITE
from pilot.server.publish import Publisher
from pilot.server.roster import Roster
from pilot.server.runlog import RunLog, ServerEvents
from pilot.server.training import AfterRound, GlobalModel
from pilot.settings import Settings
from pilot.site import process
from pilot.site.process import shutdown_trainer

POLL_S = 0.25               # how often a round looks for replies and energy news


def upload_limits(weights: dict, kind: str) -> UploadLimits | AnyUploadLimits:
    """What an upload may hold: the model's tensors (weights-fp32, delta-bf16), or the run's quantized layout."""
    plain = UploadLimits.for_weights(weights)
    return AnyUploadLimits(plain, UploadLimits.for_quantized(weights, kind)) if kind in payload.QUANTIZED else plain


class Federation:
    def __init__(self, grid: Grid, settings: Settings):
        self.grid, self.settings = grid, settings
        run = settings.run
        self.run_id = run.run_id
        self.run_dir = Path(run.run_dir or coordination.default_run_dir(self.run_id)).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.redis_url = coordination.resolve_url(run.redis_url, run_dir=self.run_dir)
        self.r = coordination.connect(self.redis_url)
        # claim the run before reading its checkpoint: an earlier incarnation still alive writes nothing after this
        # and it ends if its SuperLink goes (Flower 1.42's HttpGrid keeps the runtime API's "host:port" in _addr;
        # a grid without one, the in-process simulation's, needs no lifeline)
        self.incarnation = Incarnation(self.r, self.run_id, lifeline=link_probe(getattr(grid, "_addr", None)))
        self.server_id = self.incarnation.id
        self.runlog = RunLog(self.run_dir, self.run_id, self.r, lambda wall_ts: self.clock.time_at(wall_ts),
                             wandb_mode=run.wandb_mode)
        self.clock = EnergyClock(self.r, self.run_id, settings.rounds.curtailment, self.runlog)
        self.emit = ServerEvents(self.r, self.run_id, self.runlog, self.clock.time_at, self.incarnation)
        self.clock.on_event = self.emit
        self.model = GlobalModel(self.r, self.run_id, self.run_dir, settings.model, settings.rounds,
                                 settings.sites.nproc, self.emit, emulate_step_s=settings.sites.emulate_step_s)
        # pseudo-gradient uploads wait in files of the run directory, read into the round's mean tensor by tensor
        # (no upload costs the server model-sized memory); a solo round's weights, adopted as they are, in memory
        # (they are the masters then)
        self.store = BlobStore(spool_dir=self.run_dir / "spool",
                               spool_if=lambda meta: meta.get("payload", "weights-fp32") != "weights-fp32")
        self.delta_digest = ""   # the round's global delta in the store, until the round's first result
        # the view the sites hold waits in a file too, made tensor by tensor from the masters (which stay the only
        # model copy in memory between rounds) and served from there
        self.publisher = Publisher(self.store, deltas=settings.dataplane.global_payload == "delta-bf16",
                                   spool=self.store.spool_file)
        # round requests are signed (a site obeys only this key, learnt through Flower); blob access is per
        # site and round; an upload must be shaped like the model
        self.signing_key = signing.ServerKey.load_or_create(self.run_dir)
        self.blob_tokens = RoundTokens()
        dp = settings.dataplane
        self.blob_ca, tls = server_tls(dp.certfile, dp.keyfile, dp.cafile)
        self.blob_server = BlobServer(self.store, host=dp.host, port=dp.port, ssl_context=tls,
                                      authorize=self.blob_tokens.authorize,
                                      upload_limits=upload_limits(self.model.state.weights, dp.update_payload),
                                      allow_insecure=dp.allow_insecure).start()
        self.blob_url = dp.url or self.blob_server.url
        self.emit("weights-server", url=self.blob_url, tls=tls is not None)
        self.roster = Roster(grid, self.site_record, settings.rounds.handshake_timeout, self.emit)
        self.round_end: dict[int, dict] = {}   # round -> its round-end fields, until its checkpoint is written
        self.after_round = AfterRound(self.model, self._round_saved, self._round_save_failed,
                                      still_current=self.incarnation.current)
        self.regime = ""
        self._take_over()
        # sites' compute follows their windows (none: SuperNodes are started by hand); its own thread
        self.provisioning = start_provisioning(settings.provision, settings.rounds.curtailment, self.redis_url,
                                               self.run_id, self.run_dir,
                                               on_event=lambda kind, fields: self.emit(kind, **fields))

    def _take_over(self) -> None:
        """Become the run's server (claimed in __init__): sites still working for an earlier incarnation stop,
        and rounds after the checkpoint (started by a server that died before checkpointing them) may be run again."""
        self.r.delete(protocol.server_stop_key(self.run_id))   # an earlier `pilot stop` ended an earlier start
        stale = [k for k in self.r.scan_iter(match=coordination.key(self.run_id, "round", "*", "stop"))
                 if int(k.split(":")[-2]) > self.model.state.round]
        if stale:
            self.r.delete(*stale)

    def site_record(self) -> ConfigRecord:
        """What a site needs to start its trainer: the run, its directory and Redis, processes, device."""
        return ConfigRecord({"run-id": self.run_id, "run-dir": str(self.run_dir), "redis-url": self.redis_url,
                             "site-nproc": self.settings.sites.nproc, "site-device": self.settings.sites.device,
                             signing.SERVER_KEY: self.signing_key.public})

    def operator_stop(self) -> str:
        """Why the operator asked the run to stop (`pilot stop`), or "" (a Redis outage is no such request)."""
        try:
            return self.r.get(protocol.server_stop_key(self.run_id)) or ""
        except redis.RedisError:
            return ""

    def training_now(self) -> frozenset[str]:
        return policy.members(self.clock.curtailed(set(self.roster.sites)), set(self.roster.sites))

    # -------------------------------------------------------------- the loop
    def run(self) -> None:
        self.roster.discover(force=True)
        while True:
            outcome = policy.run_outcome(steps_done=self.model.steps_done, horizon=self.model.horizon,
                                         data_exhausted=self.model.ledger.exhausted(),
                                         rounds_done=self.model.state.round,
                                         max_rounds=self.settings.rounds.max_rounds, energy_finished=self.clock.finished(),
                                         operator_stop=self.operator_stop())
            if outcome is not None:
                break
            if not self.incarnation.current():
                log(WARNING, "pilot: a later server took this run over: this one stops (no final model)")
                return
            self.roster.discover()
            training = self.training_now()
            regime = policy.regime(training)
            if regime != self.regime:
                self.emit("regime", regime=regime, sites=sorted(training))
                self.regime = regime
            if regime == policy.PAUSED:
                self.clock.wait_for_news(block_ms=1000)
                continue
            self.run_round(training)
        self.after_round.drain()
        path = self.model.finish(outcome)
        self.emit("finished", outcome=outcome, round=self.model.state.round, tokens=self.model.state.tokens,
                  final_model=str(path))

    def dispatch(self, number: int, members: frozenset[str]) -> tuple[dict[str, Message], dict]:
        """The round's TRAIN messages, one per member that has data to train, and their data assignments."""
        ledger, nproc = self.model.ledger, self.settings.sites.nproc
        # the global model as the sites will hold it, and the bf16 delta to it for a site that holds the last one
        # (a lone site's upload adopted as it is: that blob, no hash pass, nothing to fetch for that site)
        sent = self.publisher.publish(self.model.state.weights, adopted=self.model.adopted)
        self.delta_digest = sent.delta_digest
        self.blob_tokens.open_round(number, {sent.digest, sent.delta_digest} - {""})
        schedule_step = self.model.steps_done
        max_steps = -(-(self.model.horizon - schedule_step) // len(members))   # the sites share the steps left
        # a lone site hands in its exact weights (they become the global model as they are); several hand
        # in what the run asks for (bf16 pseudo-gradients halve the bytes)
        update_payload = self.settings.dataplane.update_payload if len(members) > 1 else "weights-fp32"
        messages, assignments = {}, {}
        for site in sorted(members):
            assignment = ledger.assign(site, world_size=nproc)
            if not assignment.shards:
                # no free shard left: take over the unfinished shards of sites that are not training now
                # (from their committed cursors), rather than leave a curtailed site idle
                released = [s for other in sorted(self.roster.seen_sites - members) for s in ledger.release(other)]
                if released:
                    self.emit("shards-released", shards=released, to=site)
                    assignment = ledger.assign(site, world_size=nproc)
            if not assignment.shards:
                continue
            assignments[site] = assignment
        # spares only from the surplus: every site of the run keeps a full share of the free shards for when its
        # window opens, and only what is beyond goes to this round's sites to lease mid-round
        free = sum(1 for rec in ledger.records().values() if rec.owner is None and not rec.done)
        waiting = len(self.roster.seen_sites - set(assignments))
        per_site = min(SPARES_PER_SITE, max(0, free - waiting * SHARDS_PER_SITE) // max(1, len(assignments)))
        for site, assignment in sorted(assignments.items()):
            spares = ledger.reserve_spares(site, assignment.shards, per_site=per_site) if per_site else []
            pipe = self.r.pipeline(transaction=True)   # the site leases from this list when its shards run out
            pipe.delete(protocol.spare_key(self.run_id, site))
            if spares:
                pipe.rpush(protocol.spare_key(self.run_id, site), *spares)
            pipe.execute()
            request = RoundRequest(round=number, server_id=self.server_id, weights_digest=sent.digest, sites=len(members),
                                   delta_digest=sent.delta_digest, delta_base=sent.delta_base, blob_url=self.blob_url,
                                   blob_token=self.blob_tokens.issue(site, number), site=site,
                                   shards=assignment.shards, cursors=assignment.cursors,
                                   schedule_step=schedule_step, max_steps=max_steps, update_payload=update_payload,
                                   blob_ca=self.blob_ca, round_mode=self.settings.rounds.round_mode,
                                   round_steps=self.settings.rounds.round_steps if len(members) > 1 else 0)
            record = self.site_record()
            record["request"] = request.to_json()
            record[signing.SIGNATURE_KEY] = signing.sign_request(request, self.signing_key)
            messages[site] = Message(RecordDict({ROUND_KEY: record}), dst_node_id=self.roster.sites[site],
                                     message_type=MessageType.TRAIN)
        return messages, assignments

    def run_round(self, members: frozenset[str]) -> None:
        rounds = self.settings.rounds
        number = self.model.state.round + 1
        messages, assignments = self.dispatch(number, members)
        if not messages:  # nothing for these sites to train now: wait for the energy picture to change
            self.clock.wait_for_news(block_ms=1000)
            return
        current = policy.Round(number, frozenset(messages), started_at=self.clock.now(),
                               duration=rounds.round_duration, solo_interval=rounds.solo_checkpoint_interval)
        self.emit("round-start", round=number, regime=current.regime, sites=sorted(messages),
                  shards={s: a.shards for s, a in assignments.items()})
        nodes = {site: message.metadata.dst_node_id for site, message in messages.items()}
        ids = dict(zip(self.grid.push_messages(messages.values()), messages, strict=True))  # message id -> site
        self.deliver_directly(number, messages)
        # each result is taken into the global model as it arrives (a worker thread), while others still train
        intake = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake")
        taking: list[Future] = []

        def arrived(site: str, result: RoundResult) -> None:
            # the round's global delta was fetched at its start: let go of it before the mean takes its memory
            # (a site that asks for it later fetches the weights whole)
            if self.delta_digest:
                self.store.pop(self.delta_digest)
            taking.append(intake.submit(self.model.take, number, site, result, assignments[site], self.store))

        try:
            results, stop_reason = self.collect(number, current, members, ids, nodes, arrived)
        finally:
            intake.shutdown(wait=True)
        for job in taking:
            job.result()   # an unexpected error in taking a result in ends the round here, as it would have
        self.runlog.drain_steps(ids.values())
        for site, result in sorted(results.items()):
            wall_start, wall_end = result.extra.get("wall_start"), result.extra.get("wall_end")
            self.emit("site-result", round=number, site=site, status=result.status, reason=result.reason,
                      tokens=result.tokens, steps=result.steps, loss=result.loss,
                      seconds_training=result.seconds_training, seconds_total=result.seconds_total,
                      wall_start=wall_start, wall_end=wall_end,
                      sim_start=self.clock.time_at(wall_start) if wall_start else None,
                      sim_end=self.clock.time_at(wall_end) if wall_end else None,
                      set_up_s=result.extra.get("set_up_s"), upload_s=result.extra.get("upload_s"),
                      fetch=result.extra.get("fetch"), fetch_bytes=result.extra.get("fetch_bytes"),
                      via=result.extra.get("via"))
        aggregating = time.monotonic()
        tokens = self.model.aggregate(number, results, assignments, self.store,
                                      span=(current.started_at, self.clock.now()))
        aggregate_s = time.monotonic() - aggregating
        self.blob_tokens.close_round(number)
        # uploads are averaged in; the next round publishes anew (or names the adopted solo upload)
        self.store.retain({self.model.adopted} if self.model.adopted else set())
        self.round_end[number] = dict(
            round=number, regime=current.regime, sites=sorted(tokens), reason=stop_reason or "all sites done",
            tokens=sum(tokens.values()), total_tokens=self.model.state.tokens,
            loss={s: round(results[s].loss, 4) for s in tokens},
            trainers={s: [r.trainer_pid, r.trainer_step] for s, r in results.items()},
            busy={s: round(r.seconds_training / max(r.seconds_total, 1e-9), 3)
                  for s, r in results.items() if r.status == "ok"},
            training_s={s: round(r.seconds_training, 3) for s, r in results.items()},
            aggregate_s=round(aggregate_s, 3))   # decode, check and average the uploads, the outer step
        self.after_round.submit(self.model.snapshot(), evaluate=bool(tokens))
        if not any(r.status == "ok" for r in results.values()):
            self.clock.wait_for_news(block_ms=2000)  # every site failed: do not hammer them in a tight loop

    def _round_saved(self, number: int, val_bpb: float | None, path: Path, seconds: dict[str, float]) -> None:
        fields = self.round_end.pop(number)
        self.emit("round-end", **{**fields, "val_bpb": round(val_bpb, 4) if val_bpb is not None else None,
                                  "checkpoint": path.name, **seconds})   # evaluate_s, checkpoint_s (off the path)

    def _round_save_failed(self, number: int, error: BaseException) -> None:
        fields = self.round_end.pop(number)
        self.emit("round-end", **{**fields, "val_bpb": None, "checkpoint": None})
        self.emit("checkpoint-failed", round=number, error=f"{type(error).__name__}: {error}")

    def collect(self, number: int, current: policy.Round, members: frozenset[str], ids: dict[str, str],
                nodes: dict[str, int], arrived: Callable[[str, RoundResult], None] = lambda site, result: None,
                ) -> tuple[dict[str, RoundResult], str]:
        """Wait for the round's results, ending the round (its stop key) when the policy says so; `arrived` is
        told of each result as it comes in."""
        grace = self.settings.rounds.stop_grace
        results: dict[str, RoundResult] = {}
        stop_reason, stop_sent = "", None
        told: set[str] = set()

        def tell() -> None:
            for site in sorted(results.keys() - told):
                told.add(site)
                arrived(site, results[site])

        while len(results) < len(ids):
            pending = [i for i, s in ids.items() if s not in results]
            for reply in self.grid.pull_messages(pending):
                site = ids.get(reply.metadata.reply_to_message_id)
                if site is None:
                    continue
                if reply.has_error():
                    results[site] = RoundResult(round=number, site=site, status="error", server_id=self.server_id,
                                                reason=f"node error: {reply.error.reason[:300]}")
                    if reply.error.code == ErrorCode.NODE_UNAVAILABLE:  # that SuperNode is gone (an app error
                        self.roster.node_failed(nodes[site])          # leaves the node in service)
                else:
                    results[site] = RoundResult.from_json(str(reply.content[RESULT_KEY]["result"]))
            # a result also lands in the site's outbox: it counts even if the site's SuperNode died on the way
            for site in set(ids.values()) - set(results):
                result = process.handed_in(self.r, self.run_id, site, number, self.server_id)
                if result is not None:
                    results[site] = result
            tell()
            if len(results) == len(ids):
                break
            if stop_sent is None:
                self.roster.discover()
                # a curtailed site that got no data this round (none left for it) is not a newcomer
                training_now = self.training_now() - (members - current.members)
                reason = policy.end_reason(current, self.clock.now(), training_now,
                                           energy_finished=self.clock.finished(),
                                           horizon_reached=self.model.horizon_reached,
                                           operator_stop=self.operator_stop())
                if reason is not None:
                    stop_reason, stop_sent = reason, time.monotonic()
                    self.r.set(protocol.stop_key(self.run_id, number), reason, ex=24 * 3600)
                    self.emit("round-stop", round=number, reason=reason)
            elif time.monotonic() - stop_sent > grace:
                # late, not lost: the site stays in service (a timeout never takes a site out of the run)
                for site in set(ids.values()) - set(results):
                    results[site] = RoundResult(round=number, site=site, status="error",
                                                reason=f"no result {grace} s after the stop")
                tell()
                break
            self.runlog.drain_steps(ids.values())
            self.clock.wait_for_news(block_ms=int(POLL_S * 1000))
        self.r.set(protocol.stop_key(self.run_id, number), stop_reason or "round over", ex=24 * 3600)
        return results, stop_reason

    def deliver_directly(self, number: int, messages: dict[str, Message]) -> None:
        """Each round request also goes straight into the inbox of a live trainer that trusts this server's key,
        as the ClientApp would put it there: the round starts without waiting for the SuperNode's poll and a
        fresh ClientApp process (seconds a round). The ClientApp's relay stays the path of record (it starts a
        trainer that is not up, and relays the result); the trainer takes the round once, whichever copy comes
        first."""
        if not self.settings.rounds.direct_delivery:
            return
        for site, message in sorted(messages.items()):
            record = message.content[ROUND_KEY]
            try:
                if not (self.r.exists(protocol.alive_key(self.run_id, site))
                        and process.trusts_key(self.r, self.run_id, site, self.signing_key.public)):
                    continue
                process.deliver(self.r, self.run_id, site, signing.inbox_fields(
                    str(record["request"]), str(record[signing.SIGNATURE_KEY]), number), via="server")
            except redis.RedisError as error:   # Flower's relay still brings it
                log(WARNING, "pilot: round %d not delivered straight to %s: %s", number, site, error)

    def close(self) -> None:
        self.after_round.drain()
        if self.provisioning is not None:
            self.provisioning.close()
        if self.incarnation.current():   # a later server's trainers are not this one's to shut down
            for site in self.roster.seen_sites:
                shutdown_trainer(self.r, self.run_id, site)
        self.blob_server.stop()
        self.incarnation.end()
        self.runlog.close()
        coordination.release(self.r, self.run_dir)  # the embedded Redis stops when its last user lets go
