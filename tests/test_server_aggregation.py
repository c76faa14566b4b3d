"""Aggregation: token-weighted pseudo-gradients, rejected updates, the outer optimizer against torch's SGD."""

from __future__ import annotations

import pytest
import torch

from pilot.server.aggregation import (
    OuterOptimizer,
    RejectedUpdate,
    average_updates,
    check_update,
    token_weights,
)


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}


def test_plain_averaging_is_the_token_weighted_mean_of_the_local_models():
    G = weights(0)
    local = {"client_0": weights(1), "client_1": weights(2), "client_2": weights(3)}
    tokens = {"client_0": 3000, "client_1": 1000, "client_2": 0}  # client_2 trained nothing
    deltas = {s: {k: G[k] - L[k] for k in G} for s, L in local.items()}
    mean = average_updates(deltas, tokens, G)
    new = OuterOptimizer("none").step(G, mean)
    # the step allocates no model copy: the new weights are written into the mean's own tensors
    assert all(new[k].data_ptr() == mean[k].data_ptr() for k in G)
    for k in G:
        expected = 0.75 * local["client_0"][k] + 0.25 * local["client_1"][k]
        assert torch.allclose(new[k], expected, atol=1e-6)
    assert new["a"] is not G["a"] and torch.equal(G["a"], weights(0)["a"])  # old global untouched


def test_bf16_updates_are_widened():
    G = weights(0)
    delta = {k: (v * 0.5).to(torch.bfloat16) for k, v in G.items()}
    mean = average_updates({"s": delta}, {"s": 10}, G)
    assert mean["a"].dtype == torch.float32
    assert torch.equal(mean["a"], delta["a"].float())


def test_token_weights():
    assert token_weights({"a": 1, "b": 3}) == {"a": 0.25, "b": 0.75}
    assert token_weights({"a": 0, "b": 0}) == {}
    with pytest.raises(ValueError, match="no update"):
        average_updates({"a": weights(1)}, {"a": 0}, weights(0))


def test_nesterov_matches_torch_sgd_on_pseudo_gradients():
    G = weights(0)
    outer = OuterOptimizer("nesterov", lr=0.7, momentum=0.9)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in G.items()}
    sgd = torch.optim.SGD(params.values(), lr=0.7, momentum=0.9, nesterov=True)
    current = G
    for seed in range(1, 5):
        delta = {k: v * 0.1 for k, v in weights(seed).items()}
        current = outer.step(current, average_updates({"s": delta}, {"s": 1}, current))
        for k, p in params.items():
            p.grad = delta[k].clone()
        sgd.step()
        for k in G:
            assert torch.allclose(current[k], params[k].detach(), atol=1e-6), (seed, k)
    assert set(outer.state) == set(G)


@pytest.mark.parametrize("bad, reason", [
    ({"a": torch.full((4, 3), float("nan")), "b": torch.zeros(5)}, "NaN"),
    ({"a": torch.zeros(4, 3), "b": torch.tensor([0, 0, float("inf"), 0, 0])}, "NaN or Inf"),
    ({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, "shape"),
    ({"a": torch.zeros(4, 3)}, "missing"),
    ({"a": torch.zeros(4, 3), "b": torch.zeros(5), "c": torch.zeros(1)}, "unknown"),
    ({"a": torch.zeros(4, 3, dtype=torch.int64), "b": torch.zeros(5)}, "floating"),
])
def test_bad_updates_are_rejected(bad, reason):
    with pytest.raises(RejectedUpdate, match=reason):
        check_update(bad, weights(0), tokens=100)


def test_outer_optimizer_settings_are_checked():
    with pytest.raises(ValueError, match="adam"):
        OuterOptimizer("adam")
    with pytest.raises(ValueError, match="momentum"):
        OuterOptimizer("nesterov", momentum=1.0)


def test_a_short_round_moves_the_model_proportionally_less_than_a_full_one():
    """Rounds end at membership changes: a round of 1% of the nominal length moves along the momentum 1% as far."""
    G = {"w": torch.zeros(4)}
    momentum = {"w": torch.ones(4)}
    moved = {}
    for fraction in (1.0, 0.01):
        outer = OuterOptimizer("nesterov", lr=0.7, momentum=0.9, state={"w": momentum["w"].clone()})
        new = outer.step(G, {"w": torch.zeros(4)}, fraction=fraction)   # no new work: only the momentum moves it
        moved[fraction] = float((G["w"] - new["w"]).abs().max())
    assert moved[1.0] == pytest.approx(0.7 * 0.9 * 0.9)        # DiLoCo's full-round step, unchanged
    assert moved[0.01] == pytest.approx(moved[1.0] * 0.01 * 0.9 ** (0.01 - 1))
    assert moved[0.01] < 0.02 * moved[1.0]
    # a solo phase of 3 nominal rounds decays the momentum as 3 rounds would before the next federated step
    outer = OuterOptimizer("nesterov", lr=0.7, momentum=0.9, state={"w": torch.ones(4)})
    outer.step(G, {"w": torch.zeros(4)}, fraction=1.0, idle=3.0)
    assert float(outer.state["w"][0]) == pytest.approx(0.9 ** 4)


def test_a_rounds_fraction_is_its_time_or_with_round_steps_its_steps():
    from pilot.server.aggregation import round_fraction

    assert round_fraction(300.0, 600.0) == 0.5
    assert round_fraction(900.0, 600.0) == 1.0                      # capped: a late stop is no bigger step
    assert round_fraction(0.0, 600.0) == 1.0                        # no clock span known: a full round
    # round-steps H: a round of H steps is full however long it took; a cut one is its steps' share
    assert round_fraction(5.0, 1e9, mean_steps=25, round_steps=25) == 1.0
    assert round_fraction(5.0, 1e9, mean_steps=10, round_steps=25) == 0.4
    assert round_fraction(5.0, 1e9, mean_steps=0, round_steps=25) == 1 / 25   # never a zero step


def test_the_running_mean_is_the_token_weighted_mean_in_one_copy():
    from pilot.server.aggregation import RunningMean

    G = weights(0)
    deltas = {"a": weights(1), "b": {k: v.to(torch.bfloat16) for k, v in weights(2).items()}, "c": weights(3)}
    tokens = {"a": 100, "b": 300, "c": 0}
    running = RunningMean(G)
    for site in ("b", "c", "a"):   # in whatever order they arrive
        running.add(site, deltas[site], tokens[site])
    assert running.sites == ["b", "a"] and running.tokens == 400   # no tokens, no weight
    expected = average_updates(deltas, tokens, G)
    got = running.mean()
    for name in G:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], expected[name])
        torch.testing.assert_close(got[name], 0.25 * deltas["a"][name] + 0.75 * deltas["b"][name].float())
    with pytest.raises(ValueError, match="nothing to average"):
        RunningMean(G).mean()
