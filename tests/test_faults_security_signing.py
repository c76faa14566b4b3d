"""Scenario 10, round requests: a site trainer obeys only requests signed by the server it learned through the
authenticated Flower channel. Forged requests (another key, a changed field, no signature) are refused with a
reason; a genuine one, also from a restarted server with the same run directory, is accepted."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from dataclasses import replace

import pytest

from pilot import signing
from pilot.protocol import RoundRequest
from pilot.signing import RequestRefused, ServerKey, sign_request, verify_request


def request(**changes) -> RoundRequest:
    base = RoundRequest(round=3, server_id="a1b2c3", weights_digest="ab" * 32, blob_url="https://server:8470",
                        blob_token="client_0.3.deadbeef", shards=["shard_00001.parquet"], cursors=None,
                        schedule_step=120, max_steps=40, update_payload="delta-bf16", blob_ca="", site="client_0")
    return replace(base, **changes)


def test_a_genuine_request_verifies(tmp_path):
    key = ServerKey.load_or_create(tmp_path)
    sent = request()
    got = verify_request(sent.to_json(), sign_request(sent, key), key.public, site="client_0")
    assert got == sent


@pytest.mark.parametrize("forgery, why", [
    ("other key", "does not verify against the pinned server key"),
    ("changed blob_url", "does not verify"),
    ("changed shards", "does not verify"),
    ("no signature", "not signed"),
    ("garbage signature", "not base64"),
    ("another site's request", "is for site 'client_0', not 'client_1'"),
])
def test_a_forged_request_is_refused_saying_why(tmp_path, forgery, why):
    key, thief = ServerKey.load_or_create(tmp_path), ServerKey.generate()
    sent = request()
    raw, signature, site = sent.to_json(), sign_request(sent, key), "client_0"
    if forgery == "other key":
        signature = sign_request(sent, thief)
    elif forgery == "changed blob_url":
        raw = replace(sent, blob_url="http://attacker:80").to_json()
    elif forgery == "changed shards":
        fields = json.loads(raw)
        fields["shards"] = ["shard_00002.parquet"]
        raw = json.dumps(fields)
    elif forgery == "no signature":
        signature = ""
    elif forgery == "garbage signature":
        signature = "not*base64"
    elif forgery == "another site's request":
        site = "client_1"
    with pytest.raises(RequestRefused, match=why):
        verify_request(raw, signature, key.public, site=site)


def test_signatures_survive_reencoding_and_newer_fields(tmp_path):
    """What is signed is the request's fields, not its bytes: spacing and key order do not matter, and a field
    that a newer server added (unknown here) is still covered."""
    key = ServerKey.load_or_create(tmp_path)
    fields = {**json.loads(request().to_json()), "future_field": [1, 2]}
    signature = signing.sign_request(request(), key)   # without future_field: must not verify with it
    with pytest.raises(RequestRefused):
        verify_request(json.dumps(fields), signature, key.public)
    newer = __import__("base64").b64encode(key.private.sign(signing.canonical(fields))).decode()
    reordered = json.dumps(dict(reversed(list(fields.items()))), indent=2)
    assert verify_request(reordered, newer, key.public) == request()


def test_the_key_persists_across_server_instances_of_one_run_directory(tmp_path):
    """Two "servers" (separate processes) on one run directory sign with one key, kept 0600."""
    code = ("import sys; from pilot.signing import ServerKey, sign_request; from pilot.protocol import RoundRequest;"
            "k = ServerKey.load_or_create(sys.argv[1]); r = RoundRequest.from_json(sys.stdin.read());"
            "print(k.public); print(sign_request(r, k))")
    sent = request().to_json()
    runs = [subprocess.run([sys.executable, "-c", code, str(tmp_path)], input=sent, capture_output=True, text=True,
                           check=True).stdout.split() for _ in range(2)]
    assert runs[0][0] == runs[1][0], "a restarted server keeps its key"
    pinned = runs[0][0]   # what the first server's sites pinned
    for _, signature in runs:
        assert verify_request(sent, signature, pinned) == request()
    path = tmp_path / signing.KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ServerKey.load_or_create(tmp_path / "another-run").public != pinned
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="readable by others"):
        ServerKey.load_or_create(tmp_path)


def test_the_trainer_side_accepts_only_signed_entries_and_logs_refusals(tmp_path, monkeypatch):
    """`accept` is the trainer's one call on an inbox entry (pinned key from its environment)."""
    key = ServerKey.load_or_create(tmp_path)
    sent = request()
    entry = dict(signing.inbox_fields(sent.to_json(), sign_request(sent, key), sent.round), id="1-0")
    monkeypatch.setenv(signing.PUBLIC_KEY_ENV, key.public)
    log: list[str] = []
    assert signing.accept(entry, log.append, site="client_0") == sent and not log
    forged = dict(entry, request=replace(sent, blob_url="http://attacker").to_json())
    assert signing.accept(forged, log.append, site="client_0") is None
    unsigned = {k: v for k, v in entry.items() if k != signing.INBOX_SIGNATURE}
    assert signing.accept(unsigned, log.append) is None
    assert len(log) == 2 and "refused (inbox entry 1-0)" in log[0] and "does not verify" in log[0]
    assert "not signed" in log[1]
    assert signing.accept(entry, log.append, public_key=ServerKey.generate().public) is None   # another server's
    assert "does not verify against the pinned server key" in log[2]


def test_the_clientapp_pins_the_key_in_the_trainers_environment(tmp_path, monkeypatch, redis_server):
    """ensure_trainer hands the key it learned through Flower to the process it starts (its environment: no Redis
    role can write there) and records which key that trainer trusts."""
    import redis

    from pilot import protocol
    from pilot.site import process

    seen = tmp_path / "env.json"
    monkeypatch.setattr(process, "trainer_command", lambda *a: [
        sys.executable, "-c", f"import json, os; open({str(seen)!r}, 'w').write(json.dumps(dict(os.environ)))"])
    monkeypatch.delenv(signing.PUBLIC_KEY_ENV, raising=False)
    key = ServerKey.generate()
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    run = "signing-launch"
    assert process.ensure_trainer(r, "client_0", run, str(tmp_path), nproc=1, device="cpu",
                                  redis_url=redis_server.url, server_key=key.public) is not None
    for _ in range(200):
        if seen.exists() and seen.read_text():
            break
        __import__("time").sleep(0.05)
    env = json.loads(seen.read_text())
    assert env[signing.PUBLIC_KEY_ENV] == key.public
    assert process.trusts_key(r, run, "client_0", key.public)
    assert not process.trusts_key(r, run, "client_0", ServerKey.generate().public)
    r.delete(protocol.launch_key(run, "client_0"), protocol.trainer_key(run, "client_0"))


def test_the_clientapp_relays_the_request_as_signed_and_refuses_what_its_key_refuses(tmp_path):
    from pilot import client_app

    key = ServerKey.load_or_create(tmp_path)
    sent = request()
    raw = sent.to_json()
    record = {"run-id": "r", "request": raw, signing.SIGNATURE_KEY: sign_request(sent, key), signing.SERVER_KEY: key.public}
    got, entry, why = client_app.inbox_entry(record, "client_0")
    assert got == sent and not why and entry["request"] == raw
    assert verify_request(entry["request"], entry[signing.INBOX_SIGNATURE], key.public) == sent
    for bad in ({signing.SIGNATURE_KEY: sign_request(sent, ServerKey.generate())}, {signing.SIGNATURE_KEY: ""}):
        _, entry, why = client_app.inbox_entry({**record, **bad}, "client_0")
        assert entry is None and "refused" in why
    _, entry, why = client_app.inbox_entry(record, "client_1")
    assert entry is None and "not 'client_1'" in why
    # a server that signs nothing (no key in its records): relayed as before, for an unpinned trainer
    _, entry, _ = client_app.inbox_entry({"run-id": "r", "request": raw}, "client_0")
    assert entry == {"kind": "train", "round": 3, "request": raw}
