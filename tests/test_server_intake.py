"""A round's intake at the server (GlobalModel.take / aggregate) with the ServerApp's own store: pseudo-gradient
uploads arrive over HTTP into spooled files, are averaged in as their results arrive, and the new global model is
the token-weighted mean, whatever bytes the uploads share."""

from __future__ import annotations

import torch

from pilot import settings
from pilot.dataplane import payload
from pilot.dataplane.blob import SpooledBlob
from pilot.dataplane.client import upload_blob
from pilot.dataplane.server import BlobServer
from pilot.dataplane.store import BlobStore
from pilot.protocol import RoundResult
from pilot.server.training import GlobalModel


def global_model(redis_client, tmp_path, text_shards, tiny_tokenizer) -> GlobalModel:
    st = settings.load({"depth": 2, "max-seq-len": 64, "device-batch-size": 2, "total-batch-size": 128,
                        "data-dir": str(text_shards), "tokenizer-dir": str(tiny_tokenizer), "eval-tokens": 0})
    return GlobalModel(redis_client, "intake", tmp_path / "run", st.model, st.rounds, 1, lambda *a, **k: None)


def test_uploads_wait_on_disk_and_sites_with_the_same_bytes_are_both_averaged_in(redis_client, tmp_path, text_shards,
                                                                                    tiny_tokenizer):
    model = global_model(redis_client, tmp_path, text_shards, tiny_tokenizer)
    start = {k: v.clone() for k, v in model.state.weights.items()}
    store = BlobStore(spool_dir=tmp_path / "spool", spool_if=lambda meta: meta.get("payload") != "weights-fp32")
    g = torch.Generator().manual_seed(0)
    ends = {"a": {k: v - 0.01 * torch.randn(v.shape, generator=g) for k, v in start.items()},
            "c": {k: v - 0.01 * torch.randn(v.shape, generator=g) for k, v in start.items()}}
    ends["b"] = ends["a"]                               # b's update is a's, byte for byte: one digest, one blob
    tokens = {"a": 128, "b": 128, "c": 256}
    assignments = {site: model.ledger.assign(site, world_size=1) for site in tokens}
    with BlobServer(store, token="t") as server:
        digests = {site: upload_blob(server.url, payload.update_blob({k: v.clone() for k, v in start.items()},
                                                                      ends[site], "delta-bf16"), token="t")
                   for site in tokens}
    assert digests["a"] == digests["b"] and isinstance(store.get(digests["a"]), SpooledBlob)
    results = {site: RoundResult(round=1, site=site, status="ok", tokens=n, steps=n // 128,
                                 weights_digest=digests[site]) for site, n in tokens.items()}
    for site in ("a", "b", "c"):   # as they arrive
        model.take(1, site, results[site], assignments[site], store)
    assert model.aggregate(1, results, assignments, store, span=(0.0, 1.0)) == tokens   # none rejected
    sent = {site: {k: v.float() for k, v in payload.read_update(store.get(digests[site]))[1].items()}
            for site in ("a", "c")}
    for name, w in model.state.weights.items():      # plain averaging: G - mean(D~), weighted by tokens
        expected = start[name] - (0.5 * sent["a"][name] + 0.5 * sent["c"][name])
        torch.testing.assert_close(w, expected, rtol=0, atol=1e-6)
