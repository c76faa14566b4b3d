"""Update payloads: fp32 weights exactly, bf16 pseudo-gradients within bf16 rounding of the delta."""

from __future__ import annotations

import pytest
import torch

from pilot.dataplane import payload as payload_module
from pilot.dataplane.blob import TensorBlob
from pilot.dataplane.client import fetch_blob, upload_blob
from pilot.dataplane.payload import KINDS, check_kind, decode_update, encode_update, payload_bytes
from pilot.dataplane.server import BlobServer
from pilot.dataplane.store import BlobStore


def round_pair(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A round's start weights and a site's weights after it: small updates on weights of varied scale."""
    g = torch.Generator().manual_seed(seed)
    start = {
        "wte.weight": torch.randn(257, 33, generator=g),
        "h.0.mlp.c_fc.weight": torch.randn(4099, generator=g) * 0.02,
        "scalar": torch.tensor(1.5),
        "steps": torch.arange(4, dtype=torch.int64),
    }
    end = {k: (v + 1e-3 * torch.randn(v.shape, generator=g) * v.abs().mean() if v.is_floating_point() else v + 1)
           for k, v in start.items()}
    return start, end


def copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


def test_weights_fp32_round_trip_is_exact():
    start, end = round_pair()
    sent = encode_update(start, end, "weights-fp32")
    assert all(sent[k].data_ptr() == end[k].data_ptr() for k in end)  # no copy of the live model
    got = decode_update(sent, start, "weights-fp32")
    assert all(torch.equal(got[k], end[k]) and got[k].dtype == end[k].dtype for k in end)
    buffer = copy(start)
    sent = encode_update(buffer, end, "weights-fp32", reuse_start=True)
    assert all(torch.equal(sent[k], end[k]) for k in end)
    assert all(sent[k].data_ptr() == buffer[k].data_ptr() for k in end if end[k].is_floating_point())


def test_delta_bf16_round_trip_within_bf16_precision_of_the_delta():
    start, end = round_pair()
    sent = encode_update(start, end, "delta-bf16")
    assert sent["wte.weight"].dtype == torch.bfloat16 and sent["steps"].dtype == torch.int64
    got = decode_update(sent, start, "delta-bf16")
    for k in end:
        assert got[k].dtype == end[k].dtype
        if not end[k].is_floating_point():
            assert torch.equal(got[k], end[k])
            continue
        delta = start[k] - end[k]
        error = (got[k] - end[k]).abs()
        # bf16 keeps 8 significant bits: a relative 2^-9 of each delta element, plus fp32 rounding of start - delta
        assert torch.all(error <= delta.abs() * 2**-8 + start[k].abs() * 2**-22), k
        assert error.max() > 0 or k == "scalar"  # it is lossy: not a disguised fp32 payload
    # half the bytes of fp32 weights for the floating tensors
    floats = sum(v.numel() for v in start.values() if v.is_floating_point())
    ints = sum(v.numel() * 8 for v in start.values() if not v.is_floating_point())
    assert payload_bytes(start, "delta-bf16") == 2 * floats + ints
    assert payload_bytes(start, "weights-fp32") == 4 * floats + ints


def test_delta_bf16_in_place_matches_and_reuses_the_start_buffer(monkeypatch):
    monkeypatch.setattr(payload_module, "BLOCK", 1000)  # many blocks, the last one short
    start, end = round_pair(seed=1)
    expected = encode_update(start, end, "delta-bf16")
    buffer = copy(start)
    pointers = {k: v.data_ptr() for k, v in buffer.items()}
    sent = encode_update(buffer, end, "delta-bf16", reuse_start=True)
    for k in start:
        assert torch.equal(sent[k], expected[k]) and sent[k].dtype == expected[k].dtype, k
        if start[k].is_floating_point():
            assert sent[k].data_ptr() == pointers[k], f"{k}: the delta must live in the start buffer's memory"
    # the server side writes the site's weights into its own buffer (here: over the start weights)
    server_start = copy(start)
    got = decode_update(sent, server_start, "delta-bf16", out=server_start)
    fresh = decode_update(sent, start, "delta-bf16")
    for k in start:
        assert got[k].data_ptr() == server_start[k].data_ptr() and torch.equal(got[k], fresh[k]), k


def test_a_delta_payload_travels_as_a_blob():
    """What the site uploads is what the server decodes: bf16 bytes over HTTP, bit for bit."""
    start, end = round_pair(seed=2)
    sent = encode_update(copy(start), end, "delta-bf16", reuse_start=True)
    store = BlobStore()
    with BlobServer(store, token="t") as server:
        digest = upload_blob(server.url, TensorBlob(sent, {"payload": "delta-bf16"}), token="t")
        received = fetch_blob(server.url, digest, token="t")
    assert received.metadata == {"payload": "delta-bf16"}
    assert received.tensors["wte.weight"].nbytes == start["wte.weight"].nbytes // 2
    via_blob = decode_update(received.tensors, start, "delta-bf16")
    direct = decode_update(sent, start, "delta-bf16")
    assert all(torch.equal(via_blob[k], direct[k]) for k in start)


def test_bad_input_is_refused_with_a_clear_error():
    start, end = round_pair()
    for call in (lambda: encode_update(start, end, "delta-int3"), lambda: decode_update(end, start, "fp16"),
                 lambda: check_kind("weights")):
        with pytest.raises(ValueError, match="weights-fp32, delta-bf16"):
            call()
    assert check_kind("delta-bf16") == "delta-bf16"
    assert KINDS == ("weights-fp32", "delta-bf16", "delta-int8", "delta-int4", "delta-int2")
    with pytest.raises(ValueError, match="error feedback"):
        encode_update(start, end, "delta-int8")
    with pytest.raises(ValueError, match=r"missing \['wte.weight'\]"):
        encode_update(start, {k: v for k, v in end.items() if k != "wte.weight"}, "delta-bf16")
    with pytest.raises(ValueError, match="scalar has shape"):
        decode_update({**end, "scalar": torch.zeros(2)}, start, "weights-fp32")
    with pytest.raises(ValueError, match="wte.weight is torch.float32, a delta-bf16 payload holds torch.bfloat16"):
        decode_update(end, start, "delta-bf16")  # fp32 weights decoded as if they were a delta


@pytest.mark.parametrize("kind", ["delta-int8", "delta-int4"])
def test_a_quantized_update_travels_within_its_limits_and_decodes_within_its_error(kind):
    """A site's quantized pseudo-gradient (with its error feedback) is accepted by a weights server limited to the
    run's layouts, decodes on the server to the fp32 delta within half a block step, and the residual it leaves
    is what the next round adds: two rounds' decoded deltas sum to the true deltas minus the final residual."""
    from pilot.dataplane import quantize
    from pilot.dataplane.payload import read_update, update_blob
    from pilot.dataplane.server import AnyUploadLimits, UploadLimits

    start, end = round_pair()
    feedback = quantize.ErrorFeedback(kind, residual_dtype=torch.float32)
    limits = AnyUploadLimits(UploadLimits.for_weights(start), UploadLimits.for_quantized(start, kind))
    store = BlobStore()
    sent_total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in start.items() if v.is_floating_point()}
    true_total = {k: torch.zeros_like(v) for k, v in sent_total.items()}
    with BlobServer(store, token="t", upload_limits=limits) as server:
        for _ in range(2):
            blob = update_blob(start, end, kind, feedback=feedback, reuse_start=False)
            digest = upload_blob(server.url, blob, token="t")
            got_kind, delta = read_update(store.get(digest))
            assert got_kind == kind
            for k in sent_total:
                sent_total[k] += delta[k]
                true_total[k] += start[k].float() - end[k].float()
        with pytest.raises(Exception, match="400|model has not|shape"):   # another layout is refused
            upload_blob(server.url, TensorBlob({"junk": torch.zeros(4, 4)}), token="t")
    for k in sent_total:
        assert torch.allclose(sent_total[k], true_total[k] - feedback.residual[k].float(), atol=1e-6)
    bf16 = payload_module.payload_bytes(start, "delta-bf16")
    assert payload_module.payload_bytes(start, kind) < bf16
