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

    blob.py      the format: safetensors as a stream, content-addressed, atomic files (checkpoints too)
    store.py     the blobs a process serves, held in memory by digest
    server.py    the weights server (HTTP/TLS, bearer tokens) and its TLS context
    client.py    fetch (resuming) and upload from a site, and the site's TLS trust
    payload.py   what a site hands in (its weights, or its pseudo-gradient), and the global model as a bf16 delta
"""
