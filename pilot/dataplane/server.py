"""The weights server: a BlobStore over HTTP(S). GET /blobs/<sha256> (with Range), POST /blobs, PUT
/blobs/<sha256>, bearer-token auth; TLS from the run's blob-certfile/keyfile/cafile (`server_tls`, the one
place the weights server's TLS is built)."""

from __future__ import annotations

import hmac
import re
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from pilot.dataplane.blob import HTTP_TIMEOUT_S, BlobError, read_blob
from pilot.dataplane.store import BlobStore


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
