"""The weights data plane: safetensors blobs, content-addressed, over real HTTP on loopback."""

from __future__ import annotations

import hashlib
import io
import socket
import threading

import pytest
import torch
from safetensors.torch import load_file

from pilot.blobs import (
    BlobError,
    BlobServer,
    BlobStore,
    TensorBlob,
    fetch_blob,
    load_tensors,
    read_blob,
    read_metadata,
    save_file,
    upload_blob,
)

TOKEN = "s3cret-token"


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "wte.weight": torch.randn(64, 32, generator=g),
        "h.0.attn.c_q.weight": torch.randn(32, 32, generator=g).to(torch.bfloat16),
        "transposed": torch.randn(8, 16, generator=g).t(),  # not contiguous
        "scalar": torch.tensor(3.5),
        "steps": torch.arange(5, dtype=torch.int64),
        "half": torch.randn(7, generator=g).half(),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_stream_is_valid_safetensors_addressed_by_content(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "weights.safetensors"
    digest = save_file(path, tensors, metadata={"round": 3})
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest == TensorBlob(tensors, {"round": 3}).digest
    assert_same(load_file(str(path)), tensors)  # the reference reader accepts our stream
    assert_same(load_tensors(path), tensors)
    assert read_metadata(path) == {"round": "3"}
    assert TensorBlob(tensors, {"round": 4}).digest != digest
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]  # no temp file left


def test_read_blob_into_preallocated_tensors_and_reject_corruption():
    tensors = sample_tensors()
    blob = TensorBlob(tensors)
    raw = b"".join(bytes(c) for c in blob.chunks())
    staging = {k: torch.zeros_like(v) for k, v in tensors.items()}
    got = read_blob(io.BytesIO(raw), len(raw), expected=blob.digest, into=staging)
    assert got.digest == blob.digest
    assert_same(staging, {k: v.contiguous() for k, v in tensors.items()})
    assert got.tensors["wte.weight"].data_ptr() == staging["wte.weight"].data_ptr()  # filled in place

    flipped = bytearray(raw)
    flipped[-1] ^= 1
    with pytest.raises(BlobError, match="corrupt"):
        read_blob(io.BytesIO(bytes(flipped)), len(raw), expected=blob.digest)
    with pytest.raises(BlobError, match="early"):
        read_blob(io.BytesIO(raw[:-10]), len(raw))
    wrong_shape = dict(staging, **{"wte.weight": torch.zeros(32, 64)})
    with pytest.raises(BlobError, match="wte.weight"):
        read_blob(io.BytesIO(raw), len(raw), into=wrong_shape)


def test_fetch_and_upload_over_http():
    store = BlobStore()
    tensors = sample_tensors()
    digest = store.publish(tensors, {"round": 1})
    with BlobServer(store, token=TOKEN) as server:
        blob = fetch_blob(server.url, digest, token=TOKEN)
        assert blob.digest == digest and blob.metadata == {"round": "1"}
        assert_same(blob.tensors, {k: v.contiguous() for k, v in tensors.items()})

        update = TensorBlob({"delta": torch.ones(10)}, {"tokens": 4096})
        update_digest = upload_blob(server.url, update, token=TOKEN)
        assert update_digest == update.digest and update_digest in store
        assert torch.equal(store.get(update_digest).tensors["delta"], torch.ones(10))
        assert store.get(update_digest).metadata == {"tokens": "4096"}

        store.retain({digest})
        assert update_digest not in store and digest in store


def test_refusals():
    store = BlobStore()
    digest = store.publish(sample_tensors())
    with BlobServer(store, token=TOKEN) as server:
        with pytest.raises(BlobError, match="401"):
            fetch_blob(server.url, digest, token="wrong")
        with pytest.raises(BlobError, match="401"):
            upload_blob(server.url, TensorBlob({"x": torch.zeros(3)}), token="")
        with pytest.raises(BlobError, match="404"):
            fetch_blob(server.url, "0" * 64, token=TOKEN)
        # a stream that is not safetensors is refused and not stored
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", server.httpd.server_address[1])
        conn.request("POST", "/blobs", body=b"\xff" * 16, headers={"Authorization": f"Bearer {TOKEN}"})
        assert conn.getresponse().status == 422
        conn.close()
    assert list(store._blobs) == [digest]


def test_a_transfer_cut_midway_is_an_error():
    """A peer that promises 1 MB and hangs up after half."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    blob = TensorBlob({"w": torch.zeros(250_000)})
    raw = b"".join(bytes(c) for c in blob.chunks())

    def half_a_blob() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw[: len(raw) // 2])
        conn.close()

    thread = threading.Thread(target=half_a_blob)
    thread.start()
    with pytest.raises(BlobError, match="early"):
        fetch_blob(f"http://127.0.0.1:{port}", blob.digest)
    thread.join()
    listener.close()
