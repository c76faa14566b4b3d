"""The weights data plane: safetensors blobs, content-addressed, over real HTTP on loopback."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.client
import io
import ipaddress
import socket
import ssl
import threading

import pytest
import torch
from safetensors.torch import load_file

from pilot.dataplane import client as blob_client
from pilot.dataplane.blob import (
    BlobCorrupt,
    BlobError,
    SpooledBlob,
    TensorBlob,
    load_tensors,
    read_blob,
    read_metadata,
    save_file,
)
from pilot.dataplane.client import fetch_blob, fetch_url, put_blob, upload_blob
from pilot.dataplane.server import BlobServer, byte_range
from pilot.dataplane.store import BlobStore

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

        import tempfile
        spooled = fetch_blob(server.url, digest, token=TOKEN, spool=tempfile.TemporaryFile)   # a site's delta fetch
        assert isinstance(spooled, SpooledBlob) and spooled.digest == digest
        assert_same(dict(spooled.tensors.items()), {k: v.contiguous() for k, v in tensors.items()})


def test_an_upload_can_wait_in_a_file_instead_of_memory(tmp_path):
    """The server spools pseudo-gradient uploads (they are only read through): the same digest, the same tensors
    read one at a time, the same bytes served back; a short or corrupt stream is refused as from memory; nothing
    is left in the spool directory (the files have no name)."""
    spool_dir = tmp_path / "spool"
    store = BlobStore(spool_dir=spool_dir, spool_if=lambda meta: meta.get("payload") == "delta-bf16")
    tensors = sample_tensors()
    with BlobServer(store, token=TOKEN) as server:
        update = TensorBlob(tensors, {"payload": "delta-bf16"})
        digest = upload_blob(server.url, update, token=TOKEN)
        kept = TensorBlob({"w": torch.ones(4)}, {"payload": "weights-fp32"})
        kept_digest = upload_blob(server.url, kept, token=TOKEN)
        spooled = store.get(digest)
        assert isinstance(spooled, SpooledBlob) and spooled.digest == digest == update.digest
        assert isinstance(store.get(kept_digest), TensorBlob)          # what spool_if declines stays in memory
        assert spooled.metadata == {"payload": "delta-bf16"} and list(spooled.tensors) == list(tensors)
        first, again = spooled.tensors["wte.weight"], spooled.tensors["wte.weight"]
        assert torch.equal(first, tensors["wte.weight"]) and first.data_ptr() != again.data_ptr()   # read anew
        assert_same(dict(spooled.tensors.items()), {k: v.contiguous() for k, v in tensors.items()})
        assert b"".join(bytes(c) for c in spooled.chunks()) == b"".join(bytes(c) for c in update.chunks())
        assert b"".join(bytes(c) for c in spooled.chunks(5, 300)) == b"".join(bytes(c) for c in update.chunks(5, 300))
        assert list(spool_dir.iterdir()) == []
    raw = b"".join(bytes(c) for c in update.chunks())
    with pytest.raises(BlobError, match="early"):
        read_blob(io.BytesIO(raw[:-10]), len(raw) - 10, spool=store.spool)
    flipped = bytearray(raw)
    flipped[-1] ^= 1
    with pytest.raises(BlobError, match="corrupt"):
        read_blob(io.BytesIO(bytes(flipped)), len(raw), expected=update.digest, spool=store.spool)
    assert list(spool_dir.iterdir()) == []


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
        with pytest.raises(BlobError, match="401"):
            fetch_blob(server.url, digest)  # no token at all
        status, _, _ = get(server.url, digest, {"Range": "bytes=0-7"})  # a range is no way around the token
        assert status == 401
        # a stream that is not safetensors is refused and not stored
        conn = http.client.HTTPConnection("127.0.0.1", server.httpd.server_address[1])
        conn.request("POST", "/blobs", body=b"\xff" * 16, headers={"Authorization": f"Bearer {TOKEN}"})
        assert conn.getresponse().status == 422
        conn.close()
    assert list(store._blobs) == [digest]


def get(url: str, digest: str, headers: dict[str, str]) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One raw GET, to see exactly what the server answers."""
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", f"/blobs/{digest}", headers=headers)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def test_byte_range_parsing():
    assert byte_range(None, 100) is None
    assert byte_range("bytes=0-9", 100) == (0, 10)
    assert byte_range("bytes=90-", 100) == (90, 100)
    assert byte_range("bytes=90-1000", 100) == (90, 100)  # a last byte past the end is clamped
    assert byte_range("bytes=-10", 100) == (90, 100)
    assert byte_range("bytes=-1000", 100) == (0, 100)
    assert byte_range("bytes=0-1,5-6", 100) is None  # several ranges: the whole blob
    assert byte_range("items=0-1", 100) is None      # another unit: ignored
    for bad in ("bytes=100-", "bytes=5-4", "bytes=-0", "bytes=a-b", "bytes=-"):
        with pytest.raises(ValueError):
            byte_range(bad, 100)


def test_range_requests_over_http():
    store = BlobStore()
    blob = TensorBlob(sample_tensors())
    digest = store.add(blob)
    raw = b"".join(bytes(c) for c in blob.chunks())
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with BlobServer(store, token=TOKEN) as server:
        status, headers, body = get(server.url, digest, auth)
        assert (status, body, headers["Accept-Ranges"]) == (200, raw, "bytes")
        for start in (0, 1, 8, 100, len(raw) - 3):  # across the header, tensor boundaries, the end
            status, headers, body = get(server.url, digest, {**auth, "Range": f"bytes={start}-{start + 700}"})
            end = min(start + 701, len(raw))
            assert status == 206 and body == raw[start:end]
            assert headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(raw)}"
            assert int(headers["Content-Length"]) == end - start
        status, headers, body = get(server.url, digest, {**auth, "Range": "bytes=-5"})
        assert (status, body, headers["Content-Range"]) == (206, raw[-5:], f"bytes {len(raw) - 5}-{len(raw) - 1}/{len(raw)}")
        status, headers, body = get(server.url, digest, {**auth, "Range": f"bytes={len(raw)}-"})
        assert (status, body, headers["Content-Range"]) == (416, b"", f"bytes */{len(raw)}")
        status, _, body = get(server.url, digest, {**auth, "Range": "bytes=0-1,4-5"})
        assert (status, body) == (200, raw)


def test_put_and_fetch_by_url_as_an_object_store_would_be_used():
    """Presigned-URL style: full URLs with a query string, no bearer token; a PUT to /blobs/<sha256> must
    carry exactly the bytes that hash to it."""
    store = BlobStore()
    update = TensorBlob(big_tensors(), {"payload": "delta-bf16"})
    with BlobServer(store) as server:
        signed = f"{server.url}/blobs/{update.digest}?X-Amz-Signature=abc&X-Amz-Expires=600"
        assert put_blob(signed, update) == update.digest and update.digest in store
        staging = {k: torch.zeros_like(v) for k, v in update.tensors.items()}
        got = fetch_url(signed, update.digest, into=staging)
        assert got.metadata == {"payload": "delta-bf16"}
        assert_same(staging, update.tensors)
        not_its_digest = hashlib.sha256(b"another blob").hexdigest()
        with pytest.raises(BlobError, match="422 blob corrupt"):
            put_blob(f"{server.url}/blobs/{not_its_digest}", TensorBlob({"x": torch.ones(4)}))
        with pytest.raises(BlobError, match="404"):
            fetch_url(f"{server.url}/elsewhere/{update.digest}", update.digest)
    assert list(store._blobs) == [update.digest]


# ------------------------------------------------------------------ a network that misbehaves
class FlakyProxy:
    """A TCP proxy in front of the blob server: its first `bad` connections misbehave in one chosen way
    (cut the response after N bytes, cut the request after N bytes, flip one response byte, or drop the
    Range header so that the server cannot resume). Records every request head it forwards."""

    def __init__(self, upstream: str, bad: int = 1, cut_response_after: int | None = None,
                 cut_request_after: int | None = None, flip_response_byte: int | None = None,
                 strip_range: bool = False):
        self.upstream = ("127.0.0.1", int(upstream.rsplit(":", 1)[1]))
        self.bad, self.strip_range = bad, strip_range
        self.cut_response_after, self.cut_request_after = cut_response_after, cut_request_after
        self.flip_response_byte = flip_response_byte
        self.heads: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            faulty = len(self.heads) < self.bad
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                data = client.recv(65536)
                if not data:
                    break
                buffer += data
            head, _, rest = buffer.partition(b"\r\n\r\n")
            self.heads.append(head.decode())
            if faulty and self.strip_range:
                head = b"\r\n".join(line for line in head.split(b"\r\n") if not line.lower().startswith(b"range:"))
            server = socket.create_connection(self.upstream)
            server.sendall(head + b"\r\n\r\n")
            request_cut = self.cut_request_after if faulty else None
            response_cut = self.cut_response_after if faulty else None
            flip = self.flip_response_byte if faulty else None
            threading.Thread(target=self._pump, args=(client, server, rest, request_cut, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, b"", response_cut, flip), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, first: bytes, cut: int | None, flip: int | None) -> None:
        sent = 0
        data = first
        try:
            while True:
                if data:
                    if flip is not None and sent <= flip < sent + len(data):
                        data = bytearray(data)
                        data[flip - sent] ^= 0x40
                    if cut is not None and sent + len(data) >= cut:
                        dst.sendall(data[:cut - sent])
                        raise ConnectionAbortedError("cut")  # hang up on both sides, mid-transfer
                    dst.sendall(data)
                    sent += len(data)
                data = src.recv(1 << 20)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
        except OSError:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.listener.close()


def big_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"a": torch.randn(300_000, generator=g), "b": torch.randn(400, 1000, generator=g).to(torch.bfloat16)}


@pytest.fixture
def served():
    """A server holding one 2 MB blob; yields (server, digest, its tensors)."""
    store = BlobStore()
    tensors = big_tensors()
    digest = store.publish(tensors)
    with BlobServer(store, token=TOKEN) as server:
        yield server, digest, tensors


def fetch_through(proxy: FlakyProxy, digest: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    staging = {k: torch.full_like(v, 7.0) for k, v in tensors.items()}
    try:
        fetch_blob(proxy.url, digest, token=TOKEN, into=staging)
    finally:
        proxy.close()
    return staging


def test_a_fetch_cut_midway_resumes_where_it_stopped(served):
    server, digest, tensors = served
    proxy = FlakyProxy(server.url, cut_response_after=1_000_000)
    assert_same(fetch_through(proxy, digest, tensors), tensors)  # bit-identical to the blob
    assert len(proxy.heads) == 2 and "range" not in proxy.heads[0].lower()
    (resume,) = [line for line in proxy.heads[1].split("\r\n") if line.lower().startswith("range:")]
    start = int(resume.split("=")[1].rstrip("-"))
    assert 900_000 < start < 1_000_000  # from where it stopped (the cut counted the response headers too)


def test_a_fetch_that_cannot_resume_restarts_from_zero(served):
    server, digest, tensors = served
    proxy = FlakyProxy(server.url, bad=2, cut_response_after=1_000_000, strip_range=True)  # the resume gets a 200
    assert_same(fetch_through(proxy, digest, tensors), tensors)
    assert len(proxy.heads) == 3


def test_a_fetch_that_keeps_failing_gives_up(served, monkeypatch):
    monkeypatch.setattr(blob_client, "RESUME_BACKOFF_S", 0.0)
    server, digest, tensors = served
    proxy = FlakyProxy(server.url, bad=100, cut_response_after=1_000_000)
    assert_same(fetch_through(proxy, digest, tensors), tensors)  # cut every 1 MB: each try brings bytes
    proxy = FlakyProxy(server.url, bad=100, cut_response_after=60)  # inside the response headers
    with pytest.raises(BlobError, match="resumes failed"):
        fetch_through(proxy, digest, tensors)
    assert len(proxy.heads) == 1 + blob_client.MAX_RESUMES


def test_a_corrupted_fetch_is_fetched_again(served):
    server, digest, tensors = served
    proxy = FlakyProxy(server.url, flip_response_byte=1_500_000)  # one bit flipped on the way, first time only
    assert_same(fetch_through(proxy, digest, tensors), tensors)
    assert len(proxy.heads) == 2


def test_a_blob_with_a_wrong_hash_is_refused(served):
    """The server serves bytes that are not what the digest names: fetched twice, then refused."""
    server, digest, tensors = served
    wrong = hashlib.sha256(b"something else").hexdigest()
    server.httpd.store._blobs[wrong] = server.httpd.store.get(digest)
    proxy = FlakyProxy(server.url, bad=0)
    with pytest.raises(BlobCorrupt, match=f"expected sha256 {wrong}"):
        fetch_through(proxy, wrong, tensors)
    assert len(proxy.heads) == 2


def test_an_upload_cut_midway_is_sent_again(served):
    server, _, tensors = served
    proxy = FlakyProxy(server.url, cut_request_after=1_000_000)
    update = TensorBlob({k: v + 1 for k, v in tensors.items()})
    try:
        digest = upload_blob(proxy.url, update, token=TOKEN)
    finally:
        proxy.close()
    assert len(proxy.heads) == 2 and digest == update.digest
    assert_same(server.httpd.store.get(digest).tensors, update.tensors)


# ------------------------------------------------------------------ TLS
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA and a certificate it signed for 127.0.0.1 / localhost (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False), critical=True)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("pilot test CA", ca_key, "pilot test CA", ca_key, ca=True)
    server_cert = certificate("127.0.0.1", server_key, "pilot test CA", ca_key, ca=False)
    paths = {name: folder / f"{name}.pem" for name in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return paths


def test_tls_a_client_that_trusts_the_ca_fetches_others_are_refused(pki, monkeypatch):
    monkeypatch.setattr(blob_client, "RESUME_BACKOFF_S", 0.0)  # plain HTTP to the TLS port is retried, then refused
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(pki["cert"], pki["key"])
    trusting = ssl.create_default_context(cafile=str(pki["ca"]))
    store = BlobStore()
    tensors = sample_tensors()
    digest = store.publish(tensors)
    with BlobServer(store, token=TOKEN, ssl_context=server_context) as server:
        assert server.url.startswith("https://")
        with pytest.raises(BlobError, match="CERTIFICATE_VERIFY_FAILED"):
            fetch_blob(server.url, digest, token=TOKEN)  # the system's CAs do not know ours
        with pytest.raises(BlobError, match="CERTIFICATE_VERIFY_FAILED"):
            upload_blob(server.url, TensorBlob({"x": torch.zeros(3)}), token=TOKEN, ssl_context=ssl.create_default_context())
        with pytest.raises(BlobError):
            fetch_blob(server.url.replace("https", "http"), digest, token=TOKEN)  # plain HTTP to a TLS port
        # the refused handshakes did not take the server down
        blob = fetch_blob(server.url, digest, token=TOKEN, ssl_context=trusting)
        assert_same(blob.tensors, {k: v.contiguous() for k, v in tensors.items()})
        update = TensorBlob({"delta": torch.arange(6.0)})
        assert upload_blob(server.url, update, token=TOKEN, ssl_context=trusting) == update.digest in store
        localhost = server.url.replace("127.0.0.1", "localhost")
        assert fetch_blob(localhost, digest, token=TOKEN, ssl_context=trusting).digest == digest
