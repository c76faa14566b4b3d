"""Scenario 10, the data plane: blob tokens per site and round, uploads capped at the model's size and shapes,
no plain HTTP on an address other hosts reach unless allowed."""

from __future__ import annotations

import http.client

import pytest
import torch

from pilot.dataplane.blob import BlobError, TensorBlob
from pilot.dataplane.client import fetch_blob, upload_blob
from pilot.dataplane.payload import update_blob
from pilot.dataplane.server import (
    BlobServer,
    InsecureBinding,
    RoundTokens,
    UploadLimits,
    check_exposure,
    is_loopback,
)
from pilot.dataplane.store import BlobStore

MODEL = {"wte": torch.randn(16, 8), "h.0.mlp": torch.randn(8, 8), "steps": torch.tensor([3], dtype=torch.int64)}


def test_a_token_reads_only_its_rounds_blob_and_uploads_only_as_its_site():
    store, tokens = BlobStore(), RoundTokens()
    digest = store.publish(MODEL)
    other = store.publish({"x": torch.ones(2)})
    with BlobServer(store, authorize=tokens.authorize) as server:
        tokens.open_round(3, {digest})
        mine, theirs = tokens.issue("client_0", 3), tokens.issue("client_1", 3)
        assert torch.equal(fetch_blob(server.url, digest, token=mine).tensors["wte"], MODEL["wte"])
        with pytest.raises(BlobError, match="403"):
            fetch_blob(server.url, other, token=mine)               # not this round's blob
        up = upload_blob(server.url, TensorBlob({k: v + 1 for k, v in MODEL.items()}), token=mine)
        assert server.uploaded_by(up) == ("client_0", 3)
        up1 = upload_blob(server.url, TensorBlob({k: v + 2 for k, v in MODEL.items()}), token=theirs)
        assert server.uploaded_by(up1) == ("client_1", 3)
        forged = [
            "",                                                      # none
            mine[:-1] + ("0" if mine[-1] != "0" else "1"),           # tampered
            "client_1" + mine[len("client_0"):],                     # another site's name on my MAC
            mine.replace(".3.", ".4."),                              # another round
            tokens.issue("client_0", 4),                             # a round that is not open
            RoundTokens().issue("client_0", 3),                      # a restarted server's (another secret)
        ]
        for token in forged:
            with pytest.raises(BlobError, match="401"):
                fetch_blob(server.url, digest, token=token)
            with pytest.raises(BlobError, match="401"):
                upload_blob(server.url, TensorBlob({"x": torch.ones(2)}), token=token)
        tokens.close_round(3)
        with pytest.raises(BlobError, match="401"):
            fetch_blob(server.url, digest, token=mine)               # the round is over


def test_the_shared_token_still_works_by_default():
    store = BlobStore()
    digest = store.publish(MODEL)
    with BlobServer(store, token="t") as server:
        assert fetch_blob(server.url, digest, token="t").digest == digest
        with pytest.raises(BlobError, match="401"):
            fetch_blob(server.url, digest, token="u")


def post(url: str, body: bytes, length: int | None = None, token: str = "t") -> tuple[int, str]:
    host, port = url.split("://")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/blobs")
    conn.putheader("Authorization", f"Bearer {token}")
    conn.putheader("Content-Length", str(len(body) if length is None else length))
    conn.endheaders()
    try:
        conn.send(body)
    except OSError:
        pass
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, text


def test_uploads_are_capped_at_the_models_shapes_and_size_before_allocating():
    store = BlobStore()
    allocations = []
    allocate = store.allocate
    store.allocate = lambda shape, dtype: allocations.append(shape) or allocate(shape, dtype)  # type: ignore[method-assign]
    limits = UploadLimits.for_weights(MODEL)
    with BlobServer(store, token="t", upload_limits=limits) as server:
        # what sites send: weights-fp32 and delta-bf16 payloads of the model
        end = {k: v + 0.5 if v.is_floating_point() else v for k, v in MODEL.items()}
        for kind in ("weights-fp32", "delta-bf16"):
            digest = upload_blob(server.url, update_blob(MODEL, end, kind), token="t")
            assert digest in store
        allocations.clear()
        refusals = {
            "shape": ({**MODEL, "wte": torch.zeros(1 << 12, 8)}, 413),      # larger than the model allows
            "small shape": ({**MODEL, "wte": torch.zeros(4, 8)}, 400),
            "dtype": ({**MODEL, "wte": MODEL["wte"].double()}, 400),
            "dtype16": ({**MODEL, "wte": MODEL["wte"].half()}, 400),
            "int dtype": ({**MODEL, "steps": torch.tensor([3.0])}, 400),
            "unknown name": ({**MODEL, "extra": torch.zeros(1)}, 400),
            "missing name": ({k: v for k, v in MODEL.items() if k != "h.0.mlp"}, 400),
        }
        reasons = {}
        for what, (tensors, status) in refusals.items():
            blob = TensorBlob(tensors)
            got, reasons[what] = post(server.url, b"".join(bytes(c) for c in blob.chunks()))
            assert got == status, (what, got, reasons[what])
        assert "shape [4, 8], the model's is [16, 8]" in reasons["small shape"]
        assert "'wte' is F16" in reasons["dtype16"] and "tensors the model has not: ['extra']" in reasons["unknown name"]
        assert "lacks tensors of the model: ['h.0.mlp']" in reasons["missing name"]
        assert "larger than the largest update" in reasons["shape"]
        # a header that claims a huge tensor in a small body, and a Content-Length far beyond the model
        huge = TensorBlob({**MODEL, "wte": torch.zeros(16, 8)})
        raw = bytes(huge.header).replace(b"[16,8]", b"[99999999,9999]")
        assert post(server.url, raw + bytes(8))[0] == 400
        status, reason = post(server.url, b"", length=1 << 40)
        assert status == 413 and str(limits.max_bytes) in reason
        assert post(server.url, b"\xff" * 8 + bytes(16))[0] == 413                  # a header "larger" than allowed
        assert allocations == [], "nothing was allocated for a refused upload"
        assert upload_blob(server.url, TensorBlob(end), token="t") in store   # and the server still serves


def test_plain_http_on_a_reachable_address_is_refused_unless_allowed():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host)
        check_exposure(host, tls=False)
    for host in ("0.0.0.0", "", "::", "10.0.0.5"):
        assert not is_loopback(host)
        with pytest.raises(InsecureBinding, match="blob-certfile, blob-keyfile, blob-cafile") as error:
            check_exposure(host, tls=False)
        assert "blob-allow-insecure" in str(error.value)
        check_exposure(host, tls=True)
        check_exposure(host, tls=False, allow_insecure=True)
    with pytest.raises(InsecureBinding):
        BlobServer(BlobStore(), host="0.0.0.0")
    server = BlobServer(BlobStore(), host="0.0.0.0", allow_insecure=True)
    server.httpd.server_close()
