"""The Trainer in-process on real text: it learns (below the unigram entropy), and the step-by-step API a
federated site drives (weights in and out with optimizer state kept, agreed stops, end of data, checkpoints
that continue exactly)."""

from __future__ import annotations

import collections
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import DataLoader
from nanochat.distributed import DistInfo
from nanochat.tokenizer import Tokenizer, get_token_bytes
from nanochat.trainer import (
    DataExhausted,
    RowShardedBatches,
    TrainConfig,
    Trainer,
    make_train_batches,
    plan_training,
    train_loop,
)

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
# A short read-ahead: the loader's default (8 x 64 documents, some of them whole plays) keeps a tokenizer thread
# busy for seconds and starves the training step of the two cores.
LOADER = dict(tokenizer_threads=1, tokenizer_batch=8, prefetch=1)


def tiny_cfg(**overrides) -> TrainConfig:
    base = dict(depth=2, max_seq_len=64, device_batch_size=8, total_batch_size=1024, num_iterations=60,
                compile="off", warmdown_ratio=0.2)
    return TrainConfig(**{**base, **overrides})


def shards(text_shards: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(text_shards.glob("shard_*.parquet"))
    return files[:-1], files[-1:]


def make_trainer(cfg, tok, files, state=None, **loader_kw) -> Trainer:
    plan = plan_training(cfg, tok.get_vocab_size(), 1)
    trainer = Trainer.create(cfg, plan, CPU)
    trainer.train_batches = make_train_batches(tok, cfg, plan, 0, 1, "cpu", files, state=state,
                                               **{**LOADER, **loader_kw})
    return trainer


def unigram_entropy(tok: Tokenizer, files: list[Path]) -> float:
    """Nats per token of the best context-free model of these documents (their own token frequencies)."""
    texts = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    counts = collections.Counter(i for ids in tok.encode(texts, prepend=tok.get_bos_token_id()) for i in ids)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


@torch.no_grad()
def mean_val_loss(model, tok, val_files, batches=8) -> float:
    loader = DataLoader(tok, 8, 64, split="val", files=val_files, **LOADER)
    losses = [model(x, y).item() for _, (x, y) in zip(range(batches), loader, strict=False)]
    loader.close()
    return sum(losses) / len(losses)


def test_loss_falls_clearly_below_unigram_entropy(text_shards, tiny_tokenizer):
    tok = Tokenizer.from_directory(tiny_tokenizer)
    train_files, val_files = shards(text_shards)
    entropy = unigram_entropy(tok, val_files)
    trainer = make_trainer(tiny_cfg(), tok, train_files)
    start = mean_val_loss(trainer.model, tok, val_files)
    assert start == pytest.approx(math.log(tok.get_vocab_size()), abs=1e-4)   # uniform at init
    token_bytes = get_token_bytes(tiny_tokenizer)

    def evaluate():
        loader = DataLoader(tok, 8, 64, split="val", files=val_files, **LOADER)
        try:
            return trainer.evaluate_bpb(loader, 8, token_bytes)
        finally:
            loader.close()

    seen = []
    outcome = train_loop(trainer, None, eval_every=30, evaluate=evaluate, on_step=lambda r, b: seen.append(r),
                         log=lambda *a: None)
    assert outcome.reason == "horizon" and outcome.step == 60 and len(seen) == 60
    assert [r.step for r in seen] == list(range(1, 61))
    assert seen[-1].lr_multiplier == pytest.approx(1 / 12)                 # last warm-down step
    end = mean_val_loss(trainer.model, tok, val_files)
    print(f"unigram entropy {entropy:.3f} nats/token; val loss {start:.3f} -> {end:.3f}; "
          f"val bpb {outcome.val_bpb:.3f}")
    assert end < entropy - 0.4, (end, entropy)
    assert outcome.val_bpb < 2.6


def test_weights_swap_keeps_optimizer_state_and_stop_is_agreed(text_shards, tiny_tokenizer):
    tok = Tokenizer.from_directory(tiny_tokenizer)
    train_files, _ = shards(text_shards)
    trainer = make_trainer(tiny_cfg(num_iterations=10), tok, train_files)
    initial = trainer.get_weights()
    assert all(v.device.type == "cpu" for v in initial.values())
    trainer.step()
    trainer.step()
    muon_buffers = trainer.optimizers["muon"].state_tensors()
    after_two = trainer.get_weights()
    assert not torch.equal(after_two["lm_head.weight"], initial["lm_head.weight"])
    trainer.set_weights(initial)                          # a new global model arrives
    assert all(torch.equal(trainer.model.state_dict()[k], initial[k]) for k in initial)
    assert trainer.step_count == 2                        # schedule clock and optimizer state are kept
    kept = trainer.optimizers["muon"].state_tensors()
    assert all(torch.equal(kept[k], muon_buffers[k]) for k in kept)
    initial["lm_head.weight"][0, 0] = 123.0               # the trainer holds no reference to what it was given
    assert trainer.model.lm_head.weight[0, 0].item() != 123.0
    with pytest.raises(ValueError, match="lm_head.weight has shape"):
        trainer.set_weights({**initial, "lm_head.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="names differ"):
        trainer.set_weights({k: v for k, v in initial.items() if k != "lm_head.weight"})
    assert trainer.step().stop is False
    trainer.request_stop()                                # e.g. from a signal handler or a watcher thread
    result = trainer.step()
    assert result.stop is True and result.step == 4       # the step completes; the caller stops after it
    assert trainer.agree(False) is False and trainer.agree(True) is True


def test_end_of_data_takes_no_partial_step(text_shards, tiny_tokenizer):
    tok = Tokenizer.from_directory(tiny_tokenizer)
    cfg = tiny_cfg(num_iterations=10 ** 6, total_batch_size=8 * 64 * 2)
    plan = plan_training(cfg, tok.get_vocab_size(), 1)
    trainer = Trainer.create(cfg, plan, CPU)
    x = torch.randint(0, tok.get_vocab_size(), (8, 64))
    trainer.train_batches = iter([(x, x)] * 5)           # 2.5 steps of data
    trainer.step()
    trainer.step()
    before = trainer.get_weights()
    with pytest.raises(DataExhausted):
        trainer.step()
    assert trainer.step_count == 2 and all(p.grad is None for p in trainer.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in trainer.get_weights().items())


def test_loop_ends_with_a_checkpoint_when_data_runs_out(tmp_path):
    cfg = tiny_cfg(num_iterations=100, total_batch_size=8 * 64)
    trainer = Trainer.create(cfg, plan_training(cfg, 300, 1), CPU)
    x = torch.randint(0, 300, (8, 64))
    trainer.train_batches = iter([(x, x)] * 3)
    logged = []
    outcome = train_loop(trainer, tmp_path, save_every=2, keep=None, log=logged.append)
    assert (outcome.reason, outcome.step) == ("data", 3)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step_000002", "step_000003"]
    assert any("training data ran out during step 4" in line for line in logged)


def test_rows_and_documents_sharding_agree_on_one_rank(text_shards, tiny_tokenizer):
    """With one rank both modes read the same tokens in the same order (rows slices whole-step batches)."""
    tok = Tokenizer.from_directory(tiny_tokenizer)
    train_files, _ = shards(text_shards)
    losses = {}
    for mode in ("documents", "rows"):
        trainer = make_trainer(tiny_cfg(num_iterations=3, total_batch_size=8 * 64 * 2, data_sharding=mode),
                               tok, train_files)
        if mode == "rows":
            assert isinstance(trainer.train_batches, RowShardedBatches)
        losses[mode] = [trainer.step().loss for _ in range(3)]
    assert losses["documents"] == losses["rows"]


def test_checkpoint_resume_in_process_is_exact(text_shards, tiny_tokenizer, tmp_path):
    tok = Tokenizer.from_directory(tiny_tokenizer)
    train_files, _ = shards(text_shards)
    cfg = tiny_cfg(num_iterations=8, total_batch_size=8 * 64 * 2)
    straight = make_trainer(cfg, tok, train_files)
    expected = [straight.step().loss for _ in range(8)]

    first = make_trainer(cfg, tok, train_files)
    got = [first.step().loss for _ in range(3)]
    path = first.save_checkpoint(tmp_path, keep=2)
    assert path.name == "step_000003"
    first.train_batches.close()

    second = make_trainer(cfg, tok, train_files)
    second.train_batches.close()
    meta = second.load_checkpoint(path)
    assert (second.step_count, second.tokens_trained) == (3, 3 * cfg.total_batch_size)
    assert meta["data_cursors"][0]["tokens"] == 3 * cfg.total_batch_size
    second.train_batches = make_train_batches(tok, cfg, second.plan, 0, 1, "cpu", train_files,
                                              state=second.data_cursor_for_rank(meta), **LOADER)
    got += [second.step().loss for _ in range(5)]
    assert got == expected                                 # bit for bit

    other = make_trainer(tiny_cfg(depth=4, num_iterations=8), tok, train_files)
    with pytest.raises(ValueError, match="checkpoint model .* differs"):
        other.load_checkpoint(path)
    rows = make_trainer(tiny_cfg(num_iterations=8, data_sharding="rows"), tok, train_files)
    with pytest.raises(ValueError, match="resume with the same sharding"):
        rows.data_cursor_for_rank(meta)
