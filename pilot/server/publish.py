"""What the sites are sent each round: the global model as the sites hold it (the view), and the bf16 delta to
it from the last view for a site that holds that one (pilot/dataplane/payload.py, "the global model to a site,
as a bf16 delta").

    publisher = Publisher(store, deltas=True)
    sent = publisher.publish(global_weights, adopted="")   # Published(digest, delta_digest, delta_base)
    RoundRequest(weights_digest=sent.digest, delta_digest=sent.delta_digest, delta_base=sent.delta_base, ...)

The view S is exact where nothing was rounded: the first round's weights, a lone site's upload adopted as the
global model (then the view is that blob: the site holds it already and fetches nothing). After an outer step
the view moves by bf16(S - G): half the bytes of the weights for every site that holds S, and S stays within one
bf16 rounding of one round's move from the fp32 masters G, which the server keeps exact (the outer optimizer,
checkpoints and the final model use G). A site that does not hold S (new, back from a pause, its last round
failed) fetches the view whole, as before.

Memory: with `spool` (the ServerApp's publisher) the view lives in an unnamed file of the run directory, made
tensor by tensor from the last one and the masters and served from there, so the masters are the only model copy
the server holds between rounds (the first view and an adopted upload are the masters' own memory); the delta is
half a copy, let go of when the round's first result arrives (the server loop), before the round's mean is
allocated. Without `spool` the view is one more copy in memory, moved in place once it is the publisher's own.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

import torch

from pilot.dataplane import payload
from pilot.dataplane.blob import SpooledBlob, TensorBlob, spool_blob
from pilot.dataplane.store import BlobStore


@dataclass(frozen=True)
class Published:
    digest: str              # the view: what a site holds once it has the round's global model
    delta_digest: str = ""   # bf16 delta from the last view to this one ("" = none: fetch the view whole)
    delta_base: str = ""     # digest of the view the delta applies to


class Publisher:
    """The view the sites hold and its deltas, published into the round's blob store."""

    def __init__(self, store: BlobStore, deltas: bool = True, spool: Callable[[], BinaryIO] | None = None):
        self.store, self.deltas, self.spool = store, deltas, spool
        # the view as a blob: its tensors are the view (in memory, or with `spool` in a file, read tensor by tensor)
        self.blob: TensorBlob | SpooledBlob | None = None
        self.owned = False     # the view's memory is this publisher's own (else shared with the masters or an upload)
        # the masters the view was last made from: the tensors themselves, weakly (holding them would keep the last
        # round's masters alive beside the new ones: a model copy)
        self.masters: dict[str, weakref.ref] = {}

    @property
    def digest(self) -> str:
        return self.blob.digest if self.blob is not None else ""

    def publish(self, weights: Mapping[str, torch.Tensor], adopted: str = "") -> Published:
        """Publish the round's global model. `adopted`: the digest of a lone site's upload that is the global
        model as it is (kept in the store; `weights` are its tensors): it becomes the view, exact, and the site
        that holds it fetches nothing."""
        if adopted and adopted in self.store:
            self.blob, self.owned, self.masters = self.store.get(adopted), False, _refs(weights)
            return Published(adopted)
        if self.blob is not None and self._same_masters(weights):
            self.store.add(self.blob)   # the masters did not move (nothing was aggregated): the same view
            return Published(self.digest)
        if self.blob is None or not self.deltas:
            self.blob, self.owned, self.masters = TensorBlob(weights), False, _refs(weights)
            return Published(self.store.add(self.blob))
        base, view = self.digest, self.blob.tensors
        _check_layout(view, weights)
        # in memory, the view moves in its own memory; never in the masters' or an uploaded blob's
        in_place = self.spool is None and self.owned
        if in_place:
            self.store.pop(base)   # its bytes are about to change: nobody may be served them under the old digest
        delta: dict[str, torch.Tensor] = {}

        def moved() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in view.items():    # one at a time: a spooled view is read tensor by tensor
                delta[name], tensor = payload.next_view(tensor, weights[name], in_place=in_place)
                yield name, tensor

        if self.spool is not None:   # the next view goes to a file as it is made: the masters stay the only copy
            layout = {name: (t.dtype, tuple(t.shape)) for name, t in weights.items()}
            self.blob = spool_blob(moved(), layout, self.spool())
        else:
            self.blob = TensorBlob(dict(moved()))
        self.owned, self.masters = self.spool is None, _refs(weights)
        digest = self.store.add(self.blob)
        meta = {"payload": payload.GLOBAL_DELTA, "base": base, "view": digest}
        return Published(digest, self.store.add(TensorBlob(delta, meta)), base)

    def _same_masters(self, weights: Mapping[str, torch.Tensor]) -> bool:
        """The masters have not moved since the view was made (a round that aggregated nothing): the tensors
        themselves, not their values (an outer step always makes new ones)."""
        last = self.masters
        return last.keys() == weights.keys() and all(last[k]() is weights[k] for k in weights)


def _check_layout(view: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> None:
    if list(view) != list(weights):
        raise ValueError(f"publish: the masters' tensor names differ from the view's ({sorted(set(view) ^ set(weights))[:3]})")


def _refs(weights: Mapping[str, torch.Tensor]) -> dict[str, weakref.ref]:
    return {name: weakref.ref(tensor) for name, tensor in weights.items()}
