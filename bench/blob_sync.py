"""Seconds to synchronise a d20-sized model (560,988,160 parameters) over the blob data plane on loopback.

One sync = the server publishes the global weights (one hash pass, no serialised copy), a site fetches
them over HTTP straight into its own tensors (verifying the hash as bytes arrive), and the site's update of
the same size travels back (hashed on the way, verified by the server). Printed against the floor measured side by side: the same bytes through a bare loopback TCP socket.
(Flower's own message path needed ~90 s fp32 / ~48 s bf16 for the round trip on this kind of machine:
../shared/FACTS.md.)

    .venv/bin/python bench/blob_sync.py [--layers 20] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

import torch

from pilot.blobs import BlobServer, BlobStore, TensorBlob, fetch_blob, upload_blob

VOCAB, WIDTH = 65536, 1280


def d20_like_state(layers: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors with the shapes of nanochat d20 (untied embedding and head, 4 attention + 2 MLP matrices)."""
    state = {"transformer.wte.weight": torch.empty(VOCAB, WIDTH, dtype=dtype)}
    for i in range(layers):
        for name in ("c_q", "c_k", "c_v", "c_proj"):
            state[f"transformer.h.{i}.attn.{name}.weight"] = torch.empty(WIDTH, WIDTH, dtype=dtype)
        state[f"transformer.h.{i}.mlp.c_fc.weight"] = torch.empty(4 * WIDTH, WIDTH, dtype=dtype)
        state[f"transformer.h.{i}.mlp.c_proj.weight"] = torch.empty(WIDTH, 4 * WIDTH, dtype=dtype)
    state["lm_head.weight"] = torch.empty(VOCAB, WIDTH, dtype=dtype)
    for t in state.values():
        t.uniform_(-0.02, 0.02)
    return state


def socket_floor(nbytes: int) -> float:
    """Seconds to push `nbytes` through a loopback TCP socket (sender and receiver in two threads)."""
    listener = socket.create_server(("127.0.0.1", 0))
    payload = memoryview(bytearray(4 << 20))

    def receive() -> None:
        conn, _ = listener.accept()
        buffer = bytearray(4 << 20)
        got = 0
        while got < nbytes:
            n = conn.recv_into(buffer)
            if not n:
                break
            got += n
        conn.close()

    thread = threading.Thread(target=receive)
    thread.start()
    start = time.perf_counter()
    with socket.create_connection(listener.getsockname()) as conn:
        sent = 0
        while sent < nbytes:
            chunk = payload[:min(len(payload), nbytes - sent)]
            conn.sendall(chunk)
            sent += len(chunk)
    thread.join()
    listener.close()
    return time.perf_counter() - start


def one_sync(state: dict[str, torch.Tensor], site_state: dict[str, torch.Tensor], store: BlobStore,
             server: BlobServer) -> dict[str, float]:
    """Server publishes, site fetches into its own tensors, site uploads an update of the same size."""
    t = {}
    start = time.perf_counter()
    digest = store.publish(state)
    t["publish (hash)"] = time.perf_counter() - start

    start = time.perf_counter()
    fetch_blob(server.url, digest, token="bench", into=site_state)
    t["fetch+verify"] = time.perf_counter() - start

    start = time.perf_counter()
    update_digest = upload_blob(server.url, TensorBlob(site_state, {"kind": "update"}), token="bench")
    t["upload+verify"] = time.perf_counter() - start
    store.recycle(update_digest)  # the aggregator is done with the update: its memory serves the next one
    t["total"] = sum(t.values())
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"{'dtype':>9} {'params':>12} {'GB':>6} {'publish':>8} {'fetch+verify':>12} {'upload+verify':>13} "
          f"{'sync total s':>12} {'socket floor x2 s':>17} {'ratio':>6}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        state = d20_like_state(args.layers, dtype)
        site_state = {k: torch.empty_like(v) for k, v in state.items()}
        params = sum(t.numel() for t in state.values())
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        with BlobServer(BlobStore(), token="bench") as server:
            first = one_sync(state, site_state, server.httpd.store, server)
            t = one_sync(state, site_state, server.httpd.store, server)  # steady state: memory is reused
        assert all(torch.equal(state[k], site_state[k]) for k in state)
        floor = 2 * socket_floor(nbytes)  # the bytes go out and come back
        print(f"{dtype_name:>9} {params:>12,} {nbytes / 1e9:>6.2f} {t['publish (hash)']:>8.2f} "
              f"{t['fetch+verify']:>12.2f} {t['upload+verify']:>13.2f} {t['total']:>12.2f} {floor:>17.2f} "
              f"{t['total'] / floor:>6.1f}   (first sync, fresh memory: {first['total']:.2f} s)")
        del state, site_state


if __name__ == "__main__":
    main()
