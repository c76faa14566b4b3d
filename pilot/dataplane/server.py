"""The weights server: a BlobStore over HTTP(S). GET /blobs/<sha256> (with Range), POST /blobs, PUT
/blobs/<sha256>, bearer-token auth; TLS from the run's blob-certfile/keyfile/cafile (`server_tls`, the one
place the weights server's TLS is built).

Least privilege (docs/deployment.md, "Least privilege"):

    tokens = RoundTokens()                                  # a secret of this server incarnation
    server = BlobServer(store, authorize=tokens.authorize,  # instead of one shared token
                        upload_limits=UploadLimits.for_weights(global_weights), allow_insecure=False)
    tokens.open_round(n, {global_digest})                   # what round n's tokens may GET
    token = tokens.issue(site, n)                           # HMAC(secret, "site|n|blob"): GET the round's blobs,
                                                            # POST/PUT as that site for round n, nothing else
    server.uploaded_by(digest) -> ("client_0", n)           # who handed a blob in, for which round
    tokens.close_round(n)                                   # its tokens stop working

An upload is checked before anything is allocated: its Content-Length against the largest payload the model
allows (413), its safetensors header against the model's tensor names, shapes and the payload dtypes (400).
A server on a non-loopback address without TLS is refused unless allowed (`check_exposure`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import socket
import ssl
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import torch

from pilot.dataplane import quantize
from pilot.dataplane.blob import _DTYPES, HTTP_TIMEOUT_S, BlobError, read_blob
from pilot.dataplane.store import BlobStore


# ------------------------------------------------------------------ who may do what
@dataclass(frozen=True)
class Grant:
    """What a bearer token allows: GET of `read` digests (None: any), POST/PUT if `write`, as `site` for `round`."""

    read: frozenset[str] | None = None
    write: bool = True
    site: str = ""
    round: int = -1

    def may_read(self, digest: str) -> bool:
        return self.read is None or digest in self.read


Authorize = Callable[[str], "Grant | None"]   # the Authorization header's bearer token ("" if none) -> Grant or None


def shared_token(token: str) -> Authorize:
    """One token for everything (no token: everyone may do everything): the weights server's first behaviour."""
    def authorize(given: str) -> Grant | None:
        if token and not hmac.compare_digest(given.encode(), token.encode()):
            return None
        return Grant()
    return authorize


class RoundTokens:
    """Blob tokens per (site, round): HMAC-SHA256 of this server's secret over "site|round|blob". Nothing is
    stored per token, so a token cannot leak from a table, and a restarted server (new secret) voids the old
    ones. A token lets its site GET the blobs of its round (open_round) and POST/PUT for that round as itself."""

    def __init__(self, secret: bytes | None = None):
        self._secret = secret or secrets.token_bytes(32)
        self._rounds: dict[int, frozenset[str]] = {}
        self._lock = threading.Lock()

    def _mac(self, site: str, round_number: int) -> str:
        return hmac.new(self._secret, f"{site}|{round_number}|blob".encode(), hashlib.sha256).hexdigest()

    def issue(self, site: str, round_number: int) -> str:
        if not site or "." in site or "|" in site:
            raise ValueError(f"site name {site!r} cannot name a blob token")
        return f"{site}.{int(round_number)}.{self._mac(site, round_number)}"

    def open_round(self, round_number: int, digests: Iterable[str]) -> None:
        """Round `round_number`'s tokens may GET `digests` (the round's global weights) from now on."""
        with self._lock:
            self._rounds[int(round_number)] = frozenset(digests)

    def close_round(self, round_number: int) -> None:
        with self._lock:
            self._rounds.pop(int(round_number), None)

    def authorize(self, token: str) -> Grant | None:
        site, _, rest = token.partition(".")
        number, _, mac = rest.partition(".")
        if not site or not number.isdigit() or not mac:
            return None
        if not hmac.compare_digest(mac.encode(), self._mac(site, int(number)).encode()):
            return None
        with self._lock:
            readable = self._rounds.get(int(number))
        if readable is None:
            return None   # a round that is not open (over, or of another server incarnation)
        return Grant(read=readable, write=True, site=site, round=int(number))


# ------------------------------------------------------------------ what an upload may be
MAX_HEADER = 1 << 20  # bytes of safetensors header an upload may have, at most (a d20 model's is a few KiB)
METADATA_ROOM = 4096  # bytes of header beyond the tensors' entries (the payload kind and such metadata)


class UploadRefused(BlobError):
    """An upload the limits do not allow: `status` (400 or 413) and the reason; `consumed` bytes were read."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.consumed = 0


@dataclass(frozen=True)
class UploadLimits:
    """The tensors an upload may hold: each known name once, with its shape, in one of its allowed dtypes
    (safetensors codes), and at most `max_bytes` in all."""

    tensors: Mapping[str, tuple[tuple[int, ...], frozenset[str]]]
    max_bytes: int
    max_header: int = MAX_HEADER

    @classmethod
    def for_weights(cls, weights: Mapping[str, torch.Tensor],
                    float_dtypes: Iterable[torch.dtype] = (torch.float32, torch.bfloat16)) -> UploadLimits:
        """Uploads shaped like `weights` (the global model): floating tensors in `float_dtypes` (the payload kinds:
        weights-fp32, delta-bf16), others in their own dtype."""
        floats = frozenset(_DTYPES[d] for d in float_dtypes)
        widest = max(torch.empty(0, dtype=d).element_size() for d in float_dtypes)
        tensors, data, header = {}, 0, METADATA_ROOM
        for name, tensor in weights.items():
            if tensor.is_floating_point():
                tensors[name] = (tuple(tensor.shape), floats)
                data += tensor.numel() * max(widest, tensor.element_size())
            else:
                tensors[name] = (tuple(tensor.shape), frozenset({_DTYPES[tensor.dtype]}))
                data += tensor.numel() * tensor.element_size()
            # its header entry: "name":{"dtype":"BF16","shape":[...],"data_offsets":[a,b]}, generously
            header += len(json.dumps(name)) + len(json.dumps(list(tensor.shape))) + 96
        header = min(header, MAX_HEADER)
        return cls(tensors, max_bytes=8 + header + data, max_header=header)

    @classmethod
    def for_quantized(cls, weights: Mapping[str, torch.Tensor], kind: str,
                      block: int = quantize.DEFAULT_BLOCK) -> UploadLimits:
        """Uploads in a quantized payload's layout (pilot/dataplane/quantize.py) for a model shaped like `weights`:
        per floating tensor its codes, block scales and shape, exactly as the codec writes them."""
        bits = quantize.bits_for_kind(kind)
        tensors, data, header = {}, 0, METADATA_ROOM
        for name, tensor in weights.items():
            if not tensor.is_floating_point():
                tensors[name] = (tuple(tensor.shape), frozenset({_DTYPES[tensor.dtype]}))
                data += tensor.numel() * tensor.element_size()
            else:
                n = tensor.numel()
                bs = quantize.block_for(n, bits, block)
                blocks = -(-n // bs)
                code = torch.int8 if bits == 8 else torch.uint8
                tensors[name] = ((blocks, bs * bits // 8), frozenset({_DTYPES[code]}))
                tensors[name + quantize.SCALE_SUFFIX] = ((blocks,), frozenset({_DTYPES[quantize.SCALE_DTYPE]}))
                tensors[name + quantize.SHAPE_SUFFIX] = ((tensor.dim(),), frozenset({_DTYPES[torch.int64]}))
                data += blocks * bs * bits // 8 + blocks * quantize.SCALE_DTYPE.itemsize + 8 * tensor.dim()
            header += 3 * (len(json.dumps(name)) + 96) + len(json.dumps(list(tensor.shape)))
        header = min(header, MAX_HEADER)
        return cls(tensors, max_bytes=8 + header + data, max_header=header)

    def check_length(self, length: int) -> None:
        if length > self.max_bytes:
            raise UploadRefused(413, f"upload of {length} bytes is larger than the largest update the model allows "
                                     f"({self.max_bytes} bytes)")

    def check_header(self, header: Mapping[str, object]) -> None:
        """A parsed safetensors header against the allowed tensors; UploadRefused(400) naming the first misfit."""
        names = [n for n in header if n != "__metadata__"]
        unknown = sorted(set(names) - set(self.tensors))
        if unknown:
            raise UploadRefused(400, f"upload holds tensors the model has not: {unknown[:3]}")
        missing = sorted(set(self.tensors) - set(names))
        if missing:
            raise UploadRefused(400, f"upload lacks tensors of the model: {missing[:3]}")
        offset = 0
        for name in names:
            spec = header[name]
            if not isinstance(spec, dict):
                raise UploadRefused(400, f"tensor {name!r}: malformed header entry")
            shape, dtypes = self.tensors[name]
            dtype, got_shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
            if not isinstance(got_shape, list) or tuple(got_shape) != shape:
                raise UploadRefused(400, f"tensor {name!r} has shape {got_shape}, the model's is {list(shape)}")
            if dtype not in dtypes:
                raise UploadRefused(400, f"tensor {name!r} is {dtype}, allowed: {sorted(dtypes)}")
            size = torch.empty(0, dtype=_TORCH_OF[dtype]).element_size()
            for dim in shape:
                size *= dim
            if not (isinstance(offsets, list) and len(offsets) == 2 and offsets == [offset, offset + size]):
                raise UploadRefused(400, f"tensor {name!r}: data offsets {offsets} do not hold {dtype}{list(shape)} "
                                         f"at byte {offset}")
            offset += size


_TORCH_OF = {code: dtype for dtype, code in _DTYPES.items()}


class AnyUploadLimits:
    """Several allowed layouts (the model's fp32/bf16, a quantized payload's): an upload must fit one of them."""

    def __init__(self, *choices: UploadLimits):
        self.choices = choices
        self.max_bytes = max(c.max_bytes for c in choices)
        self.max_header = max(c.max_header for c in choices)

    def check_length(self, length: int) -> None:
        if length > self.max_bytes:
            raise UploadRefused(413, f"upload of {length} bytes is larger than the largest update the model allows "
                                     f"({self.max_bytes} bytes)")

    def check_header(self, header: Mapping[str, object]) -> None:
        errors = []
        for choice in self.choices:
            try:
                return choice.check_header(header)
            except UploadRefused as error:
                errors.append(error)
        raise errors[0]


class _Replay:
    """A stream that gives `head` first, then the rest of `rest` (the header already read for checking)."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self.head, self.rest = memoryview(head), rest

    def readinto(self, view: memoryview) -> int:
        if self.head:
            n = min(len(view), len(self.head))
            view[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        return self.rest.readinto(view)


def checked_stream(stream: BinaryIO, length: int, limits: UploadLimits) -> BinaryIO:
    """Read and check an upload's safetensors header against `limits` before any tensor is allocated; the
    returned stream gives the whole upload again (header included: the digest covers it)."""
    limits.check_length(length)
    if length < 8:
        raise UploadRefused(400, f"a safetensors stream has at least 8 bytes, got {length}")
    head = _read_exactly(stream, 8)
    raw = b""
    try:
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(length - 8, limits.max_header):
            raise UploadRefused(413 if header_len > limits.max_header else 400,
                                f"safetensors header of {header_len} bytes (at most {limits.max_header}, "
                                f"and within the {length}-byte upload)")
        raw = _read_exactly(stream, header_len)
        try:
            header = json.loads(raw)
        except ValueError as error:
            raise UploadRefused(400, f"safetensors header is not JSON: {error}") from error
        if not isinstance(header, dict):
            raise UploadRefused(400, "safetensors header is not a JSON object")
        limits.check_header(header)
    except UploadRefused as error:
        error.consumed = len(head) + len(raw)
        raise
    return _Replay(head + raw, stream)  # type: ignore[return-value]


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise UploadRefused(400, f"upload ended inside its safetensors header ({len(data)} of {n} bytes)")
        data += chunk
    return bytes(data)


# ------------------------------------------------------------------ where it listens
class InsecureBinding(ValueError):
    """Plain HTTP on an address other hosts can reach."""


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) reaches only this machine; "" and 0.0.0.0 (every interface) do not."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if not host:
        return False
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_exposure(host: str, tls: bool, allow_insecure: bool = False) -> None:
    """Refuse a plain-HTTP weights server on a non-loopback address unless explicitly allowed: the weights and
    the tokens would cross the network readable and forgeable by anyone on the path."""
    if tls or allow_insecure or is_loopback(host):
        return
    raise InsecureBinding(
        f"the weights server would listen on {host or 'every interface'!r} with plain HTTP: weights and blob tokens "
        f"would cross the network in clear. Give it a certificate (run settings blob-certfile, blob-keyfile, "
        f"blob-cafile; `pilot certs` makes blob.crt/blob.key/ca.crt), bind it to 127.0.0.1 (blob-host), or allow "
        f"this explicitly with blob-allow-insecure=true (a private network you trust)")


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

    def _grant(self) -> Grant | None:
        """The caller's grant, or None after answering 401 (no token, or not one this server issued)."""
        given = self.headers.get("Authorization", "")
        token = given[len("Bearer "):] if given.startswith("Bearer ") else ""
        grant = self.server.authorize(token)
        if grant is None:
            self._reply(401, "missing or wrong bearer token")
        return grant

    def _may_write(self) -> Grant | None:
        grant = self._grant()
        if grant is not None and not grant.write:
            self.close_connection = True
            self._reply(403, "this token may not upload")
            return None
        return grant

    def _discard(self, n: int) -> None:
        scratch = bytearray(min(n, 1 << 16))
        with contextlib.suppress(OSError):
            while n > 0:
                got = self.rfile.readinto(memoryview(scratch)[:min(n, len(scratch))])
                if not got:
                    return
                n -= got

    def _receive(self, grant: Grant, length: str | None, expected: str | None) -> None:
        """Read an upload (checked against the upload limits before anything is allocated), store it, answer."""
        try:
            size = int(length or "")
            if size < 0:
                raise ValueError(length)
        except ValueError:
            self.close_connection = True
            return self._reply(400, f"bad Content-Length {length!r}")
        try:
            stream = self.rfile
            if self.server.upload_limits is not None:
                stream = checked_stream(self.rfile, size, self.server.upload_limits)
            blob = read_blob(stream, size, expected=expected, allocate=self.server.store.allocate,
                             spool=self.server.store.spool)
        except UploadRefused as error:
            self.close_connection = True
            if error.status == 400:   # a body of a size the model allows: read it away, so the client hears why
                self._discard(size - error.consumed)
            return self._reply(error.status, str(error))
        except BlobError as error:
            self.close_connection = True
            return self._reply(422, str(error))
        self.server.store.add(blob)
        if grant.site:
            with self.server.lock:
                self.server.uploads[blob.digest] = (grant.site, grant.round)
        self._reply(201, blob.digest)

    def _reply(self, status: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        grant = self._grant()
        if grant is None:
            return
        digest = self._digest()
        if digest is None:
            return self._reply(404, "expected /blobs/<sha256>")
        if not grant.may_read(digest):
            return self._reply(403, f"this token may not read blob {digest}")
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
        grant = self._may_write()
        if grant is None:
            return
        length = self.headers.get("Content-Length")
        if self.path != "/blobs" or length is None:
            self.close_connection = True
            return self._reply(400, "expected POST /blobs with a Content-Length")
        self._receive(grant, length, expected=None)

    def do_PUT(self) -> None:  # noqa: N802 - stdlib name
        """PUT /blobs/<sha256>: the address names the content, so what arrives must hash to it."""
        grant = self._may_write()
        if grant is None:
            return
        digest, length = self._digest(), self.headers.get("Content-Length")
        if digest is None or length is None:
            self.close_connection = True
            return self._reply(400, "expected PUT /blobs/<sha256> with a Content-Length")
        self._receive(grant, length, expected=digest)


class _BlobHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    store: BlobStore
    authorize: Authorize
    upload_limits: UploadLimits | None = None
    uploads: dict[str, tuple[str, int]]
    lock: threading.Lock
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
    `authorize`: bearer token -> Grant (RoundTokens.authorize); default: one shared `token` for everything.
    `upload_limits`: what an upload may hold (UploadLimits.for_weights); default: anything.
    `allow_insecure`: listen with plain HTTP on a non-loopback `host` (else InsecureBinding).
    """

    def __init__(self, store: BlobStore, host: str = "127.0.0.1", port: int = 0, token: str = "",
                 ssl_context: ssl.SSLContext | None = None, *, authorize: Authorize | None = None,
                 upload_limits: UploadLimits | None = None, allow_insecure: bool = False):
        check_exposure(host, tls=ssl_context is not None, allow_insecure=allow_insecure)
        self.httpd = _BlobHTTPServer((host, port), _Handler)
        self.httpd.store = store
        self.httpd.authorize = authorize or shared_token(token)
        self.httpd.upload_limits = upload_limits
        self.httpd.uploads = {}
        self.httpd.lock = threading.Lock()
        self.httpd.ssl_context = ssl_context
        self.scheme = "https" if ssl_context else "http"
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def limit_uploads(self, limits: UploadLimits | None) -> None:
        """What uploads may hold from now on (None: anything)."""
        self.httpd.upload_limits = limits

    def uploaded_by(self, digest: str) -> tuple[str, int] | None:
        """(site, round) of the token that uploaded `digest`; None if no per-site token did."""
        with self.httpd.lock:
            return self.httpd.uploads.get(digest)

    def forget_uploads(self) -> None:
        with self.httpd.lock:
            self.httpd.uploads.clear()

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


def server_tls(certfile: str, keyfile: str, cafile: str) -> tuple[str, ssl.SSLContext | None]:
    """The weights server's TLS context and the CA PEM the sites must trust (both empty without a certificate:
    plain HTTP). The one place the weights server's TLS is built."""
    if not certfile:
        return "", None
    missing = [name for name, value in (("blob-keyfile", keyfile), ("blob-cafile", cafile)) if not value]
    if missing:
        raise ValueError(f"blob-certfile is set but {', '.join(missing)} is not: the weights server needs its key "
                         f"and the sites need the CA")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return Path(cafile).read_text(), context
