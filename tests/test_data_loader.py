"""The streaming loader (document order, BOS, ranks, exact resume, bad shards) and bits per byte."""

from __future__ import annotations

import gc
import json
import math
import re
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from nanochat.dataloader import DataLoader, ShardError
from nanochat.dataset import list_parquet_files
from nanochat.loss_eval import evaluate_bpb
from nanochat.offline_corpus import write_shards
from nanochat.tokenizer import get_token_bytes, get_tokenizer


def texts_of(path: Path) -> list[str]:
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def expected_stream(tok, files: list[Path], rank: int = 0, world_size: int = 1) -> list[int]:
    stream = []
    for f in files:
        texts = [t for row, t in enumerate(texts_of(f)) if row % world_size == rank]
        for ids in tok.encode(texts, prepend="<|bos|>"):
            stream.extend(ids)
    return stream


def drain(loader: DataLoader, limit: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for x, y in loader:
        out.append((x.clone(), y.clone()))
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """4 shards of ~25k characters: small enough to wrap around several times in a test."""
    return write_shards(tmp_path_factory.mktemp("small"), num_shards=4, max_chars=100_000, row_group_size=4)


def test_batches_are_the_bos_document_stream_in_order(tiny_tokenizer: Path, text_shards: Path) -> None:
    tok = get_tokenizer(tiny_tokenizer)
    files = list_parquet_files(text_shards)[:2]
    B, T = 4, 256
    batches = drain(DataLoader(tok, B, T, files=files))
    stream = expected_stream(tok, files)
    assert len(batches) == (len(stream) - 1) // (B * T)
    for i, (x, y) in enumerate(batches):
        assert x.shape == y.shape == (B, T) and x.dtype == torch.long
        chunk = torch.tensor(stream[i * B * T: (i + 1) * B * T + 1])
        assert x.flatten().equal(chunk[:-1]) and y.flatten().equal(chunk[1:])
    # default files: every shard but the last for train, the last for val
    val = DataLoader(tok, 1, 32, split="val", data_dir=text_shards)
    assert val.files == list_parquet_files(text_shards)[-1:]
    assert next(val)[0][0].tolist() == expected_stream(tok, val.files)[:32]
    assert DataLoader(tok, 1, 32, data_dir=text_shards).files == list_parquet_files(text_shards)[:-1]


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_is_exact_across_shards_and_epochs(tiny_tokenizer: Path, small_shards: list[Path],
                                                  world_size: int) -> None:
    tok = get_tokenizer(tiny_tokenizer)
    files = small_shards[:2]
    B, T, K = 2, 96, 250
    for rank in range(world_size):
        kwargs = dict(files=files, loop=True, rank=rank, world_size=world_size)
        reference = drain(DataLoader(tok, B, T, **kwargs), K)
        stream = expected_stream(tok, files, rank, world_size)
        looped = torch.tensor(stream * (K * B * T // len(stream) + 1))
        assert torch.cat([x.flatten() for x, _ in reference]).equal(looped[:K * B * T])
        loader = DataLoader(tok, B, T, **kwargs)
        epochs, seen_files = set(), set()
        for k in range(K):
            next(loader)
            state = json.loads(json.dumps(loader.state_dict()))
            epochs.add(state["epoch"])
            seen_files.add(state["file"])
            if k % 13 == 5 or k == K - 2:
                assert state["tokens"] == (k + 1) * B * T
                resumed = drain(DataLoader(tok, B, T, state=state, **kwargs), 4)
                for (x, y), (rx, ry) in zip(resumed, reference[k + 1:k + 5], strict=False):
                    assert x.equal(rx) and y.equal(ry), f"rank {rank}: resume after batch {k} diverged"
                    assert len(resumed) == min(4, K - k - 1) or k + 5 > K
        assert len(epochs) >= 3 and seen_files == {f.name for f in files}   # wrapped around more than once


def test_ranks_get_disjoint_documents(tiny_tokenizer: Path, small_shards: list[Path]) -> None:
    tok = get_tokenizer(tiny_tokenizer)
    B, T = 1, 64
    for rank in range(3):
        got = torch.cat([x.flatten() for x, _ in drain(DataLoader(tok, B, T, files=small_shards, rank=rank,
                                                                  world_size=3))]).tolist()
        assert got == expected_stream(tok, small_shards, rank, 3)[:len(got)]
        assert len(got) > 0.8 * len(expected_stream(tok, small_shards, rank, 3))
    state = DataLoader(tok, B, T, files=small_shards, rank=1, world_size=3).state_dict()
    with pytest.raises(ValueError, match="rank 1 of 3, this loader is rank 0 of 2"):
        DataLoader(tok, B, T, files=small_shards, rank=0, world_size=2, state=state)


def test_hand_written_cursor_starts_anywhere(tiny_tokenizer: Path, small_shards: list[Path]) -> None:
    tok = get_tokenizer(tiny_tokenizer)
    row_text = texts_of(small_shards[2])[5]
    doc = tok.encode(row_text, prepend="<|bos|>")
    loader = DataLoader(tok, 1, 16, files=small_shards, state={"file": small_shards[2].name, "row": 5, "offset": 3})
    x, y = next(loader)
    assert x[0].tolist() == doc[3:19] and y[0].tolist() == doc[4:20]
    assert loader.state_dict()["file"] == small_shards[2].name and loader.state_dict()["row"] == 5
    assert loader.state_dict()["offset"] == 19
    with pytest.raises(ValueError, match="shard_00099.parquet, which is not among this loader's shards"):
        DataLoader(tok, 1, 16, files=small_shards, state={"file": "shard_00099.parquet", "row": 0, "offset": 0})
    with pytest.raises(ValueError, match="lacks 'offset'"):
        DataLoader(tok, 1, 16, files=small_shards, state={"file": small_shards[0].name, "row": 0})


def test_a_missing_or_unreadable_shard_is_an_error_naming_the_file_and_why(tiny_tokenizer: Path,
                                                                           small_shards: list[Path],
                                                                           tmp_path: Path) -> None:
    tok = get_tokenizer(tiny_tokenizer)
    cut = tmp_path / "shard_00001.parquet"
    data = small_shards[1].read_bytes()
    cut.write_bytes(data[: len(data) // 2])                    # a download cut in half
    no_text = tmp_path / "shard_00007.parquet"
    pq.write_table(pa.table({"body": ["a document"]}), no_text)
    cases = [(tmp_path / "shard_00009.parquet", "missing"), (cut, "not a readable parquet file"),
             (no_text, "no 'text' column (columns: body)")]
    for bad, why in cases:   # found when the loader is built, before any batch (and never skipped)
        with pytest.raises(ShardError, match=f"{bad.name}: {re.escape(why)}") as caught:
            DataLoader(tok, 1, 64, files=[small_shards[0], bad, small_shards[2]])
        assert caught.value.file == bad.name
    # a shard already behind the cursor is not checked (it was trained; it may be gone)
    DataLoader(tok, 1, 64, files=[cut, small_shards[2]], state={"file": small_shards[2].name, "row": 0, "offset": 0})

    # a row group that does not decode: the rows before it come out in order, then the error, at every read
    torn = tmp_path / "shard_00002.parquet"
    blob = bytearray(small_shards[2].read_bytes())
    column = pq.ParquetFile(small_shards[2]).metadata.row_group(1).column(0)
    first = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    blob[first:first + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    torn.write_bytes(bytes(blob))
    loader = DataLoader(tok, 1, 16, files=[torn])
    got = []
    with pytest.raises(ShardError, match="shard_00002.parquet: unreadable at its row group 1"):
        for x, _ in loader:
            got.extend(x.flatten().tolist())
    assert got == expected_stream(tok, [small_shards[2]])[:len(got)] and got
    assert loader.state_dict()["file"] == torn.name and loader.state_dict()["row"] <= 4  # not past the bad group
    with pytest.raises(ShardError):
        next(loader)


def test_dropped_loaders_stop_their_threads(tiny_tokenizer: Path, small_shards: list[Path]) -> None:
    tok = get_tokenizer(tiny_tokenizer)
    before = threading.active_count()
    for _ in range(10):
        loader = DataLoader(tok, 1, 16, files=small_shards, loop=True, prefetch=1, tokenizer_batch=1)
        next(loader)
        del loader
    gc.collect()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before   # threads of earlier tests may end meanwhile; none of ours is left


# ----------------------------------------------------------------------------- bits per byte

class UniformModel(torch.nn.Module):
    """Predicts every token with probability 1/V: its loss is ln V per target, whatever the text."""

    def __init__(self, vocab: int, flat: bool = True):
        super().__init__()
        self.vocab, self.flat = vocab, flat

    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = torch.zeros(*idx.shape, self.vocab)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, self.vocab), targets.view(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss if self.flat or loss_reduction != "none" else loss.view(targets.shape)


def test_bits_per_byte_of_a_uniform_model(tiny_tokenizer: Path, text_shards: Path) -> None:
    tok = get_tokenizer(tiny_tokenizer)
    token_bytes = get_token_bytes(tiny_tokenizer)
    V = tok.get_vocab_size()
    batches = drain(DataLoader(tok, 2, 128, split="val", data_dir=text_shards), 6)
    targets = torch.cat([y.flatten() for _, y in batches])
    text_bytes = len(tok.decode([t for t in targets.tolist() if t != tok.get_bos_token_id()]).encode())
    counted = int((token_bytes[targets] > 0).sum())
    assert counted < targets.numel()                          # BOS targets exist and are left out
    expected = math.log2(V) * counted / text_bytes
    for flat in (True, False):
        assert evaluate_bpb(UniformModel(V, flat), iter(batches), 6, token_bytes) == pytest.approx(expected)
    # only `steps` batches are used; ignored targets (-1) drop out of both sums
    assert evaluate_bpb(UniformModel(V), iter(batches), 1, token_bytes) != pytest.approx(expected)
    x, y = batches[0]
    y = y.clone()
    y[:, ::2] = -1
    kept = y[y >= 0]
    n, b = int((token_bytes[kept] > 0).sum()), int(token_bytes[kept].sum())
    assert evaluate_bpb(UniformModel(V), iter([(x, y)]), 1, token_bytes) == pytest.approx(math.log2(V) * n / b)
    with pytest.raises(ValueError, match="no batches"):
        evaluate_bpb(UniformModel(V), iter([]), 3, token_bytes)
