"""The weights data plane: content-addressed safetensors blobs over streaming HTTP.

Flower messages carry control (round, deadline, the address and SHA-256 of the weights); the weights travel
here. A blob is a safetensors file named by the SHA-256 of its bytes, so a receiver verifies what it got
and a blob is never fetched twice. Measured in FACTS.md: Flower's message path moves a d20 state in ~90 s,
a loopback socket in ~1 s; this module keeps to the socket's order of magnitude: a blob is served straight
from the tensors' memory, received straight into tensors (readinto), and hashed while the bytes move, so no
serialised copy of the model ever exists.

    store = BlobStore()
    digest = store.publish(global_weights)                    # one hash pass; no serialised copy
    with BlobServer(store, token=secret) as server:           # GET /blobs/<sha256>, POST /blobs, bearer token
        blob = fetch_blob(server.url, digest, token=secret, into=staging)   # verified, straight into tensors
        update_digest = upload_blob(server.url, TensorBlob(update), token=secret)

A connection lost mid-fetch is resumed with an HTTP Range request from the byte where it stopped (or read
again from the start when the server cannot resume); the SHA-256 always covers the whole blob. A blob that
hashes wrong is fetched once more, then refused (BlobCorrupt). TLS: give BlobServer a server SSLContext
and the clients one that trusts its CA (ssl.create_default_context(cafile=...)).

fetch_url and put_blob speak plain GET (with Range) and PUT to any URL, so an S3-compatible object store's
presigned URLs can stand in for the BlobServer (docs/data_plane.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import os
import re
import ssl
import struct
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import torch
from safetensors import safe_open

CHUNK = 4 << 20                   # bytes per read/write/hash step: large enough to keep syscalls cheap
HTTP_TIMEOUT_S = 60.0             # a peer silent for this long is gone
MAX_RESUMES = 5                   # reconnections within one fetch before it fails
RESUME_BACKOFF_S = 0.5            # wait before the n-th reconnection in a row: (n-1) x this (a restarting server needs a moment)
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")

# safetensors dtype names (https://github.com/huggingface/safetensors, format spec)
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


class BlobError(RuntimeError):
    """A blob is missing, corrupt, refused or could not be moved."""


class BlobCorrupt(BlobError):
    """A blob arrived whole but its bytes do not hash to the digest asked for."""


# ------------------------------------------------------------------ safetensors as a stream
def _dtype_code(name: str, tensor: torch.Tensor) -> str:
    if tensor.dtype not in _DTYPES:
        raise BlobError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot hold")
    return _DTYPES[tensor.dtype]


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor: a view when it is contiguous on the CPU, else one copy of that tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class TensorBlob:
    """Tensors as one safetensors byte stream, never materialised: header + each tensor's own memory.

    The tensors must not change while the blob is served: its digest promises exactly these bytes.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 digest: str | None = None):
        self.tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        header: dict[str, object] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for name, tensor in self.tensors.items():
            size = tensor.numel() * tensor.element_size()
            header[name] = {"dtype": _dtype_code(name, tensor), "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format asks for 8-byte alignment of the data
        self.header = struct.pack("<Q", len(raw)) + raw
        self.size = len(self.header) + offset
        self._digest = digest

    def chunks(self, start: int = 0, end: int | None = None) -> Iterator[memoryview]:
        """The stream's bytes [start, end) as views of the header and the tensors' memory, CHUNK at a time."""
        end = self.size if end is None else end
        offset = 0  # of the current piece in the stream
        for piece in (memoryview(self.header), *(_tensor_bytes(t) for t in self.tensors.values())):
            lo, hi = max(start - offset, 0), min(end - offset, len(piece))
            for at in range(lo, hi, CHUNK):
                yield piece[at:min(at + CHUNK, hi)]
            offset += len(piece)
            if offset >= end:
                break

    @property
    def digest(self) -> str:
        """SHA-256 of the byte stream (computed once, on first use)."""
        if self._digest is None:
            digest = hashlib.sha256()
            for chunk in self.chunks():
                digest.update(chunk)
            self._digest = digest.hexdigest()
        return self._digest

    def write_to(self, out: BinaryIO) -> str:
        """Write the stream to `out`, hashing on the way; returns the digest."""
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
            out.write(chunk)
        self._digest = digest.hexdigest()
        return self._digest


_TORCH_DTYPES = {code: dtype for dtype, code in _DTYPES.items()}


Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def read_blob(stream: BinaryIO, length: int, expected: str | None = None,
              into: Mapping[str, torch.Tensor] | None = None, allocate: Allocate | None = None) -> TensorBlob:
    """Read a safetensors stream of `length` bytes straight into tensors, hashing as bytes arrive.

    `into`: preallocated tensors (same names, shapes, dtypes) to fill; else `allocate(shape, dtype)` gives
    each tensor (e.g. recycled memory: fresh pages cost more than copying into them), else torch.empty. A
    stream that ends early, is malformed or does not hash to `expected` raises BlobError.
    """
    digest = hashlib.sha256()
    remaining = length

    def read_exact(view: memoryview) -> None:
        nonlocal remaining
        got = 0
        while got < len(view):
            n = stream.readinto(view[got:got + CHUNK])
            if not n:
                raise BlobError(f"stream ended {remaining - got} bytes early ({length} expected)")
            digest.update(view[got:got + n])
            got += n
        remaining -= got

    if length < 8:
        raise BlobError(f"a safetensors stream has at least 8 bytes, got {length}")
    size_bytes = bytearray(8)
    read_exact(memoryview(size_bytes))
    (header_len,) = struct.unpack("<Q", size_bytes)
    if header_len > min(remaining, 100 << 20):
        raise BlobError(f"safetensors header of {header_len} bytes does not fit the stream")
    header_bytes = bytearray(header_len)
    read_exact(memoryview(header_bytes))
    try:
        header = json.loads(header_bytes)
    except ValueError as error:
        raise BlobError(f"safetensors header is not JSON: {error}") from error
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for name, spec in header.items():
        dtype = _TORCH_DTYPES.get(spec.get("dtype"))
        start, end = spec.get("data_offsets", [None, None])
        if dtype is None or start != offset:
            raise BlobError(f"tensor {name!r}: unsupported dtype or out-of-order data ({spec})")
        shape = tuple(spec["shape"])
        if into is not None:
            tensor = into[name]
            if tensor.shape != shape or tensor.dtype != dtype:
                raise BlobError(f"tensor {name!r} is {dtype}{list(shape)}, expected {tensor.dtype}{list(tensor.shape)}")
        else:
            tensor = (allocate or torch.empty)(shape, dtype=dtype)
        if tensor.numel() * tensor.element_size() != end - start:
            raise BlobError(f"tensor {name!r}: {end - start} bytes do not hold {dtype}{list(shape)}")
        if tensor.device.type == "cpu" and tensor.is_contiguous():
            read_exact(_tensor_bytes(tensor))  # the bytes land in the tensor's own memory
        else:  # a strided or GPU target gets the bytes through one staging copy of this tensor
            staged = torch.empty(shape, dtype=dtype)
            read_exact(_tensor_bytes(staged))
            tensor.copy_(staged)
        tensors[name] = tensor
        offset = end
    if remaining:
        raise BlobError(f"{remaining} bytes after the last tensor")
    got = digest.hexdigest()
    if expected is not None and got != expected:
        raise BlobCorrupt(f"blob corrupt: expected sha256 {expected}, received {got}")
    return TensorBlob(tensors, metadata, digest=got)


def save_file(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
              metadata: Mapping[str, str] | None = None) -> str:
    """Write a safetensors file atomically (temp file, fsync, rename); returns its SHA-256."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as out:
            digest = TensorBlob(tensors, metadata).write_to(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_tensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file."""
    with safe_open(str(path), framework="pt", device=device) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


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


# ------------------------------------------------------------------ HTTP
def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The bytes [start, end) that an HTTP Range header asks of a `size`-byte blob (RFC 9110, section 14).

    None: serve the whole blob (no header, another unit, or several ranges, which a server may ignore).
    ValueError: a malformed or unsatisfiable range (answered 416). `bytes=-N` is the last N bytes;
    a last byte past the end is clamped.
    """
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = re.fullmatch(r"\s*(\d*)\s*-\s*(\d*)\s*", spec)
    if match is None or match.groups() == ("", ""):
        raise ValueError(f"malformed range {header!r}")
    first, last = match.groups()
    if first == "":  # a suffix: the last N bytes
        if int(last) == 0 or size == 0:
            raise ValueError(f"range {header!r} asks for no bytes")
        return max(size - int(last), 0), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if last != "" and int(last) < start:
        raise ValueError(f"range {header!r}: last byte before first")
    if start >= size:
        raise ValueError(f"range {header!r} starts past the blob's {size} bytes")
    return start, end


class _Handler(BaseHTTPRequestHandler):
    server: _BlobHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = HTTP_TIMEOUT_S  # an idle or stalled connection frees its thread

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # the run's own log says what matters; per-request lines would drown it

    def _digest(self) -> str | None:
        match = re.fullmatch(r"/blobs/([0-9a-f]{64})", urlsplit(self.path).path)  # a query string is ignored
        return match.group(1) if match else None

    def _authorised(self) -> bool:
        given = self.headers.get("Authorization", "")
        expected = f"Bearer {self.server.token}"
        if self.server.token and not hmac.compare_digest(given.encode(), expected.encode()):
            self._reply(401, "missing or wrong bearer token")
            return False
        return True

    def _reply(self, status: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if not self._authorised():
            return
        digest = self._digest()
        if digest is None:
            return self._reply(404, "expected /blobs/<sha256>")
        blob = self.server.store.get(digest)
        if blob is None:
            return self._reply(404, f"no blob {digest}")
        try:
            wanted = byte_range(self.headers.get("Range"), blob.size)
        except ValueError as error:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{blob.size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.log_message("%s", error)
            return
        start, end = wanted or (0, blob.size)
        self.send_response(206 if wanted else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{blob.size}")
        self.end_headers()
        for chunk in blob.chunks(start, end):  # straight from the tensors' memory to the socket
            self.wfile.write(chunk)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if not self._authorised():
            return
        length = self.headers.get("Content-Length")
        if self.path != "/blobs" or length is None:
            return self._reply(400, "expected POST /blobs with a Content-Length")
        try:
            blob = read_blob(self.rfile, int(length), allocate=self.server.store.allocate)
        except BlobError as error:
            self.close_connection = True
            return self._reply(422, str(error))
        self.server.store.add(blob)
        self._reply(201, blob.digest)

    def do_PUT(self) -> None:  # noqa: N802 - stdlib name
        """PUT /blobs/<sha256>: the address names the content, so what arrives must hash to it."""
        if not self._authorised():
            return
        digest, length = self._digest(), self.headers.get("Content-Length")
        if digest is None or length is None:
            return self._reply(400, "expected PUT /blobs/<sha256> with a Content-Length")
        try:
            blob = read_blob(self.rfile, int(length), expected=digest, allocate=self.server.store.allocate)
        except BlobError as error:
            self.close_connection = True
            return self._reply(422, str(error))
        self.server.store.add(blob)
        self._reply(201, blob.digest)


class _BlobHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    store: BlobStore
    token: str
    ssl_context: ssl.SSLContext | None = None

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        """A client that hangs up mid-transfer is normal on a data plane (it resumes): no traceback for it."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError, ssl.SSLError)):
            super().handle_error(request, client_address)

    def finish_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        """TLS handshake here, in the connection's own thread: a slow or refused client stalls only itself."""
        if self.ssl_context is None:
            return super().finish_request(request, client_address)
        request.settimeout(HTTP_TIMEOUT_S)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except OSError:  # the client does not trust us, or speaks plain HTTP: its problem, not the server's
            request.close()
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


class BlobServer:
    """Serves a BlobStore: GET /blobs/<sha256> (with Range), POST /blobs, PUT /blobs/<sha256> (checked
    against that digest), bearer-token auth, optional TLS.

    `ssl_context`: a server context holding the certificate, e.g.
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH); ctx.load_cert_chain(cert_pem, key_pem).
    """

    def __init__(self, store: BlobStore, host: str = "127.0.0.1", port: int = 0, token: str = "",
                 ssl_context: ssl.SSLContext | None = None):
        self.httpd = _BlobHTTPServer((host, port), _Handler)
        self.httpd.store = store
        self.httpd.token = token
        self.httpd.ssl_context = ssl_context
        self.scheme = "https" if ssl_context else "http"
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def start(self) -> BlobServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="blob-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> BlobServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _new_connection(base_url: str, ssl_context: ssl.SSLContext | None) -> http.client.HTTPConnection:
    parts = urlsplit(base_url)
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=HTTP_TIMEOUT_S, context=ssl_context,
                                           blocksize=CHUNK)
    if parts.scheme == "http":
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=HTTP_TIMEOUT_S, blocksize=CHUNK)
    raise BlobError(f"blob URL must be http:// or https://, got {base_url!r}")


@contextlib.contextmanager
def _network_errors(base_url: str) -> Iterator[None]:
    """Network errors inside surface as BlobError naming the peer."""
    try:
        yield
    except (OSError, http.client.HTTPException) as error:
        parts = urlsplit(base_url)
        raise BlobError(f"blob transfer with {parts.hostname}:{parts.port} failed: {error}") from error


@contextlib.contextmanager
def _connection(base_url: str, ssl_context: ssl.SSLContext | None) -> Iterator[http.client.HTTPConnection]:
    conn = _new_connection(base_url, ssl_context)
    try:
        with _network_errors(base_url):
            yield conn
    finally:
        conn.close()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class _ResumingBody:
    """The body of a GET as a stream that reconnects where it stopped if the connection drops.

    A resumed request asks for `Range: bytes=<received>-` and must get exactly that (206 with the matching
    Content-Range); a server that answers 200 instead sends the blob from byte 0, and the bytes already
    received are skipped. Either way the reader sees one unbroken stream and hashes all of it. It gives up
    after MAX_RESUMES reconnections in a row that brought no new byte.
    """

    def __init__(self, url: str, token: str, ssl_context: ssl.SSLContext | None):
        self.url, self.token, self.ssl_context = url, token, ssl_context
        parts = urlsplit(url)
        self.target = parts.path + (f"?{parts.query}" if parts.query else "")
        self.received = 0      # bytes handed to the reader
        self.length = -1       # the blob's size, from the first response
        self.stalls = 0        # reconnections in a row without progress
        self._opened_at = 0    # `received` when the current connection was opened
        self._conn: http.client.HTTPConnection | None = None
        self._response: http.client.HTTPResponse | None = None
        self._reconnect()

    def _reconnect(self) -> None:
        while True:
            try:
                return self._open()
            except ssl.SSLCertVerificationError:
                raise  # trying again will not make the server trustworthy
            except (OSError, http.client.HTTPException) as error:
                self._stalled(error)

    def _stalled(self, error: BaseException) -> None:
        if self.received > self._opened_at:
            self.stalls = 0  # the last connection brought bytes: a flaky link, not a dead one
        self._opened_at = self.received
        if self.stalls >= MAX_RESUMES:
            where = f"at byte {self.received} of {self.length}" if self.length >= 0 else "before the first byte"
            raise BlobError(f"GET {self.url}: connection lost {where}, {self.stalls} resumes failed: {error}")
        self.stalls += 1
        time.sleep(RESUME_BACKOFF_S * (self.stalls - 1))

    def _open(self) -> None:
        self.close()
        self._opened_at = self.received
        self._conn = _new_connection(self.url, self.ssl_context)
        headers = _auth(self.token)
        if self.received:
            headers["Range"] = f"bytes={self.received}-"
        self._conn.request("GET", self.target, headers=headers)
        response = self._response = self._conn.getresponse()
        if response.status not in (200, 206):
            raise BlobError(f"GET {self.url}: {response.status} {response.read().decode(errors='replace').strip()}")
        if response.headers.get("Content-Length") is None:  # headers cut short
            raise http.client.IncompleteRead(b"", None)
        length = int(response.headers["Content-Length"])
        if response.status == 206:
            expected = f"bytes {self.received}-{self.length - 1}/{self.length}"
            if not self.received or response.headers.get("Content-Range") != expected:
                raise BlobError(f"GET {self.url}: asked for {expected}, got {response.headers.get('Content-Range')}")
            return
        if self.length not in (-1, length):
            raise BlobError(f"GET {self.url}: the blob was {self.length} bytes, now {length}")
        self.length = length
        skip, scratch = self.received, bytearray(min(self.received, CHUNK))
        while skip:  # the server cannot resume: read again from the start, keep what we have
            n = response.readinto(memoryview(scratch)[:min(skip, CHUNK)])
            if not n:
                raise http.client.IncompleteRead(b"", skip)
            skip -= n

    def readinto(self, view: memoryview) -> int:
        while True:
            try:
                if self._response is None:
                    raise ConnectionError("not connected")
                n = self._response.readinto(view)
                error: BaseException = ConnectionError("connection closed early")
            except (OSError, http.client.HTTPException) as broken:
                n, error = 0, broken
            if n or self.received >= self.length or not len(view):
                self.received += n
                return n
            self._stalled(error)
            self._reconnect()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = self._response = None


def fetch_blob(base_url: str, digest: str, token: str = "", into: Mapping[str, torch.Tensor] | None = None,
               ssl_context: ssl.SSLContext | None = None) -> TensorBlob:
    """Download blob `digest` from a BlobServer at `base_url` straight into tensors (`into`, or new ones),
    verified against its digest. See fetch_url."""
    return fetch_url(f"{base_url.rstrip('/')}/blobs/{digest}", digest, token, into, ssl_context)


def fetch_url(url: str, digest: str, token: str = "", into: Mapping[str, torch.Tensor] | None = None,
              ssl_context: ssl.SSLContext | None = None) -> TensorBlob:
    """Download a safetensors blob from any HTTP(S) URL that serves it (a BlobServer, or an object store's
    presigned GET URL, token=""), straight into tensors, verified against `digest`.

    A dropped connection is resumed (given up after MAX_RESUMES tries in a row without progress); a blob
    that hashes wrong is fetched once more and then refused with BlobCorrupt. On any BlobError the `into`
    tensors hold partial or wrong bytes: fetch into a staging buffer, not the live model, and use it only
    when this returns.
    """
    for attempt in (1, 2):
        try:
            with _network_errors(url):
                body = _ResumingBody(url, token, ssl_context)
                try:
                    return read_blob(body, body.length, expected=digest, into=into)
                finally:
                    body.close()
        except BlobCorrupt:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def put_blob(url: str, blob: TensorBlob, token: str = "", ssl_context: ssl.SSLContext | None = None) -> str:
    """PUT a blob to any HTTP(S) URL (a BlobServer's /blobs/<sha256>, which checks the bytes against that
    digest, or an object store's presigned PUT URL, token=""), hashing it on the way; returns its digest,
    for the control message. A dropped connection is tried once more from the start."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    for attempt in (1, 2):
        digest = hashlib.sha256()
        try:
            with _connection(url, ssl_context) as conn:
                conn.request("PUT", target, body=_hashed_chunks(blob, digest), headers={**_auth(token), "Content-Length": str(blob.size),
                                                                 "Content-Type": "application/octet-stream"})
                response = conn.getresponse()
                text = response.read().decode(errors="replace").strip()
        except BlobError as error:
            if attempt == 2 or isinstance(error.__cause__, ssl.SSLCertVerificationError):
                raise
            continue
        if not 200 <= response.status < 300:
            raise BlobError(f"PUT {url}: {response.status} {text[:500]}")
        blob._digest = digest.hexdigest()
        return blob._digest
    raise AssertionError("unreachable")


def upload_blob(base_url: str, blob: TensorBlob, token: str = "",
                ssl_context: ssl.SSLContext | None = None) -> str:
    """Upload a blob, hashing it as it goes; returns its digest once the server has confirmed the same one.

    A dropped connection or a digest the server does not confirm is tried once more from the start.
    """
    for attempt in (1, 2):
        try:
            return _upload_once(base_url, blob, token, ssl_context)
        except _UploadFailed as error:
            if attempt == 2:
                raise BlobError(str(error)) from error
    raise AssertionError("unreachable")


class _UploadFailed(BlobError):
    """An upload that may succeed when tried again (the connection broke, or bytes changed on the way)."""


def _hashed_chunks(blob: TensorBlob, digest: hashlib._Hash) -> Iterator[memoryview]:
    """The blob's bytes, each also fed to `digest` as it goes out."""
    for chunk in blob.chunks():
        digest.update(chunk)
        yield chunk


def _upload_once(base_url: str, blob: TensorBlob, token: str, ssl_context: ssl.SSLContext | None) -> str:
    digest = hashlib.sha256()
    try:
        with _connection(base_url, ssl_context) as conn:
            conn.request("POST", "/blobs", body=_hashed_chunks(blob, digest),
                         headers={**_auth(token), "Content-Length": str(blob.size),
                                  "Content-Type": "application/octet-stream"})
            response = conn.getresponse()
            text = response.read().decode(errors="replace").strip()
    except BlobError as error:
        if isinstance(error.__cause__, ssl.SSLCertVerificationError):
            raise  # trying again will not make the server trustworthy
        raise _UploadFailed(str(error)) from error
    if response.status != 201:
        raise BlobError(f"POST {base_url}/blobs: {response.status} {text}")
    if text != digest.hexdigest():
        raise _UploadFailed(f"upload corrupted on the way: sent sha256 {digest.hexdigest()}, server got {text}")
    blob._digest = text
    return text
