"""Round requests signed by the server: a site trainer obeys only the server it learned through Flower.

A request reaches a site trainer through Redis (the site's inbox), which several roles can reach; Flower's
channel to the site is authenticated, Redis is not the server. So the server signs every RoundRequest with an
Ed25519 key of its own, and the site trainer checks the signature against the server's public key, which it
learned from the authenticated Flower channel:

    server     key = ServerKey.load_or_create(run_dir)       # RUN_DIR/server-signing.key, 0600: a restarted
                                                             # server keeps it, and the sites keep trusting it
               record[SERVER_KEY] = key.public              # in every QUERY and TRAIN record (site_record)
               record["request"] = request.to_json()
               record[SIGNATURE_KEY] = sign_request(request, key)
    ClientApp  relays the request JSON as it came, with its signature, into the site's inbox (inbox_fields), and
               launches the trainer with the key in its environment (PUBLIC_KEY_ENV: process-local, no other
               Redis role can write it; pilot/site/process.py ensure_trainer)
    trainer    request = accept(message, on_refusal=log)     # None: refused (logged, with the reason)

What is signed: b"pilot-round-request-v1\\n" + the canonical JSON of the request's fields (sorted keys, no
spaces), recomputed from the JSON that arrives. So a request that a newer server extended with fields this
version does not know still verifies, and re-encoding on the way changes nothing.

A trainer started without a pinned key (by hand, by a test, or by a ClientApp of a server that signs nothing)
verifies nothing and says so once in its log; a ClientApp that meets a server key other than the one its
trainer was started with restarts that trainer (pilot/client_app.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pilot.protocol import RoundRequest

# ------------------------------------------------------------------ settings
KEY_FILE = "server-signing.key"          # in the run directory: PKCS#8 PEM, mode 0600
PUBLIC_KEY_ENV = "PILOT_SERVER_PUBLIC_KEY"  # the trainer's pinned key (base64 of the raw 32-byte Ed25519 key)
SERVER_KEY = "server-key"                # the site record's field (QUERY and TRAIN) holding the public key
SIGNATURE_KEY = "request-signature"      # the TRAIN record's field holding the request's signature
INBOX_SIGNATURE = "signature"            # the inbox entry's field holding it
DOMAIN = b"pilot-round-request-v1\n"     # what the signature is for: never valid as a signature of anything else


class RequestRefused(ValueError):
    """A round request whose signature does not check against the server's key (the message says why)."""


# ------------------------------------------------------------------ keys
def encode_public(key: Ed25519PublicKey) -> str:
    return base64.b64encode(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def decode_public(text: str) -> Ed25519PublicKey:
    """A public key from its base64 text (as it travels in Flower records and the environment)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as error:
        raise RequestRefused(f"the pinned server key is not a base64 Ed25519 public key ({error})") from error


def fingerprint(public: str) -> str:
    """A short name of a public key (its base64 text), for logs and the trainer hash."""
    return hashlib.sha256(public.strip().encode()).hexdigest()[:16] if public else ""


class ServerKey:
    """The server's signing key, kept in its run directory so that a restarted server signs with the same key."""

    def __init__(self, private: Ed25519PrivateKey):
        self.private = private
        self.public = encode_public(private.public_key())

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    @classmethod
    def generate(cls) -> ServerKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, run_dir: str | os.PathLike[str]) -> ServerKey:
        """RUN_DIR/server-signing.key, created (0600, never overwritten) if it does not exist yet."""
        path = Path(run_dir) / KEY_FILE
        if not path.exists():
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # private from the first byte
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)  # atomic and exclusive: two servers starting at once end with one key
                except FileExistsError:
                    pass
            finally:
                tmp.unlink(missing_ok=True)
        mode = path.stat().st_mode & 0o077
        if mode:
            raise PermissionError(f"{path} is readable by others (mode {oct(path.stat().st_mode & 0o777)}): "
                                  f"chmod 600 it, or delete it to make a new key (the sites' trainers then restart)")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds no Ed25519 private key")
        return cls(key)


# ------------------------------------------------------------------ sign and verify
def canonical(fields: Mapping[str, Any]) -> bytes:
    return DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                               allow_nan=False).encode()


def sign_request(request: RoundRequest, key: ServerKey | Ed25519PrivateKey) -> str:
    """The signature (base64) of a request's canonical JSON. Send it beside request.to_json()."""
    private = key.private if isinstance(key, ServerKey) else key
    return base64.b64encode(private.sign(canonical(json.loads(request.to_json())))).decode()


def verify_request(raw_json: str, signature: str, public_key: str | Ed25519PublicKey,
                   site: str | None = None) -> RoundRequest:
    """The request in `raw_json` if `signature` is the server's over it; else RequestRefused saying why.

    site: the site checking (refused if the request names another site in its `site` field)."""
    if not signature:
        raise RequestRefused("round request is not signed (no signature): refused")
    try:
        fields = json.loads(raw_json)
    except (TypeError, ValueError) as error:
        raise RequestRefused(f"round request is not JSON ({error}): refused") from error
    if not isinstance(fields, dict):
        raise RequestRefused("round request is not a JSON object: refused")
    try:
        sig = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestRefused(f"round request signature is not base64 ({error}): refused") from error
    public = decode_public(public_key) if isinstance(public_key, str) else public_key
    try:
        public.verify(sig, canonical(fields))
    except (InvalidSignature, ValueError) as error:
        raise RequestRefused(
            f"round request {fields.get('round')!r} (server {fields.get('server_id')!r}): signature does not "
            f"verify against the pinned server key {fingerprint(encode_public(public))} (signed by another key, "
            f"or a field was changed after signing): refused") from error
    try:
        request = RoundRequest.from_json(raw_json)
    except (TypeError, ValueError) as error:
        raise RequestRefused(f"signed round request does not fit RoundRequest ({error}): refused") from error
    if site is not None and request.site and request.site != site:
        raise RequestRefused(f"round request {request.round} is for site {request.site!r}, not {site!r}: refused")
    return request


# ------------------------------------------------------------------ the inbox (ClientApp -> trainer)
def inbox_fields(raw_request: str, signature: str, round_number: int) -> dict[str, str | int]:
    """The inbox entry that hands a round to the trainer: the request JSON exactly as the server sent it."""
    fields: dict[str, str | int] = {"kind": "train", "round": round_number, "request": raw_request}
    if signature:
        fields[INBOX_SIGNATURE] = signature
    return fields


def pinned_key() -> str:
    """The server key this process was started with ("" = none pinned)."""
    return os.environ.get(PUBLIC_KEY_ENV, "").strip()


_warned_unpinned = False


def accept(message: Mapping[str, Any], on_refusal: Callable[[str], object] = print,
           site: str | None = None, public_key: str | None = None) -> RoundRequest | None:
    """The trainer's side: the RoundRequest of an inbox entry if its signature checks against the pinned key,
    else None after `on_refusal(why)`. Deterministic, so every rank of a site decides alike.

    public_key: default the pinned one ($PILOT_SERVER_PUBLIC_KEY); with none pinned the request is taken
    unverified (a trainer started by hand or by a test) and `on_refusal` hears that once."""
    global _warned_unpinned
    key = pinned_key() if public_key is None else public_key
    raw = message.get("request")
    if not key:
        if not _warned_unpinned:
            _warned_unpinned = True
            on_refusal(f"no server key pinned (${PUBLIC_KEY_ENV}): round requests are NOT verified")
        try:
            return RoundRequest.from_json(str(raw))
        except (TypeError, ValueError) as error:
            on_refusal(f"round request refused: not a RoundRequest ({error})")
            return None
    try:
        return verify_request(str(raw) if raw is not None else "", str(message.get(INBOX_SIGNATURE) or ""), key,
                              site=site)
    except RequestRefused as error:
        on_refusal(f"round request refused (inbox entry {message.get('id', '?')}): {error}")
        return None
