"""The blobs a process serves, by digest, held in memory (the tensors themselves, no serialised copy)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping

import torch

from pilot.dataplane.blob import TensorBlob


# ------------------------------------------------------------------ the store
class BlobStore:
    """Blobs a process serves, by digest, held in memory (the tensors themselves, no serialised copy)."""

    def __init__(self) -> None:
        self._blobs: dict[str, TensorBlob] = {}
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Memory for an incoming tensor: a recycled one of the same shape and dtype if there is one."""
        with self._lock:
            free = self._free.get((tuple(shape), dtype))
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype)

    def recycle(self, digest: str) -> None:
        """Forget a received blob and keep its memory for the next one (nobody else may hold its tensors)."""
        blob = self.pop(digest)
        if blob is not None:
            with self._lock:
                for tensor in blob.tensors.values():
                    self._free[(tuple(tensor.shape), tensor.dtype)].append(tensor)

    def publish(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
        """Serve these tensors; returns their digest (the address to put in a control message)."""
        return self.add(TensorBlob(tensors, metadata))

    def add(self, blob: TensorBlob) -> str:
        digest = blob.digest
        with self._lock:
            self._blobs[digest] = blob
        return digest

    def get(self, digest: str) -> TensorBlob | None:
        with self._lock:
            return self._blobs.get(digest)

    def pop(self, digest: str) -> TensorBlob | None:
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


