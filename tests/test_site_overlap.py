"""Overlapped rounds at a real site trainer (round-mode "overlap"): the site keeps stepping while its update
travels and the server averages, folds the next global model in when it arrives, and counts the carried steps
in the next round's result, where the ledger accounts them once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch

from nanochat.gpt import build_model
from nanochat.tokenizer import Tokenizer
from nanochat.trainer import TrainConfig, plan_training
from pilot import coordination, protocol
from pilot.dataplane import payload
from pilot.dataplane.server import BlobServer
from pilot.dataplane.store import BlobStore
from pilot.energy.events import site_key
from pilot.protocol import RoundRequest, RoundResult
from pilot.server.publish import Publisher
from pilot.site.trainer import fold_global
from tests.conftest import subprocess_env
from tests.fault_harness import outbox_result

RUN, SITE = "overlap-test", "client_0"


def wait_result(r, round_number: int) -> RoundResult:
    return outbox_result(r, RUN, SITE, round_number)


def steps_of(r) -> list[dict]:
    return [{k: float(v) for k, v in f.items()} for _, f in r.xrange(protocol.metrics_key(RUN, SITE))]


@pytest.mark.parametrize("kind", ["delta-bf16", "delta-int4"])
def test_a_site_keeps_stepping_through_the_sync_and_folds_the_average_in(kind, tmp_path, text_shards, tiny_tokenizer):
    run_dir = tmp_path / "run"
    r = coordination.connect(run_dir=run_dir)
    url = coordination.EmbeddedRedis(run_dir).read_state().url
    cfg = TrainConfig(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=128, num_iterations=100000,
                      compile="off")
    plan = plan_training(cfg, Tokenizer.from_directory(tiny_tokenizer).get_vocab_size(), world_size=1)
    r.set(protocol.train_config_key(RUN),
          json.dumps({**asdict(cfg), "data_dir": str(text_shards), "tokenizer_dir": str(tiny_tokenizer)}))
    r.set(protocol.server_current_key(RUN), "srv")
    r.set(protocol.server_alive_key(RUN), "srv")
    r.hset(site_key(RUN, SITE), mapping={"curtailed": 1})
    store = BlobStore()
    # bf16 runs send the next global model as a delta to the view the site holds; int4 runs send it whole:
    # the fold's two paths
    publisher = Publisher(store, deltas=kind == "delta-bf16")
    global_1 = {k: v.clone() for k, v in build_model(plan.model_config, seed=0).state_dict().items()}
    shards = [p.name for p in sorted(text_shards.glob("shard_*.parquet"))[:2]]
    trainer = subprocess.Popen(
        [sys.executable, "-m", "pilot.site.trainer", "--site", SITE, "--run-id", RUN, "--run-dir", str(run_dir),
         "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=subprocess_env(PILOT_REDIS_URL=url, PILOT_SITE_THREADS="1"))
    try:
        with BlobServer(store, token="t") as server:
            def request(n: int, sent, cursors) -> None:
                req = RoundRequest(round=n, server_id="srv", weights_digest=sent.digest, blob_url=server.url,
                                   delta_digest=sent.delta_digest, delta_base=sent.delta_base,
                                   blob_token="t", shards=shards, cursors=cursors, schedule_step=0, max_steps=10**6,
                                   update_payload=kind, round_mode="overlap")
                r.xadd(protocol.inbox_key(RUN, SITE), {"kind": "train", "round": n, "request": req.to_json()},
                       maxlen=1)

            request(1, publisher.publish(global_1), None)
            while len(steps_of(r)) < 40:   # round 1 lasts longer than the sync below (a site carries one round's worth)
                assert trainer.poll() is None, trainer.stdout.read()
                time.sleep(0.05)
            stop_1 = time.time()
            r.set(protocol.stop_key(RUN, 1), "round duration reached")
            first = wait_result(r, 1)
            assert first.status == "ok" and first.steps > 0 and first.extra["carried_steps"] == 0
            # the server: the average of one site's pseudo-gradient, as the next global model (the sync takes a while)
            got, delta = payload.read_update(store.get(first.weights_digest))
            assert got == kind
            global_2 = payload.decode_update(delta, global_1, kind)
            time.sleep(0.5)
            request(2, publisher.publish(global_2), first.cursors)
            time.sleep(1.5)
            r.set(protocol.stop_key(RUN, 2), "round duration reached")
            second = wait_result(r, 2)
            r.xadd(protocol.inbox_key(RUN, SITE), {"kind": "shutdown"}, maxlen=1)
            output, _ = trainer.communicate(timeout=60)
        assert trainer.returncode == 0, output

        steps = steps_of(r)
        # it never stood still for the sync: across round 1's end, no gap longer than two steps
        around = [s for s in steps if stop_1 - 2 <= s["wall_ts"] <= stop_1 + 4]
        durations = sorted(s["seconds"] for s in steps)
        typical = durations[len(durations) // 2]
        gaps = [b["wall_ts"] - a["wall_ts"] for a, b in zip(around, around[1:], strict=False)]
        assert max(gaps) <= 2 * typical + 0.25, (max(gaps), typical)   # 0.25 s: the metrics' wall-clock stamps
        # the steps taken while the update travelled belong to round 2, and count there once
        assert second.status == "ok" and second.extra["carried_steps"] > 0, second
        # the next global model came as a bf16 delta to the view the site held (half the bytes), or whole
        model_bytes = sum(t.numel() * t.element_size() for t in global_1.values())
        if kind == "delta-bf16":
            assert second.extra["fetch"] == "delta" and second.extra["fetch_bytes"] < 0.55 * model_bytes, second.extra
        else:
            assert second.extra["fetch"] == "whole" and second.extra["fetch_bytes"] > model_bytes, second.extra
        assert len([s for s in steps if s["round"] == 1]) == first.steps
        assert len([s for s in steps if s["round"] == 2]) == second.steps
        assert second.tokens == second.steps * plan.total_batch_size
        assert [s["step"] for s in steps] == list(range(1, len(steps) + 1)), "each step once, in order"
        # its data moved on from where round 1 ended (carried rows are not read twice)
        assert (second.cursors[0]["row"], second.cursors[0]["offset"]) != (first.cursors[0]["row"],
                                                                            first.cursors[0]["offset"])
        # round 2's pseudo-gradient is measured from global 2: the site's weights are global 2 minus it, finite
        _, delta_2 = payload.read_update(store.get(second.weights_digest))
        end = payload.decode_update(delta_2, publisher.blob.tensors, kind)
        assert all(bool(torch.isfinite(t).all()) for t in end.values())
        assert not torch.equal(end["lm_head.weight"], global_2["lm_head.weight"])
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(timeout=30)
        coordination.EmbeddedRedis(run_dir).stop()   # a killed trainer releases nothing: no redis-server left behind


@pytest.mark.parametrize("kind", ["delta-bf16", "delta-int4"])
@pytest.mark.parametrize("comes", ["delta", "whole"])
def test_the_fold_puts_the_progress_since_the_boundary_on_the_new_global_model(kind, comes):
    """W <- W + (G - S) + D~: the weights end as the new global model plus what the site did since the boundary,
    plus what its payload left out of its pseudo-gradient (which the next pseudo-gradient then carries)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"h.weight": (96, 64), "h.bias": (300,), "emb": (2_100_000,)}   # one above a block (payload.BLOCK)
    view = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}                          # S
    boundary = {k: v - 0.01 * torch.randn(v.shape, generator=gen) for k, v in view.items()}       # W at the boundary
    sent_blob = payload.delta_blob(view, boundary, kind)                                           # D~ = enc(S - W_b)
    progress = {k: 0.003 * torch.randn(v.shape, generator=gen) for k, v in view.items()}          # carried steps
    live = {k: boundary[k] + progress[k] for k in view}
    masters = {k: v - 0.02 * torch.randn(v.shape, generator=gen) for k, v in view.items()}        # the server's G
    delta = payload.global_delta(view, masters)
    server_view = {k: v.clone() for k, v in view.items()}
    payload.apply_global_delta(server_view, delta)                                                 # S', as sent
    decoded = {k: d.float().clone() for k, d in payload.sent_deltas(sent_blob.tensors, kind)}
    assert any(not torch.equal(decoded[k], view[k] - boundary[k]) for k in view), "the payload rounds"

    site_view = {k: v.clone() for k, v in view.items()}
    if comes == "delta":
        payload.apply_global_delta(site_view, delta)     # as the fetcher does, before the fold
        new_view = fold_global(live, site_view, (kind, sent_blob.tensors), delta=delta)
    else:
        new_view = fold_global(live, site_view, (kind, sent_blob.tensors),
                               weights={k: v.clone() for k, v in server_view.items()})
    for k in view:
        assert torch.equal(new_view[k], server_view[k]), k            # the site holds the server's view exactly
        left_out = (view[k] - boundary[k]) - decoded[k]                 # D - D~
        expected = server_view[k] + progress[k] - left_out
        torch.testing.assert_close(live[k], expected, rtol=0, atol=2e-6)
        # the next pseudo-gradient S' - W carries what this one left out
        torch.testing.assert_close(new_view[k] - live[k], left_out - progress[k], rtol=0, atol=2e-6)
