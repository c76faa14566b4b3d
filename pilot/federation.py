"""The federation: the ServerApp's regime loop (pilot/server_app.py is its thin Flower shell).

    open the run: Redis, the global state (resumed from the last checkpoint if there is one), the ledger,
                  the weights server; publish the training settings for the site trainers
    loop:         which sites train now = curtailed (Redis) & connected (Flower)
                  none      -> paused: wait for the next energy event
                  one/more  -> a round: TRAIN messages to those sites only; end it when the policy says
                               (pilot/regimes.py) by setting the round's stop key; collect the results;
                               average (token-weighted, outer optimizer), commit the ledger, checkpoint
    end:          token budget reached or data exhausted (final_model written), or the energy simulation
                  finished with nobody curtailed

Every decision is logged to the run's server event stream (pilot:{run}:server:events) and the console.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import threading
import time
from dataclasses import asdict
from logging import INFO, WARNING
from pathlib import Path

import redis
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from nanochat.checkpoint import save_model
from nanochat.common import get_base_dir
from nanochat.dataloader import DataLoader
from nanochat.dataset import list_parquet_files
from nanochat.gpt import build_model
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import Tokenizer, get_token_bytes
from nanochat.trainer import TrainConfig, plan_training
from pilot import coordination, global_state, payload, protocol, provision, regimes
from pilot.aggregation import OuterOptimizer, RejectedUpdate, average_updates, check_update
from pilot.blobs import BlobServer, BlobStore
from pilot.client_app import RESULT_KEY, ROUND_KEY, shutdown_trainer
from pilot.energy import events as energy_events
from pilot.energy.events import EnergyEvents
from pilot.global_state import GlobalState
from pilot.ledger import Ledger
from pilot.protocol import RoundRequest, RoundResult
from pilot.runlog import RunLog, SimTimeline
from pilot.sites import IDENTIFY

POLL_S = 0.25               # how often a round looks for replies and energy news
REDISCOVER_S = 5.0          # how often the server looks for SuperNodes that (re)connected


def blob_tls(cfg: dict) -> tuple[str, ssl.SSLContext | None]:
    """The weights server's TLS context and the CA PEM the sites must trust (both empty without a certificate)."""
    if not cfg.get("blob-certfile"):
        return "", None
    missing = [k for k in ("blob-keyfile", "blob-cafile") if not cfg.get(k)]
    if missing:
        raise ValueError(f"blob-certfile is set but {', '.join(missing)} is not: the weights server needs its key "
                         f"and the sites need the CA")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cfg["blob-certfile"], cfg["blob-keyfile"])
    return Path(cfg["blob-cafile"]).read_text(), context


def _stream_value(value: object) -> str:
    """Redis stream fields are strings: lists as "a,b" ("-" when empty), dicts as JSON, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


class Federation:
    def __init__(self, grid: Grid, cfg: dict):
        self.grid, self.cfg = grid, cfg
        self.run_id = cfg["run-id"]
        self.run_dir = Path(cfg["run-dir"] or coordination.default_run_dir(self.run_id)).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.redis_url = cfg["redis-url"] or os.environ.get(coordination.REDIS_URL_ENV) or \
            coordination.EmbeddedRedis(self.run_dir).ensure()
        self.r = coordination.connect(self.redis_url)
        self.events = EnergyEvents(self.r, self.run_id, consumer="server")
        self.timeline, self._clock_read = SimTimeline(), 0.0   # wall -> simulated time, for the run's logs
        self.runlog = RunLog(self.run_dir, self.run_id, self.r, self.sim_time_at, wandb_mode=cfg.get("wandb-mode", ""))
        self.sites: dict[str, int] = {}       # site name -> Flower node id
        self.node_names: dict[int, tuple[str, float]] = {}   # node id -> (site name, when it said so)
        self.dead_nodes: set[int] = set()     # nodes that failed: never used again
        self.seen_sites: set[str] = set()     # every site that connected during this run (their trainers)
        self.last_discovery = 0.0
        self.pending_queries: dict[str, tuple[int, float]] = {}   # message id -> (node, when asked)
        self._setup_training()
        self._open_global_state()
        self.store = BlobStore()
        self.blob_token = secrets.token_hex(16)
        self.blob_ca, tls = blob_tls(cfg)
        self.blob_server = BlobServer(self.store, host=cfg["blob-host"], port=cfg["blob-port"],
                                      token=self.blob_token, ssl_context=tls).start()
        self.blob_url = cfg["blob-url"] or self.blob_server.url
        self.emit("weights-server", url=self.blob_url, tls=tls is not None)
        self.regime = ""
        self.eval_model = None
        self._take_over()
        # sites' compute follows their windows (none: SuperNodes are started by hand); its own thread
        self.provisioning = provision.start_provisioning(cfg, self.redis_url, self.run_id, self.run_dir,
                                                         on_event=lambda kind, fields: self.emit(kind, **fields))

    # -------------------------------------------------------------- setup
    def _setup_training(self) -> None:
        cfg = self.cfg
        base = get_base_dir()
        self.data_dir = Path(cfg["data-dir"] or base / "base_data").resolve()
        self.tokenizer_dir = Path(cfg["tokenizer-dir"] or base / "tokenizer").resolve()
        files = list_parquet_files(self.data_dir)
        if len(files) < 2:
            raise FileNotFoundError(f"{self.data_dir}: need at least 2 parquet shards (training + validation), "
                                    f"found {len(files)}; build some with python -m nanochat.offline_corpus")
        self.train_shards, self.val_shard = [f.name for f in files[:-1]], files[-1]
        self.tokenizer = Tokenizer.from_directory(self.tokenizer_dir)
        self.train_config = TrainConfig(depth=cfg["depth"], max_seq_len=cfg["max-seq-len"],
                                        device_batch_size=cfg["device-batch-size"],
                                        total_batch_size=cfg["total-batch-size"], compile="off")
        if cfg["token-budget"] > 0:
            self.train_config.num_iterations = max(1, cfg["token-budget"] // cfg["total-batch-size"])
        plan = plan_training(self.train_config, self.tokenizer.get_vocab_size(), world_size=cfg["site-nproc"])
        self.plan = plan
        self.horizon = plan.num_iterations
        spec = {**asdict(self.train_config), "num_iterations": self.horizon, "compile": "auto",
                "data_dir": str(self.data_dir), "tokenizer_dir": str(self.tokenizer_dir)}
        self.r.set(protocol.train_config_key(self.run_id), json.dumps(spec))
        self.emit("setup", detail=plan.describe().replace("\n", "; "))

    def _open_global_state(self) -> None:
        cfg = self.cfg
        self.outer = OuterOptimizer(cfg["outer-optimizer"], lr=cfg["outer-lr"], momentum=cfg["outer-momentum"])
        self.ledger = Ledger(self.r, self.run_id)
        path = global_state.latest(self.run_dir)
        self.r.delete(self.ledger.key)  # the checkpoint is the truth; without one, nothing was trained yet
        if path is None:
            model = build_model(self.plan.model_config, device="cpu", seed=self.train_config.seed)
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.state = GlobalState(weights=weights)
            self.ledger.init(self.train_shards)
            self.emit("start", detail=f"new run in {self.run_dir}")
        else:
            self.state = global_state.load(path)
            self.outer.state = self.state.outer_state
            # Redis may have been ahead (a round that was never checkpointed) or empty: restore the snapshot
            records = self.state.info.get("ledger", {})
            if records:
                self.r.hset(self.ledger.key, mapping={k: json.dumps(v, sort_keys=True) for k, v in records.items()})
            self.ledger.init(self.train_shards)
            self.emit("resume", detail=f"from {path.name}: round {self.state.round}, {self.state.tokens} tokens")

    def _take_over(self) -> None:
        """Become the run's server: sites still working for an earlier incarnation stop, and rounds after
        the checkpoint (started by a server that died before checkpointing them) may be run again."""
        self.server_id = secrets.token_hex(6)
        self.r.set(protocol.server_current_key(self.run_id), self.server_id)
        self._alive = threading.Event()
        threading.Thread(target=self._heartbeat, name="server-heartbeat", daemon=True).start()
        stale = [k for k in self.r.scan_iter(match=coordination.key(self.run_id, "round", "*", "stop"))
                 if int(k.split(":")[-2]) > self.state.round]
        if stale:
            self.r.delete(*stale)

    def _heartbeat(self) -> None:
        while not self._alive.is_set():
            try:
                self.r.set(protocol.server_alive_key(self.run_id), self.server_id, ex=protocol.ALIVE_TTL_S)
            except redis.RedisError as error:
                log(WARNING, "pilot: heartbeat: %s", error)
            self._alive.wait(protocol.HEARTBEAT_S)

    # -------------------------------------------------------------- logging
    def emit(self, kind: str, **fields: object) -> None:
        """One line on the console, one entry in the run's server event stream, one in RUN_DIR/logs."""
        wall_ts = time.time()
        sim_ts = self.sim_time_at(wall_ts)
        self.runlog.event(kind, wall_ts, sim_ts, fields)
        entry = {"kind": kind, "wall_ts": f"{wall_ts:.3f}", "sim_ts": _stream_value(sim_ts),
                 **{k: _stream_value(v) for k, v in fields.items()}}
        try:
            self.r.xadd(protocol.server_events_key(self.run_id), entry)
        except redis.RedisError as error:
            log(WARNING, "pilot: could not log to Redis: %s", error)
        log(INFO, "pilot: %s %s", kind, " ".join(f"{k}={entry[k]}" for k in fields))

    # -------------------------------------------------------------- who is there, who may train
    def discover(self, force: bool = False) -> None:
        """Learn which node serves which site. New nodes are asked their name (a QUERY, which also warm-starts
        their site trainer); the answers are collected without blocking the loop, so a node that is slow to
        answer (a busy machine, a trainer starting) is not lost, only late. A node whose query fails is not
        used again (a restarted SuperNode comes back under a new id); of two nodes with one name, the one
        that identified itself last serves the site. `force`: wait up to handshake-timeout for the answers."""
        self._collect_names()
        if not force and time.monotonic() - self.last_discovery < REDISCOVER_S:
            return
        self.last_discovery = time.monotonic()
        node_ids = set(self.grid.get_node_ids()) - self.dead_nodes
        self.node_names = {n: v for n, v in self.node_names.items() if n in node_ids}
        asked = {node for node, _ in self.pending_queries.values()}
        new = node_ids - set(self.node_names) - asked
        if new:
            queries = [Message(RecordDict({IDENTIFY: self.site_record()}), dst_node_id=n, message_type=MessageType.QUERY)
                       for n in sorted(new)]
            for message_id, node in zip(self.grid.push_messages(queries), sorted(new), strict=True):
                self.pending_queries[message_id] = (node, time.monotonic())
        deadline = time.monotonic() + (self.cfg["handshake-timeout"] if force else 0)
        while force and self.pending_queries and time.monotonic() < deadline:
            time.sleep(0.5)
            self._collect_names()
        # a query unanswered for handshake-timeout is asked again (the node may have missed it)
        late = [m for m, (_, at) in self.pending_queries.items() if time.monotonic() - at > self.cfg["handshake-timeout"]]
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

    def site_record(self) -> ConfigRecord:
        """What a site needs to start its trainer: the run, its directory and Redis, processes, device."""
        return ConfigRecord({"run-id": self.run_id, "run-dir": str(self.run_dir), "redis-url": self.redis_url,
                             "site-nproc": self.cfg["site-nproc"], "site-device": self.cfg["site-device"]})

    def node_failed(self, site: str) -> None:
        """The site's node did not answer: forget it until a node of that site identifies itself again."""
        node = self.sites.pop(site, None)
        if node is not None:
            self.dead_nodes.add(node)
            self.node_names.pop(node, None)

    def curtailed(self) -> set[str]:
        if self.cfg["curtailment"] == "always":
            return set(self.sites)
        return set(self.events.curtailed_sites())

    def sim_now(self) -> float:
        if self.cfg["curtailment"] == "always":
            return time.time()
        clock = self.events.clock()
        return clock.now() if clock else time.time()

    def sim_time_at(self, wall_ts: float) -> float | None:
        """The simulated time at a wall-clock moment (None before the energy simulation has a clock)."""
        if self.cfg["curtailment"] == "always":
            return wall_ts
        if time.monotonic() - self._clock_read > 0.2:  # one Redis read per 0.2 s, however many steps are logged
            self._clock_read = time.monotonic()
            clock = self.events.clock()
            if clock is not None and clock.status == "running":
                self.timeline.add(clock.wall_ts, clock.sim_ts, clock.speedup, clock.step_s)
            elif clock is not None:  # a finished (or paused) simulation has held its last step to its end
                self.timeline.add(clock.wall_ts, clock.sim_ts + clock.step_s, 0.0, clock.step_s)
        return self.timeline.at(wall_ts)

    def energy_finished(self) -> bool:
        if self.cfg["curtailment"] == "always":
            return False
        clock = self.events.clock()
        return clock is not None and clock.status == "finished"

    def wait_for_energy_news(self, block_ms: int) -> None:
        if self.cfg["curtailment"] == "always":
            time.sleep(block_ms / 1000)
            return
        self.sim_time_at(time.time())  # keep the wall -> simulated timeline's anchors current
        if not self.runlog.has_energy_config:
            clock = self.events.clock()
            if clock is not None:
                source = self.r.get(energy_events.source_key(self.run_id))
                self.runlog.energy_config({**self.events.config(), **({"scenario_path": source} if source else {})},
                                          speedup=clock.speedup)
        events = self.events.read(block_ms=block_ms)
        for event in events:
            self.runlog.energy(event.site, event.curtailed, event.sim_ts, event.value)
            self.emit("energy", site=event.site, curtailed=int(event.curtailed), event_sim_ts=event.sim_ts)
        if events:
            self.events.commit(events[-1].id)

    # -------------------------------------------------------------- the loop
    def run(self) -> None:
        self.discover(force=True)
        outcome = "stopped"
        while True:
            if self.state.tokens // self.plan.total_batch_size >= self.horizon:
                outcome = "horizon"
                break
            if self.ledger.exhausted():
                outcome = "data exhausted"
                break
            if 0 < self.cfg["max-rounds"] <= self.state.round:
                outcome = "max rounds"
                break
            if self.energy_finished():
                outcome = "energy simulation finished"
                break
            self.discover()
            training = regimes.members(self.curtailed(), set(self.sites))
            regime = regimes.regime(training)
            if regime != self.regime:
                self.emit("regime", regime=regime, sites=sorted(training))
                self.regime = regime
            if regime == regimes.PAUSED:
                self.wait_for_energy_news(block_ms=1000)
                continue
            self.run_round(training)
        self.finish(outcome)

    def run_round(self, members: frozenset[str]) -> None:
        cfg = self.cfg
        number = self.state.round + 1
        digest = self.store.publish(self.state.weights)
        schedule_step = self.state.tokens // self.plan.total_batch_size
        # the sites of a round share the steps left to the horizon
        max_steps = -(-(self.horizon - schedule_step) // len(members))
        messages, assignments = {}, {}
        # a lone site hands in its exact weights (they become the global model as they are); several hand
        # in what the run asks for (bf16 pseudo-gradients halve the bytes)
        update_payload = cfg["update-payload"] if len(members) > 1 else "weights-fp32"
        for site in sorted(members):
            assignment = self.ledger.assign(site, world_size=cfg["site-nproc"])
            if not assignment.shards:
                # no free shard left: take over the unfinished shards of sites that are not training now
                # (from their committed cursors), rather than leave a curtailed site idle
                released = [s for other in sorted(self.seen_sites - members) for s in self.ledger.release(other)]
                if released:
                    self.emit("shards-released", shards=released, to=site)
                    assignment = self.ledger.assign(site, world_size=cfg["site-nproc"])
            if not assignment.shards:
                continue
            assignments[site] = assignment
            request = RoundRequest(round=number, server_id=self.server_id, weights_digest=digest, blob_url=self.blob_url,
                                   blob_token=self.blob_token, shards=assignment.shards, cursors=assignment.cursors,
                                   schedule_step=schedule_step, max_steps=max_steps, update_payload=update_payload,
                                   blob_ca=self.blob_ca)
            record = self.site_record()
            record["request"] = request.to_json()
            messages[site] = Message(RecordDict({ROUND_KEY: record}), dst_node_id=self.sites[site],
                                     message_type=MessageType.TRAIN)
        if not messages:  # nothing for these sites to train now: wait for the energy picture to change
            self.wait_for_energy_news(block_ms=1000)
            return
        duration = cfg["round-duration"] if len(messages) > 1 else cfg["solo-checkpoint-interval"]
        current = regimes.Round(number, frozenset(messages), started_at=self.sim_now(), duration=duration)
        self.emit("round-start", round=number, regime=current.regime, sites=sorted(messages),
                  shards={s: a.shards for s, a in assignments.items()})
        ids = dict(zip(self.grid.push_messages(messages.values()), messages, strict=True))  # message id -> site
        results: dict[str, RoundResult] = {}
        stop_reason, stop_sent = "", None
        while len(results) < len(ids):
            pending = [i for i, s in ids.items() if s not in results]
            for reply in self.grid.pull_messages(pending):
                site = ids.get(reply.metadata.reply_to_message_id)
                if site is None:
                    continue
                if reply.has_error():
                    results[site] = RoundResult(round=number, site=site, status="error", server_id=self.server_id,
                                                reason=f"node error: {reply.error.reason[:300]}")
                    if reply.error.code == ErrorCode.NODE_UNAVAILABLE:  # the SuperNode is gone (an app
                        self.node_failed(site)                        # error leaves the node in service)
                else:
                    results[site] = RoundResult.from_json(str(reply.content[RESULT_KEY]["result"]))
            # a result also lands in the site's outbox: it counts even if the site's SuperNode died on the way
            for site in set(ids.values()) - set(results):
                result = self.result_in_outbox(site, number)
                if result is not None:
                    results[site] = result
            if len(results) == len(ids):
                break
            if stop_sent is None:
                self.discover()
                now = self.sim_now()
                # a curtailed site that got no data this round (none left for it) is not a newcomer
                training_now = regimes.members(self.curtailed(), set(self.sites)) - (members - set(messages))
                reason = regimes.end_reason(current, now, training_now)
                if reason is None and current.regime == regimes.SOLO and now >= current.started_at + duration:
                    reason = "solo checkpoint interval"
                if reason is None and self.energy_finished():
                    reason = "energy simulation finished"
                if reason is None and training_now == current.members and \
                        self.state.tokens // self.plan.total_batch_size >= self.horizon:
                    reason = "horizon"
                if reason is not None:
                    stop_reason, stop_sent = reason, time.monotonic()
                    self.r.set(protocol.stop_key(self.run_id, number), reason, ex=24 * 3600)
                    self.emit("round-stop", round=number, reason=reason)
            elif time.monotonic() - stop_sent > cfg["stop-grace"]:
                for site in set(ids.values()) - set(results):
                    results[site] = RoundResult(round=number, site=site, status="error",
                                                reason=f"no result {cfg['stop-grace']} s after the stop")
                    self.node_failed(site)
                break
            self.runlog.drain_steps(ids.values())
            self.wait_for_energy_news(block_ms=int(POLL_S * 1000))
        self.r.set(protocol.stop_key(self.run_id, number), stop_reason or "round over", ex=24 * 3600)
        self.runlog.drain_steps(ids.values())
        for site, result in sorted(results.items()):
            wall_start, wall_end = result.extra.get("wall_start"), result.extra.get("wall_end")
            self.emit("site-result", round=number, site=site, status=result.status, reason=result.reason,
                      tokens=result.tokens, steps=result.steps, loss=result.loss,
                      seconds_training=result.seconds_training, seconds_total=result.seconds_total,
                      wall_start=wall_start, wall_end=wall_end,
                      sim_start=self.sim_time_at(wall_start) if wall_start else None,
                      sim_end=self.sim_time_at(wall_end) if wall_end else None)
        self.aggregate(number, current, results, assignments, stop_reason)
        if not any(r.status == "ok" for r in results.values()):
            self.wait_for_energy_news(block_ms=2000)  # every site failed: do not hammer them in a tight loop

    def result_in_outbox(self, site: str, number: int) -> RoundResult | None:
        for _, fields in self.r.xrevrange(protocol.outbox_key(self.run_id, site), count=3):
            result = RoundResult.from_json(fields["result"])
            if result.round == number and result.server_id == self.server_id:
                return result
        return None

    def aggregate(self, number: int, current: regimes.Round, results: dict[str, RoundResult],
                  assignments: dict, stop_reason: str) -> None:
        weights, kinds, tokens = {}, {}, {}
        for site, result in sorted(results.items()):
            if result.status != "ok":
                released = self.ledger.release(site)
                self.emit("site-failed", round=number, site=site, reason=result.reason, reissued=released)
                continue
            if result.exhausted:  # its shards are trained to the end (a rejected update's rows are not redone)
                self.ledger.finish(assignments[site].shards)
            if result.steps == 0:
                continue
            blob = self.store.get(result.weights_digest)
            try:
                if blob is None:
                    raise RejectedUpdate(f"weights {result.weights_digest[:12]} were never uploaded")
                kind = blob.metadata.get("payload", "weights-fp32")
                if kind not in payload.KINDS:
                    raise RejectedUpdate(f"unknown update payload {kind!r}")
                check_update(blob.tensors, self.state.weights, result.tokens)
            except RejectedUpdate as error:
                self.emit("update-rejected", round=number, site=site, reason=error)
                self.ledger.release(site)
                continue
            weights[site], kinds[site], tokens[site] = blob.tensors, kind, result.tokens
        if weights:
            if len(weights) == 1:
                # one site (the solo regime, or the only one left): plain training, no outer step; its
                # weights are the new global model (exactly, for a weights-fp32 update, which solo rounds
                # ask for: the site then needs to fetch nothing next round)
                ((site, update),) = weights.items()
                new_weights = payload.decode_update(update, self.state.weights, kinds[site])
                new_weights = {k: v.clone() for k, v in new_weights.items()} if kinds[site] == "weights-fp32" \
                    else new_weights
            else:
                # pseudo-gradients (start - end), as sent (bf16) or from the weights; averaged in fp32
                deltas = {s: w if kinds[s] == "delta-bf16" else
                          {k: self.state.weights[k].float() - w[k].float() for k in w} for s, w in weights.items()}
                new_weights = self.outer.step(self.state.weights, average_updates(deltas, tokens, self.state.weights))
            self.state.weights = new_weights
        for site in weights:
            result, assignment = results[site], assignments[site]
            if not result.exhausted and result.cursors:
                self.ledger.commit(site, assignment.shards, result.cursors, result.world_size)
        trained = sum(tokens.values())
        self.state.round = number
        self.state.tokens += trained
        self.state.outer_state = self.outer.state
        val_bpb = self.evaluate() if weights else None
        self.state.info = {"ledger": {k: json.loads(v.to_json()) for k, v in self.ledger.records().items()},
                           "model_config": self.plan.model_config.to_dict(), "outer": self.outer.kind,
                           "val_bpb": val_bpb}
        path = global_state.save(self.run_dir, self.state)
        self.store.retain(set())  # uploads are averaged in; the next round publishes anew
        losses = {s: round(results[s].loss, 4) for s in weights}
        self.emit("round-end", round=number, regime=current.regime, sites=sorted(weights),
                  reason=stop_reason or "all sites done", tokens=trained, total_tokens=self.state.tokens,
                  loss=losses, val_bpb=round(val_bpb, 4) if val_bpb is not None else None,
                  trainers={s: [r.trainer_pid, r.trainer_step] for s, r in results.items()},
                  busy={s: round(r.seconds_training / max(r.seconds_total, 1e-9), 3)
                        for s, r in results.items() if r.status == "ok"},
                  training_s={s: round(r.seconds_training, 3) for s, r in results.items()},
                  checkpoint=path.name)

    def evaluate(self) -> float | None:
        tokens = self.cfg["eval-tokens"]
        if tokens <= 0:
            return None
        if self.eval_model is None:  # built once: a d20 model takes seconds to build
            self.eval_model = build_model(self.plan.model_config, device="cpu", seed=0).eval()
        model = self.eval_model
        model.load_state_dict(self.state.weights)
        B, T = self.train_config.device_batch_size, self.train_config.max_seq_len
        loader = DataLoader(self.tokenizer, B, T, split="val", files=[self.val_shard])
        try:
            return evaluate_bpb(model, loader, max(1, tokens // (B * T)), get_token_bytes(self.tokenizer_dir))
        finally:
            loader.close()

    def finish(self, outcome: str) -> None:
        path = self.run_dir / "final_model.safetensors"
        save_model(path, self.state.weights, self.plan.model_config.to_dict(),
                   extra={"round": self.state.round, "tokens": self.state.tokens, "outcome": outcome})
        self.emit("finished", outcome=outcome, round=self.state.round, tokens=self.state.tokens, final_model=str(path))

    def close(self) -> None:
        if self.provisioning is not None:
            self.provisioning.close()
        for site in self.seen_sites:
            shutdown_trainer(self.r, self.run_id, site)
        self.blob_server.stop()
        self._alive.set()
        self.r.delete(protocol.server_alive_key(self.run_id))
        self.runlog.close()
        coordination.release(self.r, self.run_dir)  # the embedded Redis stops when its last user lets go
