"""Quantized pseudo-gradients (pilot/dataplane/quantize.py): block-wise absmax codes of 8, 4 and 2 bits round-trip
within half a grid step, a payload is a flat safetensors-ready dict, and error feedback loses nothing over rounds
(what was sent = the true deltas - the final residual)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from pilot.dataplane import quantize as qz
from pilot.dataplane.quantize import (
    SCALE_SUFFIX,
    SHAPE_SUFFIX,
    ErrorFeedback,
    add_decoded,
    decode_delta,
    decode_weights,
    dequantize,
    encode_delta,
    encoded_bytes,
    payload_bytes,
    quantize,
)

BITS = [8, 4, 2]


def delta_state(seed: int = 0, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    """A small model-like delta: matrices with outlier rows, odd sizes, a scalar, an empty tensor, a counter."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 40, generator=gen) * scale
    w[3] *= 30                                           # an outlier row: blocks need their own scales
    return {
        "wte": torch.randn(37, 24, generator=gen) * scale,   # 888 elements: not a multiple of the block
        "h.0.attn": w,
        "h.0.vec": torch.randn(5, generator=gen) * scale,    # smaller than one block
        "h.0.bf16": (torch.randn(300, generator=gen) * scale).to(torch.bfloat16),
        "scalar": torch.tensor(0.25 * scale),
        "empty": torch.zeros(0, 3),
        "zeros": torch.zeros(260),
        "steps": torch.tensor([7, 8], dtype=torch.int64),   # not floating point: travels as it is
    }


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block", [8, 64, 256])
def test_round_trip_within_half_a_step_per_block(bits, block):
    for name, x in delta_state().items():
        if not x.is_floating_point():
            continue
        codes, scales = quantize(x, bits, block)
        assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8) and scales.dtype == torch.bfloat16
        y = dequantize(codes, scales, x.shape, bits)
        assert y.dtype == torch.float32 and y.shape == x.shape
        bs = qz.block_for(x.numel(), bits, block)
        err = (x.float() - y).reshape(-1)
        pad = codes.shape[0] * bs - x.numel()
        err = torch.cat([err, err.new_zeros(pad)]).view(-1, bs)
        bound = scales.float().unsqueeze(1) / 2
        assert bool((err.abs() <= bound * (1 + 1e-6) + 1e-12).all()), name
        # the grid is as fine as the block allows: the scale is absmax / qmax rounded up to bf16 (< 2^-8 above)
        absmax = torch.cat([x.float().reshape(-1), x.new_zeros(pad).float()]).view(-1, bs).abs().amax(1)
        assert bool((scales.float() >= absmax / qz.qmax(bits)).all())
        assert bool((scales.float() <= absmax / qz.qmax(bits) * (1 + 2 ** -7) + 1e-30).all())
    zeros = torch.zeros(260)
    assert torch.equal(dequantize(*quantize(zeros, bits, block), zeros.shape, bits), zeros)   # zero is exact


def test_large_tensor_is_worked_in_chunks_with_the_same_result(monkeypatch):
    x = torch.randn(10_000) * 1e-2
    want = [t.clone() for t in quantize(x, 4, 64)]
    monkeypatch.setattr(qz, "CHUNK", 3 * 64)             # several chunks, the last one partial
    got = quantize(x, 4, 64)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    torch.testing.assert_close(dequantize(*got, x.shape, 4), dequantize(*want, x.shape, 4), rtol=0, atol=0)


def test_non_finite_deltas_are_refused():
    x = torch.zeros(100)
    x[57] = float("nan")
    with pytest.raises(ValueError, match="holds inf or nan"):
        quantize(x, 8, 32, name="w")


@pytest.mark.parametrize("bits", BITS)
def test_payload_is_flat_safetensors_and_decodes_shapes_dtypes_and_passthrough(bits):
    state = delta_state()
    payload = encode_delta(state, bits=bits, block=64)
    blob = load(save(payload))                             # what travels, exactly
    assert set(blob) == set(payload)
    assert torch.equal(blob["steps"], state["steps"]) and "steps" + SCALE_SUFFIX not in blob
    for name in ("wte", "h.0.attn", "scalar", "empty"):
        assert blob[name + SHAPE_SUFFIX].tolist() == list(state[name].shape)
    decoded = decode_delta(blob, bits)
    assert set(decoded) == set(state)
    for name, x in state.items():
        assert decoded[name].shape == x.shape, name
        assert decoded[name].dtype == (torch.float32 if x.is_floating_point() else x.dtype), name
    assert torch.equal(decoded["steps"], state["steps"])
    # weights from the round's start, in place, and accumulation for averaging
    start = {n: torch.randn(t.shape) if t.is_floating_point() else t.clone() for n, t in state.items()}
    want = {n: start[n] - decoded[n] if t.is_floating_point() else t for n, t in state.items()}
    same = {n: t.clone() for n, t in start.items()}
    got = decode_weights(blob, same, bits, out=same)
    for name in state:
        assert got[name] is same[name]
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7)
    acc = {n: torch.ones(t.shape) for n, t in state.items() if t.is_floating_point()}
    add_decoded(blob, acc, bits, alpha=0.5)
    for name, a in acc.items():
        torch.testing.assert_close(a, 1 + 0.5 * decoded[name], rtol=0, atol=1e-7)


def test_start_minus_end_is_quantized_without_a_delta_copy():
    gen = torch.Generator().manual_seed(3)
    start = {"w": torch.randn(70, 30, generator=gen)}
    end = {"w": start["w"] - torch.randn(70, 30, generator=gen) * 1e-3}
    a = encode_delta(start, end, bits=4, block=64)
    b = encode_delta({"w": start["w"] - end["w"]}, bits=4, block=64)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("residual_dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_error_feedback_sent_equals_true_deltas_minus_final_residual(bits, residual_dtype, tol):
    """Over 6 rounds: sum(decoded sent) == sum(true deltas) - final residual. fp32 residual: to fp32 rounding;
    bf16 residual: to its storage rounding, at most 2^-9 of half a grid step per round."""
    ef = ErrorFeedback(qz.kind_for_bits(bits), block=64, residual_dtype=residual_dtype)
    sent = {n: torch.zeros(t.shape) for n, t in delta_state().items() if t.is_floating_point()}
    true = {n: torch.zeros(t.shape) for n in sent for t in [delta_state()[n]]}
    for rnd in range(6):
        delta = delta_state(seed=rnd)
        payload = ef.encode(delta)
        add_decoded(payload, sent, bits)
        for n in true:
            true[n] += delta[n].float()
    assert set(ef.residual) == set(sent) and all(r.dtype == residual_dtype for r in ef.residual.values())
    size = max(float(t.abs().max()) for t in true.values() if t.numel())
    for n in sent:
        torch.testing.assert_close(sent[n], true[n] - ef.residual[n].float(), rtol=0, atol=tol * size)
    # the residual is what was left out, bounded by half a grid step: with feedback the error does not grow
    without = {n: torch.zeros(t.shape) for n, t in sent.items()}
    for rnd in range(6):
        add_decoded(encode_delta(delta_state(seed=rnd), bits=bits, block=64), without, bits)
    err_ef = sum(float((sent[n] - true[n]).norm() ** 2) for n in sent) ** 0.5
    err_plain = sum(float((without[n] - true[n]).norm() ** 2) for n in sent) ** 0.5
    assert err_ef < err_plain


def test_error_feedback_folded_into_the_start_buffer_is_the_same():
    """The zero-extra-memory variant: residual_out=start writes the new residual over the round-start buffer."""
    ef = ErrorFeedback("delta-int4", block=64, residual_dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    weights = torch.randn(40, 33, generator=gen)
    folded = torch.zeros(40, 33)                         # holds the residual between rounds
    for _ in range(4):
        live = weights - torch.randn(40, 33, generator=gen) * 1e-3    # the site trained
        start_buffer = weights + folded                  # round-start weights + residual (in place at a site)
        a = encode_delta({"w": start_buffer}, {"w": live}, bits=4, block=64, residual_out={"w": start_buffer})
        b = ef.encode({"w": weights}, {"w": live})
        assert all(torch.equal(a[k], b[k]) for k in a)
        torch.testing.assert_close(start_buffer, ef.residual["w"], rtol=0, atol=1e-7)
        folded = start_buffer
        weights = live


def test_error_feedback_state_and_mismatches():
    ef = ErrorFeedback("delta-int8", block=32)
    ef.encode({"a": torch.randn(10) * 1e-3})
    other = ErrorFeedback("delta-int8", block=32)
    other.load_state_dict(ef.state_dict())
    assert torch.equal(other.residual["a"], ef.residual["a"])
    with pytest.raises(ValueError, match="names differ"):
        ef.encode({"b": torch.randn(10)})
    with pytest.raises(ValueError, match="unknown quantized payload"):
        ErrorFeedback("delta-int3")
    with pytest.raises(ValueError, match="multiple of 2"):
        ErrorFeedback("delta-int4", block=7)


@pytest.mark.parametrize("bits, block, low, high", [(8, 256, 1.95, 2.0), (4, 256, 3.9, 4.0), (4, 1024, 3.97, 4.0),
                                                    (2, 256, 7.7, 8.0)])
def test_bytes_against_bf16_scales_included(bits, block, low, high):
    shapes = {"wte": (8192, 256), "h.0.c_q": (256, 256), "h.0.c_fc": (1024, 256), "odd": (1000, 3)}
    state = {n: torch.randn(s) * 1e-3 for n, s in shapes.items()}
    payload = encode_delta(state, bits=bits, block=block)
    bf16 = sum(t.numel() * 2 for t in state.values())
    assert payload_bytes(payload) == encoded_bytes(shapes, bits, block)
    assert low <= bf16 / payload_bytes(payload) <= high
