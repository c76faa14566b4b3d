"""The nanochat GPT: family sizes (on the meta device), configuration errors, and the forward pass."""

from __future__ import annotations

import math

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig, build_model, config_from_depth, count_params, model_of

D20_PARAMS = 560_988_160      # nanochat's classic d20 (FACTS)
D32_PARAMS = 1_879_048_192


def tiny(**overrides) -> GPTConfig:
    return GPTConfig(**{**dict(sequence_len=32, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=64),
                        **overrides})


def test_d20_and_d32_parameter_counts_on_meta_device():
    d20 = config_from_depth(20)
    assert (d20.n_layer, d20.n_embd, d20.n_head, d20.vocab_size, d20.sequence_len) == (20, 1280, 10, 65536, 2048)
    assert count_params(d20) == D20_PARAMS
    d32 = config_from_depth(32)
    assert (d32.n_embd, d32.n_head) == (2048, 16)
    assert count_params(d32) == D32_PARAMS
    with torch.device("meta"):
        model = GPT(d20)
    assert all(p.device.type == "meta" for p in model.parameters())  # no memory was spent
    # the count splits as nanochat's: two 65,536 x 1,280 tables plus 20 blocks of 12 x 1280^2
    assert D20_PARAMS == 2 * 65536 * 1280 + 20 * 12 * 1280 ** 2


def test_gqa_shrinks_key_value_projections():
    full, gqa = config_from_depth(4, vocab_size=512), config_from_depth(4, vocab_size=512, n_kv_head=1)
    assert gqa.n_head == 2 and gqa.n_kv_head == 1
    width = 256
    assert count_params(full) - count_params(gqa) == 4 * 2 * width * (width - 128)  # c_k, c_v halve per layer


@pytest.mark.parametrize("depth, match", [
    (0, "unknown depth 0"), (-3, "unknown depth -3"), (65, "unknown depth 65"), ("20", "unknown depth '20'"),
    (3, r"width 64 x 3 = 192 is not a multiple of head_dim 128; depths that work: \[2, 4, 6"),
    (True, "unknown depth True"),
])
def test_unknown_depths_are_refused_with_the_reason(depth, match):
    with pytest.raises(ValueError, match=match):
        config_from_depth(depth)


def test_other_config_errors():
    assert config_from_depth(3, head_dim=64).n_head == 3       # depth 3 works with a head_dim that divides 192
    with pytest.raises(ValueError, match="n_kv_head 3 must divide the 10 query heads"):
        config_from_depth(20, n_kv_head=3)
    with pytest.raises(ValueError, match="head_dim 7 a positive even number"):
        config_from_depth(2, head_dim=7)
    with pytest.raises(ValueError, match="unknown GPTConfig keys"):
        GPTConfig.from_dict({**tiny().to_dict(), "n_layers": 3})


def test_initial_loss_is_ln_vocab_and_shapes():
    cfg = tiny()
    model = build_model(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (3, 16))
    y = torch.randint(0, cfg.vocab_size, (3, 16))
    logits = model(x)
    assert logits.shape == (3, 16, cfg.vocab_size) and logits.dtype == torch.float32
    # the head starts at zero, so every prediction is uniform
    assert model(x, y).item() == pytest.approx(math.log(cfg.vocab_size), abs=1e-6)
    per_token = model(x, y, loss_reduction="none")
    assert per_token.shape == (48,)


def test_ignore_index_and_mean_agree():
    cfg = tiny()
    model = build_model(cfg, seed=0)
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # a non-uniform model
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    y = torch.randint(0, cfg.vocab_size, (2, 8))
    y[0, :3] = -1
    per_token = model(x, y, loss_reduction="none")
    assert torch.all(per_token.view(2, 8)[0, :3] == 0)
    assert model(x, y).item() == pytest.approx(per_token.sum().item() / 13, rel=1e-5)


def test_attention_is_causal_and_logits_are_capped():
    cfg = tiny(n_kv_head=1)  # grouped-query path
    model = build_model(cfg, seed=1)
    with torch.no_grad():
        for block in model.transformer.h:  # non-zero projections so every path carries signal
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.3)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.3)
        torch.nn.init.normal_(model.lm_head.weight, std=20.0)
    x = torch.randint(0, cfg.vocab_size, (1, 12))
    x2 = x.clone()
    x2[0, 8:] = (x2[0, 8:] + 1) % cfg.vocab_size
    a, b = model(x), model(x2)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)      # the past does not see the future
    assert not torch.allclose(a[:, 8:], b[:, 8:])
    assert a.abs().max().item() <= cfg.logit_softcap + 1e-4
    assert a.abs().max().item() > 0.9 * cfg.logit_softcap     # a large head saturates the cap


def test_init_is_seeded_and_matches_nanochat_scales():
    cfg = tiny()
    m1, m2, m3 = build_model(cfg, seed=5), build_model(cfg, seed=5), build_model(cfg, seed=6)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not torch.equal(s1["transformer.wte.weight"], s3["transformer.wte.weight"])
    assert s1["lm_head.weight"].abs().max() == 0
    assert s1["transformer.h.0.attn.c_proj.weight"].abs().max() == 0
    assert s1["transformer.wte.weight"].std().item() == pytest.approx(1.0, rel=0.1)
    fc = s1["transformer.h.0.mlp.c_fc.weight"]   # fan_in 64, fan_out 256: std 1/sqrt(64)
    assert fc.std().item() == pytest.approx(1 / 8, rel=0.1)


def test_param_groups_cover_every_parameter_once():
    model = build_model(config_from_depth(2, vocab_size=100, sequence_len=16))
    groups = model.param_groups()
    names = [n for g in groups.values() for n, _ in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(groups["matrix"]) == 2 * 6 and all(p.ndim == 2 for _, p in groups["matrix"])


def test_too_long_sequence_is_refused():
    model = build_model(tiny(sequence_len=4))
    with pytest.raises(ValueError, match="longer than the rotary tables"):
        model(torch.zeros(1, 41, dtype=torch.long))


def test_generate_is_deterministic_for_a_seed():
    model = build_model(tiny(), seed=3)
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    a = list(model.generate([1, 2, 3], 6, seed=7))
    assert a == list(model.generate([1, 2, 3], 6, seed=7))
    assert len(a) == 6 and all(0 <= t < 97 for t in a)
    greedy = list(model.generate([1, 2, 3], 4, temperature=0))
    assert greedy == list(model.generate([1, 2, 3], 4, temperature=0, seed=99))


def test_a_model_of_given_weights_uses_them_without_a_copy():
    """The server evaluates its global model in place (no second copy of d20's 2.2 GB)."""
    cfg = tiny()
    reference = build_model(cfg, seed=3)
    with torch.no_grad():
        reference.lm_head.weight.normal_(0.0, 0.02)   # not the zero init: the logits depend on every weight
    weights = {k: v.clone() for k, v in reference.state_dict().items()}
    model = model_of(cfg, weights)
    assert all(model.state_dict()[k].data_ptr() == w.data_ptr() for k, w in weights.items())
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    with torch.no_grad():
        weights["lm_head.weight"].zero_()     # the same memory: the model sees the change
    assert model(x).abs().max().item() == 0.0
