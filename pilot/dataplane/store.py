"""The blobs a process serves, by digest, held in memory (the tensors themselves, no serialised copy), and the
uploads it receives: in memory, or spooled to a file (`spool_if`: the server's pseudo-gradient uploads, which it
reads through tensor by tensor into its running mean, so that no upload costs it model-sized memory)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from pilot.dataplane.blob import SpooledBlob, TensorBlob, spool_file

Blob = TensorBlob | SpooledBlob


# ------------------------------------------------------------------ the store
class BlobStore:
    """Blobs a process serves, by digest, held in memory (the tensors themselves, no serialised copy); received
    blobs whose metadata `spool_if` accepts are spooled to unnamed temporary files in `spool_dir` (gone with the
    blob)."""

    def __init__(self, spool_dir: str | Path | None = None,
                 spool_if: Callable[[Mapping[str, str]], bool] | None = None) -> None:
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.spool_if = spool_if
        self._blobs: dict[str, Blob] = {}
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Memory for an incoming tensor: a recycled one of the same shape and dtype if there is one."""
        with self._lock:
            free = self._free.get((tuple(shape), dtype))
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype)

    def spool(self, metadata: Mapping[str, str]) -> BinaryIO | None:
        """A file for the data of a received blob with this metadata, or None: into memory."""
        if self.spool_dir is None or self.spool_if is None or not self.spool_if(metadata):
            return None
        return self.spool_file()

    def spool_file(self) -> BinaryIO:
        """An unnamed temporary file in the spool directory (its space goes when it is closed)."""
        if self.spool_dir is None:
            raise ValueError("this store has no spool directory")
        return spool_file(self.spool_dir)

    def recycle(self, digest: str) -> None:
        """Forget a received blob and keep its memory for the next one (nobody else may hold its tensors)."""
        blob = self.pop(digest)
        if isinstance(blob, TensorBlob):
            with self._lock:
                for tensor in blob.tensors.values():
                    self._free[(tuple(tensor.shape), tensor.dtype)].append(tensor)

    def publish(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
        """Serve these tensors; returns their digest (the address to put in a control message)."""
        return self.add(TensorBlob(tensors, metadata))

    def add(self, blob: Blob) -> str:
        digest = blob.digest
        with self._lock:
            self._blobs[digest] = blob
        return digest

    def get(self, digest: str) -> Blob | None:
        with self._lock:
            return self._blobs.get(digest)

    def pop(self, digest: str) -> Blob | None:
        with self._lock:
            return self._blobs.pop(digest, None)

    def retain(self, keep: set[str]) -> None:
        """Forget every blob not in `keep` (their memory goes back once nobody else holds them)."""
        with self._lock:
            for digest in set(self._blobs) - keep:
                del self._blobs[digest]

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._blobs


