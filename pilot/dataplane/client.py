"""The sites' side of the data plane: fetch a blob straight into tensors (resuming a dropped connection
with an HTTP Range request) and upload one, hashing as the bytes go; `site_tls` trusts exactly the CA the
server named through the authenticated Flower channel."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from typing import BinaryIO
from urllib.parse import urlsplit

import torch

from pilot.dataplane.blob import (
    CHUNK,
    HTTP_TIMEOUT_S,
    MAX_RESUMES,
    RESUME_BACKOFF_S,
    BlobCorrupt,
    BlobError,
    SpooledBlob,
    TensorBlob,
    read_blob,
)


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
               ssl_context: ssl.SSLContext | None = None,
               spool: Callable[[], BinaryIO] | None = None) -> TensorBlob | SpooledBlob:
    """Download blob `digest` from a BlobServer at `base_url` straight into tensors (`into`, or new ones; or
    with `spool` into a file it gives, read back tensor by tensor: a SpooledBlob), verified against its digest.
    See fetch_url."""
    return fetch_url(f"{base_url.rstrip('/')}/blobs/{digest}", digest, token, into, ssl_context, spool)


def fetch_url(url: str, digest: str, token: str = "", into: Mapping[str, torch.Tensor] | None = None,
              ssl_context: ssl.SSLContext | None = None,
              spool: Callable[[], BinaryIO] | None = None) -> TensorBlob | SpooledBlob:
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
                    return read_blob(body, body.length, expected=digest, into=into,
                                     spool=None if spool is None else lambda metadata: spool())
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


def site_tls(ca_pem: str) -> ssl.SSLContext | None:
    """A site's TLS context for the weights server: trust exactly the CA the server named (its PEM came over
    the authenticated Flower channel); None for plain HTTP."""
    return ssl.create_default_context(cadata=ca_pem) if ca_pem else None
