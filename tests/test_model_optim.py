"""Muon and AdamW: the Newton-Schulz iteration, the updates, state save/restore, and the distributed variants
against the single-process ones under a real 2-process gloo group (torchrun)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nanochat.adamw import AdamW
from nanochat.muon import Muon, zeropower_via_newtonschulz5
from tests.conftest import PROJECT_ROOT, subprocess_env


@pytest.mark.parametrize("shape", [(32, 48), (48, 32), (40, 40), (3, 8, 16)])
def test_newton_schulz_orthogonalises(shape):
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(shape, generator=gen)
    X = zeropower_via_newtonschulz5(G)
    assert X.shape == G.shape and X.dtype == torch.float32
    sv = torch.linalg.svdvals(X)
    # the quintic trades exactness for speed: singular values land in ~[0.7, 1.2], not at 1
    assert sv.min() > 0.55 and sv.max() < 1.25, sv
    # and the direction is the polar factor U V^T of G
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    cos = (X * polar).sum(dim=(-2, -1)) / (X.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert torch.all(cos > 0.95), cos


def test_newton_schulz_refuses_vectors_and_is_scale_free():
    with pytest.raises(ValueError, match="needs a matrix"):
        zeropower_via_newtonschulz5(torch.ones(5))
    G = torch.randn(16, 24, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(zeropower_via_newtonschulz5(G), zeropower_via_newtonschulz5(1000 * G), atol=1e-5)


def test_muon_step_is_nesterov_momentum_then_orthogonalisation():
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(24, 8, generator=gen))   # tall: scaled by sqrt(24/8)
    start = p.detach().clone()
    opt = Muon([("w", p)], lr=0.1, momentum=0.9)
    g1 = torch.randn(24, 8, generator=gen)
    p.grad = g1.clone()
    opt.step()
    buf = 0.1 * g1                                              # lerp from zero by (1 - momentum)
    expected = start - 0.1 * 3 ** 0.5 * zeropower_via_newtonschulz5(g1.lerp(buf, 0.9))
    assert torch.allclose(p.detach(), expected, atol=1e-6)
    assert torch.equal(p.grad, g1)                               # the gradient is not modified in place
    assert torch.allclose(opt.state[p]["momentum_buffer"], buf)
    with pytest.raises(ValueError, match="2-D matrices; b has shape"):
        Muon([("b", torch.nn.Parameter(torch.zeros(3)))])


def test_adamw_matches_torch_adamw():
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(10, 6, generator=gen)
    ours_p, ref_p = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ours = AdamW([{"named": [("w", ours_p)], "lr": 0.01}], betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    ref = torch.optim.AdamW([ref_p], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(10, 6, generator=gen)
        ours_p.grad, ref_p.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(ours_p, ref_p, atol=1e-6)
    assert not torch.allclose(ours_p, init)


def _train(opt, params, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_state_save_restore_continues_exactly(kind):
    def make():
        gen = torch.Generator().manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(12, 20, generator=gen)) for _ in range(3)]
        named = [(f"p{i}", p) for i, p in enumerate(params)]
        opt = Muon(named, lr=0.05) if kind == "muon" else AdamW([{"named": named, "lr": 0.01}])
        return params, opt

    params, opt = make()
    _train(opt, params, 3, seed=10)
    state = opt.state_tensors()
    assert all(v.device.type == "cpu" for v in state.values())
    expected_keys = {"momentum_buffer"} if kind == "muon" else {"step", "exp_avg", "exp_avg_sq"}
    assert {k.rpartition(".")[2] for k in state} == expected_keys and len(state) == 3 * len(expected_keys)
    frozen = {k: v.clone() for k, v in state.items()}
    snapshot = [p.detach().clone() for p in params]
    _train(opt, params, 2, seed=11)                       # uninterrupted
    assert all(torch.equal(state[k], frozen[k]) for k in state)   # the saved state does not alias live buffers

    params2, opt2 = make()
    with torch.no_grad():
        for p, s in zip(params2, snapshot, strict=True):
            p.copy_(s)
    opt2.load_state_tensors(state)
    _train(opt2, params2, 2, seed=11)                     # restored
    for a, b in zip(params, params2, strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(state[k], frozen[k]) for k in state)   # nor does the loaded state


def test_state_load_rejects_foreign_state():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    muon = Muon([("w", p)])
    with pytest.raises(ValueError, match="matches no matrix"):
        muon.load_state_tensors({"other.momentum_buffer": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match=r"shape \(4, 5\), expected \(4, 4\)"):
        muon.load_state_tensors({"w.momentum_buffer": torch.zeros(4, 5)})
    adamw = AdamW([{"named": [("w", p)]}])
    with pytest.raises(ValueError, match=r"has keys \['exp_avg'\], expected"):
        adamw.load_state_tensors({"w.exp_avg": torch.zeros(4, 4)})


def test_distributed_optimizers_match_single_process_under_gloo(tmp_path):
    """Two real gloo processes: DistMuon/DistAdamW step on their own gradients; rank 0 replays Muon/AdamW on
    the average. Includes a padded Muon chunk (3 same-shape matrices over 2 ranks), a tall matrix, AdamW
    tensors whose sizes do not divide by 2, a gathered-state restore, and every rank holding the same weights."""
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(PROJECT_ROOT / "tests" / "dist_optim_worker.py"), str(out)],
        cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for kind in ("muon", "adamw"):
        r = report[kind]
        assert r["state_keys_equal"], kind
        assert r["state_diff"] < 1e-6, (kind, r)
        assert r["param_diff"] < 1e-6, (kind, r)
        assert r["resumed_vs_uninterrupted"] == 0.0, (kind, r)
        assert r["ranks_agree"], (kind, r)
        assert r["moved"] > 1e-3, (kind, r)                # the comparison is not between untouched tensors
