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
import threading
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
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")

# safetensors dtype names (https://github.com/huggingface/safetensors, format spec)
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


class BlobError(RuntimeError):
    """A blob is missing, corrupt, refused or could not be moved."""


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

    def chunks(self) -> Iterator[memoryview]:
        for piece in (memoryview(self.header), *(_tensor_bytes(t) for t in self.tensors.values())):
            for start in range(0, len(piece), CHUNK):
                yield piece[start:start + CHUNK]

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
        raise BlobError(f"blob corrupt: expected sha256 {expected}, received {got}")
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
class _Handler(BaseHTTPRequestHandler):
    server: _BlobHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # the run's own log says what matters; per-request lines would drown it

    def _digest(self) -> str | None:
        match = re.fullmatch(r"/blobs/([0-9a-f]{64})", self.path)
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
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(blob.size))
        self.end_headers()
        for chunk in blob.chunks():  # straight from the tensors' memory to the socket
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


class _BlobHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    store: BlobStore
    token: str


class BlobServer:
    """Serves a BlobStore: GET and PUT /blobs/<sha256>, bearer-token auth, optional TLS."""

    def __init__(self, store: BlobStore, host: str = "127.0.0.1", port: int = 0, token: str = "",
                 ssl_context: ssl.SSLContext | None = None):
        self.httpd = _BlobHTTPServer((host, port), _Handler)
        self.httpd.store = store
        self.httpd.token = token
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if ssl_context else "http"
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def start(self) -> BlobServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="blob-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> BlobServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def _connection(base_url: str, ssl_context: ssl.SSLContext | None) -> Iterator[http.client.HTTPConnection]:
    parts = urlsplit(base_url)
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=HTTP_TIMEOUT_S, context=ssl_context, blocksize=CHUNK)
    elif parts.scheme == "http":
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=HTTP_TIMEOUT_S, blocksize=CHUNK)
    else:
        raise BlobError(f"blob URL must be http:// or https://, got {base_url!r}")
    try:
        yield conn
    except (OSError, http.client.HTTPException) as error:
        raise BlobError(f"blob transfer with {parts.hostname}:{parts.port} failed: {error}") from error
    finally:
        conn.close()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def fetch_blob(base_url: str, digest: str, token: str = "", into: Mapping[str, torch.Tensor] | None = None,
               ssl_context: ssl.SSLContext | None = None) -> TensorBlob:
    """Download a blob straight into tensors (`into`, or new ones), verified against its digest."""
    with _connection(base_url, ssl_context) as conn:
        conn.request("GET", f"/blobs/{digest}", headers=_auth(token))
        response = conn.getresponse()
        if response.status != 200:
            raise BlobError(f"GET {base_url}/blobs/{digest}: {response.status} {response.read().decode().strip()}")
        return read_blob(response, int(response.headers["Content-Length"]), expected=digest, into=into)


def upload_blob(base_url: str, blob: TensorBlob, token: str = "",
                ssl_context: ssl.SSLContext | None = None) -> str:
    """Upload a blob, hashing it as it goes; returns its digest once the server has confirmed the same one."""
    digest = hashlib.sha256()

    def body() -> Iterator[memoryview]:
        for chunk in blob.chunks():
            digest.update(chunk)
            yield chunk

    with _connection(base_url, ssl_context) as conn:
        conn.request("POST", "/blobs", body=body(),
                     headers={**_auth(token), "Content-Length": str(blob.size),
                              "Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        text = response.read().decode().strip()
    if response.status != 201:
        raise BlobError(f"POST {base_url}/blobs: {response.status} {text}")
    if text != digest.hexdigest():
        raise BlobError(f"upload corrupted on the way: sent sha256 {digest.hexdigest()}, server got {text}")
    blob._digest = text
    return text
