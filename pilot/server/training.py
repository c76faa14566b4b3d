"""The training side of the server, next to the global state: the model plan the sites share, the global
model and its checkpoints, the data ledger, aggregation of a round's updates, evaluation and the final model.
Everything torch- and nanochat-shaped on the server lives here; the loop only calls it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from logging import WARNING
from pathlib import Path

import redis
from flwr.common.logger import log

from nanochat.checkpoint import model_file_metadata
from nanochat.common import get_base_dir
from nanochat.dataloader import DataLoader
from nanochat.dataset import list_parquet_files
from nanochat.gpt import build_model, model_of
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import Tokenizer, get_token_bytes
from nanochat.trainer import TrainConfig, plan_training
from pilot import protocol
from pilot.dataplane import payload
from pilot.dataplane.blob import save_file
from pilot.dataplane.store import BlobStore
from pilot.protocol import RoundResult
from pilot.server import checkpoint
from pilot.server.aggregation import (
    OuterOptimizer,
    RejectedUpdate,
    RunningMean,
    check_update,
    round_fraction,
)
from pilot.server.checkpoint import GlobalState
from pilot.server.ledger import Assignment, Ledger
from pilot.settings import ModelGroup, RoundGroup


def shards_trained(assignment: Assignment, result: RoundResult) -> list[str]:
    """The shards a site worked through in a round: its assignment, then the spares it leased, in order."""
    spares = [name for name in result.extra.get("spares", []) if name not in assignment.shards]
    return [*assignment.shards, *spares]


@dataclass
class HeldUpdate:
    """A round's first weights-fp32 update (a solo round's), held as it was read: adopted as it is if it stays
    the only one."""
    site: str
    kind: str
    tensors: dict
    digest: str


@dataclass
class RoundIntake:
    """One round's results taken in so far: which sites, their tokens, the first update, the running mean."""
    round: int
    mean: RunningMean
    taken: set[str] = field(default_factory=set)
    tokens: dict[str, int] = field(default_factory=dict)
    first: HeldUpdate | None = None


class GlobalModel:
    """The run's global model and everything that moves it."""

    def __init__(self, client: redis.Redis, run_id: str, run_dir: Path, model: ModelGroup, rounds: RoundGroup,
                 nproc: int, emit: Callable[..., None], emulate_step_s: float = 0.0):
        self.r, self.run_id, self.run_dir, self.rounds, self.emit = client, run_id, run_dir, rounds, emit
        self.eval_tokens = rounds.eval_tokens
        self.emulate_step_s = emulate_step_s
        self._plan(model, nproc)
        self._open(rounds)
        self.adopted = ""    # digest of the uploaded blob that is the global model as it is (a solo result)
        self._intake: RoundIntake | None = None   # the round's results taken in so far (take / aggregate)

    # -------------------------------------------------------------- setup
    def _plan(self, model: ModelGroup, nproc: int) -> None:
        base = get_base_dir()
        self.data_dir = Path(model.data_dir or base / "base_data").resolve()
        self.tokenizer_dir = Path(model.tokenizer_dir or base / "tokenizer").resolve()
        files = list_parquet_files(self.data_dir)
        if len(files) < 2:
            raise FileNotFoundError(f"{self.data_dir}: need at least 2 parquet shards (training + validation), "
                                    f"found {len(files)}; build some with python -m nanochat.offline_corpus")
        self.train_shards, self.val_shard = [f.name for f in files[:-1]], files[-1]
        self.tokenizer = Tokenizer.from_directory(self.tokenizer_dir)
        self.train_config = TrainConfig(depth=model.depth, max_seq_len=model.max_seq_len,
                                        device_batch_size=model.device_batch_size,
                                        total_batch_size=model.total_batch_size, compile="off",
                                        **model.optimization())
        if self.emulate_step_s > 0:  # benchmarks only: a fixed-duration stand-in for each GPU step (nanochat/trainer.py)
            self.train_config.emulate_step_s = self.emulate_step_s
        if self.rounds.token_budget > 0:
            self.train_config.num_iterations = max(1, self.rounds.token_budget // model.total_batch_size)
        self.plan = plan_training(self.train_config, self.tokenizer.get_vocab_size(), world_size=nproc)
        self.horizon = self.plan.num_iterations
        spec = {**asdict(self.train_config), "num_iterations": self.horizon, "compile": "auto",
                "data_dir": str(self.data_dir), "tokenizer_dir": str(self.tokenizer_dir)}
        self.r.set(protocol.train_config_key(self.run_id), json.dumps(spec))
        self.emit("setup", detail=self.plan.describe().replace("\n", "; "))

    def _open(self, rounds: RoundGroup) -> None:
        self.outer = OuterOptimizer(rounds.outer_optimizer, lr=rounds.outer_lr, momentum=rounds.outer_momentum)
        self.ledger = Ledger(self.r, self.run_id)
        path = checkpoint.latest(self.run_dir)
        self.r.delete(self.ledger.key)  # the checkpoint is the truth; without one, nothing was trained yet
        if path is None:
            model = build_model(self.plan.model_config, device="cpu", seed=self.train_config.seed)
            # the new model's own tensors (no copy: the model object goes, its weights stay)
            self.state = GlobalState(weights={k: v.detach() for k, v in model.state_dict().items()})
            self.ledger.init(self.train_shards)
            self.emit("start", detail=f"new run in {self.run_dir}")
        else:
            self.state = checkpoint.load(path)
            self.outer.state = self.state.outer_state
            # Redis may have been ahead (a round that was never checkpointed) or empty: restore the snapshot
            records = self.state.info.get("ledger", {})
            if records:
                self.r.hset(self.ledger.key, mapping={k: json.dumps(v, sort_keys=True) for k, v in records.items()})
            self.ledger.init(self.train_shards)
            self.emit("resume", detail=f"from {path.name}: round {self.state.round}, {self.state.tokens} tokens")

    # -------------------------------------------------------------- where the run is
    @property
    def steps_done(self) -> int:
        """Optimizer steps of the global schedule taken so far (tokens / tokens per step)."""
        return self.state.tokens // self.plan.total_batch_size

    @property
    def horizon_reached(self) -> bool:
        return self.steps_done >= self.horizon

    # -------------------------------------------------------------- a round's work
    def take(self, number: int, site: str, result: RoundResult, assignment: Assignment, store: BlobStore) -> None:
        """Take one site's result of round `number` in as it arrives (while other sites still train): a failure
        releases its shards; an update is read, checked and added to the round's running mean (one fp32 copy
        however many sites); only a weights-fp32 update (a solo round's) is held as it is
        until a second one comes, to be adopted as the global model if none does. `aggregate` finishes the round."""
        if self._intake is None or self._intake.round != number:
            self._intake = RoundIntake(number, RunningMean(self.state.weights))
        intake = self._intake
        intake.taken.add(site)
        if result.status != "ok":
            if result.extra.get("shard"):   # a file the site could not read: others first, for that site
                self.ledger.mark_unreadable(result.extra["shard"], site)
            released = self.ledger.release(site)
            self.emit("site-failed", round=number, site=site, reason=result.reason, reissued=released,
                      unreadable=result.extra.get("shard"))
            return
        if result.exhausted:  # its shards are trained to the end (a rejected update's rows are not redone)
            self.ledger.finish(shards_trained(assignment, result))
        if result.steps == 0:
            return
        blob = store.get(result.weights_digest)
        try:
            if blob is None:
                raise RejectedUpdate(f"weights {result.weights_digest[:12]} were never uploaded")
            try:
                kind, tensors = payload.read_update(blob)
            except ValueError as error:
                raise RejectedUpdate(str(error)) from error
            check_update(tensors, self.state.weights, result.tokens)
        except RejectedUpdate as error:
            self.emit("update-rejected", round=number, site=site, reason=error)
            self.ledger.release(site)
            return
        intake.tokens[site] = result.tokens
        mean, first = intake.mean, intake.first
        if kind == "weights-fp32" and first is None and not mean.sites:   # held: a lone one is adopted as it is
            intake.first = HeldUpdate(site, kind, tensors, result.weights_digest)
            return
        if first is not None and first.site not in mean.sites:
            mean.add(first.site, payload.as_delta(first.tensors, self.state.weights, first.kind),
                     intake.tokens[first.site])
        mean.add(site, payload.as_delta(tensors, self.state.weights, kind), result.tokens)
        # the blob stays in the store until the round's end (the loop lets every upload go then): another site's
        # result may name the same bytes (one digest, one blob), and a pseudo-gradient waits on disk, not in memory

    def aggregate(self, number: int, results: Mapping[str, RoundResult], assignments: Mapping[str, Assignment],
                  store: BlobStore, span: tuple[float, float] = (0.0, 0.0)) -> dict[str, int]:
        """Fold a round's results into the global model (those not taken in yet first); commit the ledger;
        returns tokens by site aggregated.

        One site (the solo regime, or the only one left): plain training, no outer step; its weights are the
        new global model, adopted as uploaded (a weights-fp32 update, which solo rounds ask for: the site then
        holds exactly the global model and fetches nothing next round, and the server hashes nothing). Several:
        their pseudo-gradients, averaged in fp32 weighted by tokens as they arrived, go through the outer
        optimizer, its step weighted by the round's length (`span`, simulated seconds) against round-duration
        (with round-steps: the sites' mean steps against round-steps)."""
        for site, result in sorted(results.items()):
            if self._intake is None or self._intake.round != number or site not in self._intake.taken:
                self.take(number, site, result, assignments[site], store)
        intake, self._intake = self._intake, None
        tokens = dict(intake.tokens) if intake else {}
        self.adopted = ""
        if intake and intake.first is not None and not intake.mean.sites:
            first = intake.first
            # a weights-fp32 payload decodes to the uploaded blob's own tensors: they become the global model
            # as they are (the store keeps that blob; nothing writes into a blob's tensors)
            self.state.weights = payload.decode_update(first.tensors, self.state.weights, first.kind)
            if first.kind == "weights-fp32":
                self.adopted = first.digest
        elif intake and len(intake.mean.sites) == 1:
            # one site's pseudo-gradient (the round's other sites failed): its weights, start - delta, as they are
            # (written into the mean's own memory), no outer step, as for a lone upload of weights
            self.state.weights = OuterOptimizer("none").step(self.state.weights, intake.mean.mean())
        elif intake and intake.mean.sites:
            start, end = span
            fraction = round_fraction(end - start, self.rounds.round_duration,
                                      sum(results[s].steps for s in tokens) / len(tokens), self.rounds.round_steps)
            last = self.state.info.get("outer_sim_ts")   # end of the last federated round
            idle = max(0.0, (start - last) / self.rounds.round_duration) if last else 0.0
            self.state.weights = self.outer.step(self.state.weights, intake.mean.mean(), fraction=fraction,
                                                 idle=idle)
            self.state.info["outer_sim_ts"] = end
        for site in tokens:
            result, assignment = results[site], assignments[site]
            if not result.exhausted and result.cursors:
                self.ledger.commit(site, shards_trained(assignment, result), result.cursors, result.world_size)
        self.state.round = number
        self.state.tokens += sum(tokens.values())
        self.state.outer_state = self.outer.state
        return tokens

    def snapshot(self) -> GlobalState:
        """The global state as it is now, for the after-round worker: the weights and momentum are referenced,
        not copied (the next round replaces them with new tensors, never writes into them), the ledger is
        read now."""
        info = {**self.state.info, "ledger": {k: json.loads(v.to_json()) for k, v in self.ledger.records().items()},
                "model_config": self.plan.model_config.to_dict(), "outer": self.outer.kind}
        return GlobalState(weights=dict(self.state.weights), round=self.state.round, tokens=self.state.tokens,
                           outer_state=dict(self.outer.state), info=info)

    def save(self, state: GlobalState, val_bpb: float | None) -> Path:
        """Checkpoint a snapshot of the global state (with the ledger's snapshot and its validation bpb)."""
        state.info["val_bpb"] = val_bpb
        return checkpoint.save(self.run_dir, state)

    def evaluate(self, weights: Mapping | None = None) -> float | None:
        """Validation bits per byte of the global model (or `weights`) on eval-tokens of the held-out shard."""
        if self.eval_tokens <= 0:
            return None
        # the weights themselves as the model's parameters (no copy; let go of when the evaluation ends)
        model = model_of(self.plan.model_config, dict(self.state.weights if weights is None else weights)).eval()
        B, T = self.train_config.device_batch_size, self.train_config.max_seq_len
        loader = DataLoader(self.tokenizer, B, T, split="val", files=[self.val_shard])
        try:
            return evaluate_bpb(model, loader, max(1, self.eval_tokens // (B * T)), get_token_bytes(self.tokenizer_dir))
        finally:
            loader.close()

    def finish(self, outcome: str) -> Path:
        path = self.run_dir / "final_model.safetensors"
        # nanochat's model file (load_model reads it), streamed from the masters' own memory: save_model's copy
        # and serialised bytes would be two more model copies at the run's end
        save_file(path, self.state.weights, model_file_metadata(
            self.plan.model_config.to_dict(),
            extra={"round": self.state.round, "tokens": self.state.tokens, "outcome": outcome}))
        return path


class AfterRound:
    """The server's work after a round, off the critical path: evaluation and the checkpoint run on this worker
    while the next round already trains. One job at a time, in order; a job waits for the one before it
    (so checkpoints are written in round order and at most one snapshot is in flight)."""

    def __init__(self, model: GlobalModel, on_done: Callable[[int, float | None, Path, dict[str, float]], None],
                 on_error: Callable[[int, BaseException], None], still_current: Callable[[], bool] = lambda: True):
        self.model, self.on_done, self.on_error = model, on_done, on_error
        self.still_current = still_current   # a superseded server (a later one claimed the run) writes no checkpoint
        self._thread: threading.Thread | None = None

    def submit(self, state: GlobalState, evaluate: bool) -> None:
        self.drain()
        self._thread = threading.Thread(target=self._run, args=(state, evaluate), name="after-round", daemon=True)
        self._thread.start()

    def _run(self, state: GlobalState, evaluate: bool) -> None:
        try:
            began = time.monotonic()
            val_bpb = self.model.evaluate(state.weights) if evaluate else None
            evaluated = time.monotonic()
            if not self.still_current():
                log(WARNING, "pilot: round %d not checkpointed: a later server took the run over", state.round)
                return
            path = self.model.save(state, val_bpb)
            self.on_done(state.round, val_bpb, path, {"evaluate_s": round(evaluated - began, 3),
                                                      "checkpoint_s": round(time.monotonic() - evaluated, 3)})
        except BaseException as error:  # noqa: BLE001 - reported; the next job or drain() goes on
            self.on_error(state.round, error)

    def drain(self) -> None:
        """Wait for the job in flight (before the next one, and before the run's end)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
