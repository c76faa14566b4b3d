"""Stream parquet shards into (inputs, targets) batches of shape [B, T], with a cursor that resumes exactly.

The token stream of one rank is: for each shard in `files` (in order), for each row of that shard with
row % world_size == rank, the document's tokens [BOS] + encode(text). Batches cut that stream into
consecutive runs of B*T tokens: every token is an input exactly once, and the targets are the inputs
shifted by one (the last target of a batch is the first input of the next). Documents of different ranks
never overlap; documents of different sites never overlap when sites get disjoint shard lists.

The cursor (`state_dict()`) names the next input token by (shard file, row, token offset in that document):

    {"file": "shard_00003.parquet", "row": 118, "offset": 37,   # required; the rest is bookkeeping
     "epoch": 0, "tokens": 1048576, "rank": 0, "world_size": 2}

A loader built with that state yields exactly the batches an uninterrupted loader would have yielded
next. Shards listed before `file` are finished; in `file`, this rank's rows before `row` are finished.
That is the per-shard ledger a federated site reports. A hand-written {"file", "row", "offset"} starts a
loader anywhere (e.g. a site taking over the rest of another site's shard).

Shards are read one row group at a time and tokenized in batches on a background thread (tiktoken
spreads each batch over `tokenizer_threads` threads), so the training step rarely waits for data.
A shard that cannot be read raises ShardError naming the file and why (missing, not parquet, no `text`
column, a row group that does not decode), never a silent skip: a shard counts as trained only when its
rows were, so the caller must learn that they were not. The files still ahead of the cursor are checked
when the loader is built (their parquet footers: cheap), so a bad shard is reported before any step.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

from nanochat.dataset import list_parquet_files, split_files

TOKENIZER_BATCH = 64     # documents per tokenizer call
TOKENIZER_THREADS = 4    # tiktoken threads per call
PREFETCH = 8             # tokenized document batches buffered ahead of the consumer
STATE_VERSION = 1


class ShardError(RuntimeError):
    """A shard cannot be read: `file` (its name) and `reason` say which and why; `row` is the first row not read
    (the rows before it were handed on)."""

    def __init__(self, file: str, reason: str, row: int = 0):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason, self.row = file, reason, row


def check_shard(path: Path) -> None:
    """Raise ShardError unless `path` is a parquet file with a `text` column (reads the footer only)."""
    if not path.exists():
        raise ShardError(path.name, f"missing (no file at {path})")
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for truncated or garbled files
        raise ShardError(path.name, f"not a readable parquet file ({type(e).__name__}: {e})") from e
    if "text" not in schema.names:
        raise ShardError(path.name, f"no 'text' column (columns: {', '.join(schema.names[:8]) or 'none'})")


@dataclass
class _Doc:
    file_index: int
    row: int
    ids: list[int]
    pos: int = 0         # next unconsumed token

    @property
    def left(self) -> int:
        return len(self.ids) - self.pos


_END = object()


class _Producer:
    """Reads shards and tokenizes documents in order, on a background thread, into a bounded queue."""

    def __init__(self, files, tokenizer, bos, rank, world_size, loop, batch, threads, out, stop):
        self.files, self.tokenizer, self.bos = files, tokenizer, bos
        self.rank, self.world_size, self.loop = rank, world_size, loop
        self.batch, self.threads, self.out, self.stop = batch, threads, out, stop

    def put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def rows(self, file_index: int, start_row: int):
        """(row, text) of this rank's rows from start_row on, one row group at a time; ShardError on a read error."""
        path = self.files[file_index]
        try:
            check_shard(path)
        except ShardError as e:
            raise ShardError(e.file, e.reason, start_row) from e
        group, first = -1, 0
        try:
            pf = pq.ParquetFile(path)
            for group in range(pf.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                if first + n > start_row:
                    texts = pf.read_row_group(group, columns=["text"]).column("text").to_pylist()
                    for i, text in enumerate(texts):
                        row = first + i
                        if row >= start_row and row % self.world_size == self.rank:
                            yield row, text
                first += n
        except Exception as e:  # truncated / garbled parquet, a file changed under us
            where = f"row group {group}" if group >= 0 else "footer"
            raise ShardError(path.name, f"unreadable at its {where} ({type(e).__name__}: {e})",
                             max(first, start_row)) from e

    def run(self, file_index: int, start_row: int, start_offset: int, epoch: int) -> None:
        try:
            while True:
                for fi in range(file_index, len(self.files)):
                    pending: list[tuple[int, str]] = []
                    try:
                        for row, text in self.rows(fi, start_row):
                            pending.append((row, text))
                            if len(pending) >= self.batch:
                                if not self.flush(fi, pending, start_row, start_offset):
                                    return
                                pending = []
                    except ShardError:   # the rows read before the bad part go out first, then the error
                        self.flush(fi, pending, start_row, start_offset)
                        raise
                    if not self.flush(fi, pending, start_row, start_offset):
                        return
                    start_row, start_offset = 0, 0
                if not self.loop:
                    break
                epoch, file_index = epoch + 1, 0
                if not self.put(("docs", [_Doc(-1, epoch, [], 0)])):   # marker: the stream wraps here
                    return
            self.put(_END)
        except BaseException as e:  # hand any failure to the consumer instead of dying silently (the rows
            self.put(("error", e))     # read before it were handed on first, in order)

    def flush(self, fi: int, pending: list[tuple[int, str]], start_row: int, start_offset: int) -> bool:
        if not pending:
            return True
        batch = self.tokenizer.encode([t for _, t in pending], prepend=self.bos, num_threads=self.threads)
        docs = []
        for (row, _), ids in zip(pending, batch, strict=True):
            offset = start_offset if row == start_row else 0
            if offset < len(ids):
                docs.append(_Doc(fi, row, ids, offset))
        return self.put(("docs", docs))


class DataLoader:
    """Iterator of (inputs, targets), each int64 [B, T] on `device`. See the module docstring."""

    def __init__(self, tokenizer, B: int, T: int, split: str = "train", device: str | torch.device = "cpu",
                 files: list[Path] | None = None, rank: int = 0, world_size: int = 1,
                 state: dict | None = None, loop: bool = False, data_dir: Path | None = None,
                 tokenizer_threads: int = TOKENIZER_THREADS, tokenizer_batch: int = TOKENIZER_BATCH,
                 prefetch: int = PREFETCH):
        if B < 1 or T < 1:
            raise ValueError(f"B and T must be >= 1, got B={B} T={T}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        # explicit files are used as given (a site's shard list); otherwise the split of the data dir
        self.files = [Path(f) for f in files] if files is not None else split_files(list_parquet_files(data_dir), split)
        if not self.files:
            raise ValueError("no shards to read (empty file list)")
        self.tokenizer, self.B, self.T = tokenizer, B, T
        self.device = torch.device(device)
        self.rank, self.world_size, self.loop = rank, world_size, loop
        self.bos = tokenizer.get_bos_token_id()
        self.tokenizer_threads, self.tokenizer_batch = tokenizer_threads, tokenizer_batch

        names = [f.name for f in self.files]
        self.epoch, self.tokens = 0, 0
        start_file, start_row, start_offset = 0, 0, 0
        if state is not None:
            for key in ("file", "row", "offset"):
                if key not in state:
                    raise ValueError(f"loader state lacks {key!r}: expected a dict from DataLoader.state_dict()")
            if state["file"] not in names:
                raise ValueError(f"loader state points at {state['file']}, which is not among this loader's "
                                 f"shards ({names[0]} .. {names[-1]}, {len(names)} files)")
            if state.get("world_size", world_size) != world_size or state.get("rank", rank) != rank:
                raise ValueError(f"loader state is for rank {state.get('rank')} of {state.get('world_size')}, "
                                 f"this loader is rank {rank} of {world_size}: documents would be skipped or repeated")
            start_file, start_row, start_offset = names.index(state["file"]), int(state["row"]), int(state["offset"])
            self.epoch, self.tokens = int(state.get("epoch", 0)), int(state.get("tokens", 0))
        for path in self.files[start_file:]:   # the shards ahead: a bad one is reported now, not mid-round
            check_shard(path)

        self._docs: deque[_Doc] = deque()
        self._buffered = 0                     # tokens in self._docs not yet consumed
        self._exhausted = False
        self._error: BaseException | None = None     # the producer's failure, raised on every later read
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        # the thread holds no reference to the loader, so a dropped loader is collected and its thread stops
        producer = _Producer(self.files, tokenizer, self.bos, rank, world_size, loop, tokenizer_batch,
                             tokenizer_threads, self._queue, self._stop)
        self._thread = threading.Thread(target=producer.run, args=(start_file, start_row, start_offset, self.epoch),
                                        daemon=True, name="nanochat-dataloader")
        self._thread.start()
        weakref.finalize(self, self._stop.set)

    # ------------------------------------------------------------------ consumer
    def _fill(self, need: int) -> bool:
        while self._buffered < need:
            if self._error is not None:
                raise self._error
            if self._exhausted:
                return False
            item = self._queue.get()
            if item is _END:
                self._exhausted = True
                continue
            kind, payload = item
            if kind == "docs":
                self._docs.extend(payload)
                self._buffered += sum(d.left for d in payload)
            elif kind == "error":
                self._error = payload if isinstance(payload, ShardError) else RuntimeError(
                    f"data loader thread failed: {payload}")
                if self._error is not payload:
                    self._error.__cause__ = payload
        return True

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.B * self.T
        if not self._fill(n + 1):
            raise StopIteration
        out: list[int] = []
        while len(out) < n:
            doc = self._docs[0]
            if doc.file_index < 0:                # epoch marker
                self.epoch = self._docs.popleft().row
                continue
            take = min(n - len(out), doc.left)
            out.extend(doc.ids[doc.pos:doc.pos + take])
            doc.pos += take
            self._buffered -= take
            if doc.left == 0:
                self._docs.popleft()
        self._skip_empty_heads()
        out.append(self._docs[0].ids[self._docs[0].pos])   # peek: the last target, not consumed
        self.tokens += n
        buf = torch.tensor(out, dtype=torch.long)
        if self.device.type == "cuda":
            buf = buf.pin_memory()
        inputs = buf[:-1].view(self.B, self.T).to(self.device, non_blocking=True)
        targets = buf[1:].view(self.B, self.T).to(self.device, non_blocking=True)
        return inputs, targets

    def _skip_empty_heads(self) -> None:
        while self._docs and self._docs[0].file_index < 0:
            self.epoch = self._docs.popleft().row

    def state_dict(self) -> dict:
        """JSON-serialisable cursor after the last batch returned (see the module docstring)."""
        self._skip_empty_heads()
        if not self._docs:
            try:
                self._fill(1)                     # the cursor is the next document, wherever it is
            except ShardError as e:               # it is where the unreadable shard stopped being read
                return self._cursor(e.file, e.row, 0)
            self._skip_empty_heads()
        if self._docs:
            head = self._docs[0]
            file, row, offset = self.files[head.file_index].name, head.row, head.pos
        else:                                     # nothing left: a cursor past the last shard's rows
            file, row, offset = self.files[-1].name, 1 << 62, 0
        return self._cursor(file, row, offset)

    def _cursor(self, file: str, row: int, offset: int) -> dict:
        return {"version": STATE_VERSION, "file": file, "row": row, "offset": offset, "epoch": self.epoch,
                "tokens": self.tokens, "rank": self.rank, "world_size": self.world_size}

    def close(self) -> None:
        """Stop the background thread (also happens at garbage collection and process exit)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
