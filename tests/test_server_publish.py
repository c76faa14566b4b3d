"""The global model to a site as a bf16 delta (pilot/server/publish.py, payload.global_delta): the view the
sites hold stays within one bf16 rounding of one round's move from the exact fp32 masters, a site that holds the
last view makes the new one bit for bit, and nothing is sent as a delta that a site could not use."""

from __future__ import annotations

import torch

from pilot.dataplane import payload
from pilot.dataplane.blob import SpooledBlob, TensorBlob
from pilot.dataplane.store import BlobStore
from pilot.server.publish import Publisher


def masters(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"wte": torch.randn(64, 32, generator=g), "h.0.attn": torch.randn(32, 32, generator=g),
            "scale": torch.ones(7)}


def moved(weights: dict[str, torch.Tensor], step: int, size: float = 1e-3) -> dict[str, torch.Tensor]:
    """An outer step: new tensors (as the server's optimizer makes), moved by a random amount."""
    g = torch.Generator().manual_seed(1000 + step)
    return {k: v - size * torch.randn(v.shape, generator=g) for k, v in weights.items()}


def test_a_site_holding_the_last_view_makes_the_next_bit_for_bit_and_the_view_tracks_the_masters():
    store = BlobStore()
    publisher = Publisher(store)
    weights = masters()
    first = publisher.publish(weights)
    assert (first.delta_digest, first.delta_base) == ("", "")          # nothing to be a delta to yet
    held = {k: v.clone() for k, v in store.get(first.digest).tensors.items()}   # what the site fetched whole
    held_digest = first.digest
    for step in range(1, 25):
        before = {k: v.clone() for k, v in weights.items()}
        weights = moved(weights, step)
        frozen = {k: v.clone() for k, v in weights.items()}
        sent = publisher.publish(weights)
        assert sent.delta_base == held_digest and sent.delta_digest
        delta = store.get(sent.delta_digest)
        assert delta.metadata == {"payload": payload.GLOBAL_DELTA, "base": held_digest, "view": sent.digest}
        assert all(t.dtype == torch.bfloat16 for t in delta.tensors.values())
        assert delta.size < 0.55 * store.get(sent.digest).size     # half the bytes of the weights
        payload.apply_global_delta(held, delta.tensors)
        assert TensorBlob(held).digest == sent.digest                # the site's view is the server's, bit for bit
        held_digest = sent.digest
        # the view is within one bf16 rounding of this round's move from the masters: no drift piles up
        for name, w in weights.items():
            move = (w - before[name]).abs().max().item()
            assert (held[name] - w).abs().max().item() <= move * 2 ** -8 + 1e-7, (step, name)
        assert all(torch.equal(weights[k], frozen[k]) for k in weights)   # the masters were never written into
        store.retain({sent.digest})   # the loop lets the round's blobs go after it


def test_only_usable_deltas_are_sent():
    store = BlobStore()
    publisher = Publisher(store)
    weights = masters()
    first = publisher.publish(weights)
    again = publisher.publish(weights)      # a round that aggregated nothing: the same view, no delta
    assert again.digest == first.digest and not again.delta_digest and first.digest in store
    # a lone site's upload adopted as the global model: that blob is the view, exact; no delta
    upload = TensorBlob(moved(weights, 1), {"payload": "weights-fp32"})
    adopted = store.add(upload)
    sent = publisher.publish(dict(upload.tensors), adopted=adopted)
    assert sent.digest == adopted and not sent.delta_digest
    # the next outer step after it is a delta to the adopted blob, which stays as it was uploaded
    raw = {k: v.clone() for k, v in upload.tensors.items()}
    nxt = publisher.publish(moved(dict(upload.tensors), 2))
    assert nxt.delta_base == adopted and all(torch.equal(upload.tensors[k], raw[k]) for k in raw)
    # global-payload = "weights-fp32": the masters whole, every round
    plain = Publisher(BlobStore(), deltas=False)
    plain.publish(weights)
    assert not plain.publish(moved(weights, 3)).delta_digest


def test_a_delta_shaped_unlike_the_view_is_refused():
    view = masters()
    bad = {k: torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in view.items() if k != "scale"}
    try:
        payload.apply_global_delta(view, bad)
    except ValueError as error:
        assert "scale" in str(error)
    else:
        raise AssertionError("a delta without every tensor was applied")


def test_the_publisher_does_not_keep_the_last_masters_alive():
    """Once an outer step has made new masters, the old ones go before the next round is published (a d20 copy
    is 2.2 GB): the publisher remembers the masters it made the view from weakly."""
    import gc
    import weakref

    store = BlobStore()
    publisher = Publisher(store)
    weights = masters()
    publisher.publish(weights)
    weights = moved(weights, 1)
    publisher.publish(weights)                  # the view is the publisher's own memory from here on
    again = publisher.publish(weights)          # nothing aggregated: the same view, recognised by identity
    assert again.digest == publisher.digest and not again.delta_digest
    old = weakref.ref(weights["wte"])
    weights = moved(weights, 2)                 # the outer step: the loop holds only the new masters
    store.retain(set())
    gc.collect()
    assert old() is None, "the last round's masters are still held"
    assert publisher.publish(weights).delta_digest   # and the next view is made as before


def test_a_spooled_view_is_the_same_view_on_disk(tmp_path):
    """The ServerApp keeps the view in a file (made tensor by tensor, served from there): bit for bit the view
    an in-memory publisher makes, with the same deltas; the masters are the only model in memory."""
    memory, spooled_store = Publisher(BlobStore()), BlobStore(spool_dir=tmp_path)
    spooled = Publisher(spooled_store, spool=spooled_store.spool_file)
    weights = masters()
    for step in range(4):
        a, b = memory.publish(weights), spooled.publish(weights)
        assert (a.digest, a.delta_base) == (b.digest, b.delta_base)
        if step:
            assert isinstance(spooled.blob, SpooledBlob)
            assert b"".join(map(bytes, spooled.blob.chunks())) == b"".join(map(bytes, memory.blob.chunks()))
            assert store_delta(memory) == store_delta(spooled)
        weights = moved(weights, step + 1)
    assert list(tmp_path.iterdir()) == []   # unnamed files


def store_delta(publisher: Publisher) -> bytes:
    digest = next(d for d, blob in publisher.store._blobs.items()
                  if blob.metadata.get("payload") == payload.GLOBAL_DELTA)
    return b"".join(map(bytes, publisher.store.get(digest).chunks()))
