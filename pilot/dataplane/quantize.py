"""Compressed pseudo-gradients: block-wise absmax quantization to 8, 4 or 2 bits, with error feedback at the site.

Pure torch, no I/O. A payload is a flat dict of tensors that safetensors stores as it is (a blob with metadata
{"payload": kind}):

    name            codes: int8 [blocks, block] (delta-int8), or uint8 [blocks, block * bits / 8] holding
                    8 / bits codes per byte, lowest bits first, offset by 2^(bits-1) (delta-int4, delta-int2)
    name.__scale    bf16 [blocks]: the step of the block's grid, absmax / qmax rounded *up* to bf16
    name.__shape    int64 [ndim]: the tensor's shape (the last block is zero-padded)
    name            (a non-floating-point tensor: travels as it is, no .__scale)

Each block of `block` consecutive elements (default 256; a tensor smaller than that is one block of its own
size) is quantized to the symmetric grid scale * {-qmax..qmax}, qmax = 127 / 7 / 1, by rounding to nearest, so
|x - decoded| <= scale / 2 for every element; zero stays exactly zero. Bits per parameter, scales included:
8 + 16/block (int8: 8.06 at 256, 1.98x fewer bytes than bf16), 4 + 16/block (int4: 4.06 at 256, 3.94x;
4.016 at 1024, 3.98x), 2 + 16/block (int2: 2.06 at 256, 7.8x). Strictly >= 4x fewer bytes than bf16 needs
fewer than 4 bits per code: delta-int2, or delta-int4 only up to the scales' 0.4-1.6%.

Error feedback (as in 1-bit SGD / EF21, and MuLoCo's compressed DiLoCo deltas): the site adds what it did not
send last time to this round's delta before quantizing, and keeps what it does not send now:

    v = delta + residual;   sent = decode(quantize(v));   residual = v - sent

so over rounds the server receives sum(sent) = sum(delta) - final residual: nothing is lost, only delayed.

Residual storage: the residual is a model-sized tensor set that persists between rounds. fp32 is a full model
copy (4 bytes a parameter, 2.24 GB for d20); bf16 halves it (1.12 GB) and its rounding (2^-9 of the residual,
which is itself at most scale/2) is far below the quantization error it compensates and equal in kind to the
error the delta-bf16 payload already accepts on the whole delta. ErrorFeedback keeps it in bf16 by default.
Memory at a site during a sync (the design allows two model copies per process): live weights (1) + the
round-start buffer (1) + a bf16 residual (0.5) + the codes (int4: 0.13, int8: 0.25); all work is chunked
(CHUNK elements), so nothing else model-sized is allocated. To stay at two copies, fold the residual into the
round-start buffer instead of keeping it apart (exact, fp32, no extra memory):

    start_buffer = global_weights + residual      # at round start, in place (start_buffer.add_(residual) ...)
    payload = encode_delta(start_buffer, live_weights, bits=4, residual_out=start_buffer)
    # v = start_buffer - live = delta + residual; the new residual is written over start_buffer chunk by chunk
    ...                                           # when the next global weights G arrive: start_buffer.add_(G)

The server decodes to fp32: decode_delta (the delta), decode_weights (start - delta, as payload.decode_update
does for delta-bf16), or add_decoded (acc += alpha * delta, for averaging without a per-site fp32 copy).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch

KINDS = {"delta-int8": 8, "delta-int4": 4, "delta-int2": 2}
DEFAULT_BLOCK = 256
CHUNK = 1 << 20                  # elements per working step: a cache-sized scratch, never a model-sized one
SCALE_SUFFIX = ".__scale"
SHAPE_SUFFIX = ".__shape"
SCALE_DTYPE = torch.bfloat16


# ----------------------------------------------------------------------------------------- kinds and sizes
def bits_for_kind(kind: str) -> int:
    """8, 4 or 2 for delta-int8/int4/int2; ValueError naming the choices otherwise."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantized payload {kind!r}: choose one of {', '.join(KINDS)}")
    return KINDS[kind]


def kind_for_bits(bits: int) -> str:
    for kind, b in KINDS.items():
        if b == bits:
            return kind
    raise ValueError(f"bits must be one of {sorted(KINDS.values())}, got {bits}")


def qmax(bits: int) -> int:
    """The largest code magnitude: the grid is scale * {-qmax..qmax} (symmetric, so zero is exact)."""
    kind_for_bits(bits)
    return (1 << (bits - 1)) - 1


def _per_byte(bits: int) -> int:
    return 8 // bits


def block_for(numel: int, bits: int, block: int = DEFAULT_BLOCK) -> int:
    """The block length used for a tensor of `numel` elements: `block`, or the tensor itself rounded up to a
    whole byte of codes when it is smaller."""
    per = _per_byte(bits)
    if block < per or block % per:
        raise ValueError(f"block must be a positive multiple of {per} for {bits}-bit codes, got {block}")
    return min(block, max(per, -(-numel // per) * per))


def encoded_bytes(shapes: Mapping[str, torch.Size | tuple], bits: int, block: int = DEFAULT_BLOCK) -> int:
    """Bytes of tensor data in the payload of floating-point tensors of these shapes (codes, scales, shapes)."""
    total = 0
    for shape in shapes.values():
        n = math.prod(shape)
        bs = block_for(n, bits, block)
        blocks = -(-n // bs)
        total += blocks * bs * bits // 8 + blocks * SCALE_DTYPE.itemsize + 8 * len(shape)
    return total


def payload_bytes(payload: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensor data a payload holds (what travels, safetensors header aside)."""
    return sum(t.numel() * t.element_size() for t in payload.values())


# ----------------------------------------------------------------------------------------- one chunk
def _scales(v: torch.Tensor, bits: int) -> torch.Tensor:
    """bf16 scale per row of v [blocks, bs] (fp32): absmax / qmax rounded up, so no code exceeds qmax."""
    exact = v.abs().amax(dim=1) / qmax(bits)
    scale = exact.to(SCALE_DTYPE)
    low = scale.float() < exact                 # round-to-nearest went down: step to the next bf16 up
    if bool(low.any()):
        bumped = (scale.view(torch.int16) + 1).view(SCALE_DTYPE)   # positive bf16: next value up
        scale = torch.where(low, bumped, scale)
    return scale


def _quantize_rows(v: torch.Tensor, scale: torch.Tensor, bits: int, codes: torch.Tensor) -> None:
    """codes[...] = the codes of v [blocks, bs] on the grid `scale` (codes: [blocks, bs * bits / 8])."""
    q_max = qmax(bits)
    s = scale.float().unsqueeze(1)
    q = torch.round(v / torch.where(s > 0, s, torch.ones_like(s))).clamp_(-q_max, q_max)
    if bits == 8:
        codes.copy_(q)
        return
    per = _per_byte(bits)
    u = (q + (1 << (bits - 1))).to(torch.uint8).view(q.shape[0], -1, per)
    packed = u[..., 0].clone()
    for j in range(1, per):
        packed |= u[..., j] << (bits * j)
    codes.copy_(packed)


def _dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """out [blocks, bs] (fp32) = decoded values of codes [blocks, bs * bits / 8]."""
    if bits == 8:
        out.copy_(codes)
    else:
        per, mask = _per_byte(bits), (1 << bits) - 1
        parts = torch.stack([(codes >> (bits * j)) & mask for j in range(per)], dim=-1)
        out.copy_(parts.view(codes.shape[0], -1))
        out.sub_(1 << (bits - 1))
    return out.mul_(scale.float().unsqueeze(1))


# ----------------------------------------------------------------------------------------- one tensor
def _rows(n: int, bs: int) -> int:
    return -(-n // bs)


def _chunk_elems(bs: int) -> int:
    return max(bs, CHUNK // bs * bs)


@torch.no_grad()
def quantize(x: torch.Tensor, bits: int = 4, block: int = DEFAULT_BLOCK, *, end: torch.Tensor | None = None,
             residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
             name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of v = x [- end] [+ residual], chunk by chunk.

    residual_out (any float dtype, x's shape; may be x, end's partner `start`, or `residual` itself): receives
    v - decoded(v). Only CHUNK-sized temporaries besides the codes and scales returned. ValueError if v holds
    inf or nan (a delta that cannot be sent)."""
    n = x.numel()
    bs = block_for(n, bits, block)
    blocks = _rows(n, bs)
    codes = torch.empty((blocks, bs * bits // 8), dtype=torch.int8 if bits == 8 else torch.uint8, device=x.device)
    scales = torch.empty(blocks, dtype=SCALE_DTYPE, device=x.device)
    flat = x.detach().reshape(-1)
    end_flat = None if end is None else end.detach().reshape(-1)
    res_flat = None if residual is None else residual.reshape(-1)
    out_flat = None if residual_out is None else residual_out.view(-1)  # must be contiguous: written in place
    step = _chunk_elems(bs)
    v = torch.empty(min(step, blocks * bs), dtype=torch.float32, device=x.device)
    dq = torch.empty_like(v) if out_flat is not None else None
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        m, padded = hi - lo, _rows(hi - lo, bs) * bs
        w = v[:padded]
        w[:m].copy_(flat[lo:hi])
        if end_flat is not None:
            w[:m].sub_(end_flat[lo:hi].to(w.device))
        if res_flat is not None:
            w[:m].add_(res_flat[lo:hi].to(w.device))
        w[m:].zero_()
        rows = w.view(-1, bs)
        r0, r1 = lo // bs, lo // bs + padded // bs
        scale = _scales(rows, bits)
        if not bool(torch.isfinite(scale).all()):
            raise ValueError(f"quantize: {name} holds inf or nan (elements {lo}..{hi}); nothing can be sent")
        scales[r0:r1] = scale
        _quantize_rows(rows, scale, bits, codes[r0:r1])
        if out_flat is not None:
            d = _dequantize_rows(codes[r0:r1], scale, bits, dq[:padded].view(-1, bs))
            out_flat[lo:hi].copy_(w[:m] - d.view(-1)[:m])
    return codes, scales


@torch.no_grad()
def dequantize(codes: torch.Tensor, scales: torch.Tensor, shape: torch.Size | tuple, bits: int, *,
               out: torch.Tensor | None = None, start: torch.Tensor | None = None, alpha: float = 1.0,
               accumulate: bool = False, name: str = "tensor") -> torch.Tensor:
    """fp32 values of (codes, scales), chunk by chunk, written to `out` (allocated if None):

        out = decoded                (default)
        out = start - decoded        (start given: the sender's weights from the round's start weights)
        out += alpha * decoded       (accumulate=True: averaging without a per-site copy)
    """
    n = math.prod(shape)
    per = _per_byte(bits)
    if codes.ndim != 2 or scales.ndim != 1 or codes.shape[0] != scales.shape[0]:
        raise ValueError(f"dequantize: {name} has codes {tuple(codes.shape)} and scales {tuple(scales.shape)}; "
                         f"expected [blocks, bytes] and [blocks]")
    want_dtype = torch.int8 if bits == 8 else torch.uint8
    if codes.dtype != want_dtype or scales.dtype != SCALE_DTYPE:
        raise ValueError(f"dequantize: {name} has {codes.dtype} codes / {scales.dtype} scales, {bits}-bit codes "
                         f"are {want_dtype} / {SCALE_DTYPE}")
    bs = codes.shape[1] * per
    if (n == 0 and codes.shape[0] != 0) or (n > 0 and (bs == 0 or _rows(n, bs) != codes.shape[0])):
        raise ValueError(f"dequantize: {name} has {codes.shape[0]} blocks of {bs}, which cannot hold shape "
                         f"{tuple(shape)}")
    if out is None:
        if accumulate:
            raise ValueError("dequantize: accumulate=True needs `out`")
        out = torch.empty(shape, dtype=torch.float32, device=codes.device)
    elif tuple(out.shape) != tuple(shape):
        raise ValueError(f"dequantize: {name} decodes to shape {tuple(shape)}, out has {tuple(out.shape)}")
    o = out.view(-1)
    s = None if start is None else start.detach().reshape(-1)
    step = _chunk_elems(bs) if bs else 1
    scratch = torch.empty(min(step, codes.shape[0] * bs), dtype=torch.float32, device=codes.device)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        m, padded = hi - lo, _rows(hi - lo, bs) * bs
        r0, r1 = lo // bs, lo // bs + padded // bs
        d = _dequantize_rows(codes[r0:r1], scales[r0:r1], bits, scratch[:padded].view(-1, bs)).view(-1)[:m]
        if accumulate:
            o[lo:hi].add_(d.to(o.device), alpha=alpha)
        elif s is not None:   # read before written: `out` may be `start` itself
            o[lo:hi].copy_(s[lo:hi].to(d.device, torch.float32) - d)
        else:
            o[lo:hi].copy_(d)
    return out


# ----------------------------------------------------------------------------------------- payloads
def _check_name(name: str) -> None:
    if name.endswith((SCALE_SUFFIX, SHAPE_SUFFIX)):
        raise ValueError(f"tensor name {name!r} ends with a suffix the quantized payload reserves")


@torch.no_grad()
def encode_delta(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor] | None = None, *,
                 bits: int = 4, block: int = DEFAULT_BLOCK, residual: Mapping[str, torch.Tensor] | None = None,
                 residual_out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The payload of v = start [- end] [+ residual] (start alone: start is the delta). Floating-point tensors are
    quantized; others travel as they are (from `end` if given, as payload.encode_update does).

    residual_out receives v - decoded(v) for every floating-point tensor (defaults to `residual` itself, updated
    in place: error feedback); it may be `start` (the residual folded into the round-start buffer)."""
    kind_for_bits(bits)
    if residual_out is None:
        residual_out = residual
    payload: dict[str, torch.Tensor] = {}
    for name, x in start.items():
        _check_name(name)
        e = None if end is None else end[name]
        if e is not None and tuple(e.shape) != tuple(x.shape):
            raise ValueError(f"encode_delta: {name} has shape {tuple(e.shape)} at the end, {tuple(x.shape)} at "
                             f"the start")
        if not x.is_floating_point():
            payload[name] = (x if e is None else e).detach()
            continue
        codes, scales = quantize(x, bits, block, end=e, residual=None if residual is None else residual[name],
                                 residual_out=None if residual_out is None else residual_out[name], name=name)
        payload[name] = codes
        payload[name + SCALE_SUFFIX] = scales
        payload[name + SHAPE_SUFFIX] = torch.tensor(list(x.shape), dtype=torch.int64)
    return payload


def _entries(payload: Mapping[str, torch.Tensor]):
    """(name, codes, scales, shape) for quantized tensors, (name, tensor, None, None) for pass-through ones."""
    for name, t in payload.items():
        if name.endswith((SCALE_SUFFIX, SHAPE_SUFFIX)):
            if name.rsplit(".", 1)[0] not in payload:
                raise ValueError(f"quantized payload: {name} has no codes tensor")
            continue
        scale, shape = payload.get(name + SCALE_SUFFIX), payload.get(name + SHAPE_SUFFIX)
        if (scale is None) != (shape is None):
            raise ValueError(f"quantized payload: {name} needs both {SCALE_SUFFIX} and {SHAPE_SUFFIX}")
        yield name, t, scale, None if shape is None else torch.Size(shape.tolist())


def payload_shapes(payload: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    """The shapes of the tensors a payload decodes to."""
    return {name: shape if shape is not None else t.shape for name, t, _, shape in _entries(payload)}


@torch.no_grad()
def decode_delta(payload: Mapping[str, torch.Tensor], bits: int, *, out: Mapping[str, torch.Tensor] | None = None,
                 start: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """fp32 deltas of a payload (start given: start - delta, the sender's weights). out: tensors to write into
    (may be `start`); else one fp32 tensor set is allocated. Pass-through tensors come back as they are."""
    result = {}
    for name, t, scales, shape in _entries(payload):
        target = None if out is None else out[name]
        if scales is None:
            result[name] = t if target is None else target.copy_(t)
        else:
            result[name] = dequantize(t, scales, shape, bits, out=target,
                                      start=None if start is None else start[name], name=name)
    return result


def iter_decoded(payload: Mapping[str, torch.Tensor], bits: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 delta) one tensor at a time (only that tensor allocated); pass-through tensors as they are."""
    for name, t, scales, shape in _entries(payload):
        yield name, t if scales is None else dequantize(t, scales, shape, bits, name=name)


def decode_weights(payload: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], bits: int, *,
                   out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The sender's fp32 weights, start - delta (out may be `start` itself)."""
    if set(payload_shapes(payload)) != set(start):
        raise ValueError("decode_weights: the payload's tensor names differ from the start weights'")
    return decode_delta(payload, bits, out=out, start=start)


@torch.no_grad()
def add_decoded(payload: Mapping[str, torch.Tensor], acc: Mapping[str, torch.Tensor], bits: int,
                alpha: float = 1.0) -> None:
    """acc[name] += alpha * delta[name] for every quantized tensor (fp32 accumulators; averaging K sites costs
    no per-site copy). Pass-through tensors are left to the caller."""
    for name, t, scales, shape in _entries(payload):
        if scales is not None:
            dequantize(t, scales, shape, bits, out=acc[name], alpha=alpha, accumulate=True, name=name)


# ----------------------------------------------------------------------------------------- error feedback
class ErrorFeedback:
    """What a site did not send, carried into its next update.

        ef = ErrorFeedback("delta-int4")                  # residual in bf16 (see the module doc), lazily zero
        payload = ef.encode(start, end)                   # quantize(start - end + residual); residual updated
        upload(TensorBlob(payload, {"payload": ef.kind}))

    After any number of rounds: sum of decoded payloads == sum of true deltas - ef.residual (up to the
    residual's storage rounding). state_dict()/load_state_dict() let a site checkpoint it with its optimizer.
    """

    def __init__(self, kind: str = "delta-int4", block: int = DEFAULT_BLOCK,
                 residual_dtype: torch.dtype = torch.bfloat16):
        self.bits = bits_for_kind(kind)
        self.kind = kind
        block_for(block, self.bits, block)   # validates the block against the code width
        self.block = block
        if not residual_dtype.is_floating_point:
            raise ValueError(f"residual_dtype must be a floating-point dtype, got {residual_dtype}")
        self.residual_dtype = residual_dtype
        self.residual: dict[str, torch.Tensor] = {}

    def _residual_for(self, start: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        floats = {n: t for n, t in start.items() if t.is_floating_point()}
        if self.residual and set(self.residual) != set(floats):
            raise ValueError("ErrorFeedback: the tensor names differ from the previous round's")
        for name, t in floats.items():
            r = self.residual.get(name)
            if r is None:
                self.residual[name] = torch.zeros(t.shape, dtype=self.residual_dtype, device=t.device)
            elif tuple(r.shape) != tuple(t.shape):
                raise ValueError(f"ErrorFeedback: {name} has shape {tuple(t.shape)}, the residual "
                                 f"{tuple(r.shape)}")
        return self.residual

    def encode(self, start: Mapping[str, torch.Tensor],
               end: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The payload of (start - end) + residual (start alone: the delta); the residual becomes what this
        payload leaves out. start and end are not modified."""
        residual = self._residual_for(start)
        return encode_delta(start, end, bits=self.bits, block=self.block, residual=residual)

    def residual_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.residual.values())

    def reset(self) -> None:
        self.residual.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"residual/{n}": t for n, t in self.residual.items()}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        bad = [k for k in tensors if not k.startswith("residual/")]
        if bad:
            raise ValueError(f"ErrorFeedback state has {bad[:3]}, expected residual/<name> tensors")
        self.residual = {k[len("residual/"):]: t.to(self.residual_dtype).clone() for k, t in tensors.items()}


__all__ = ["KINDS", "DEFAULT_BLOCK", "CHUNK", "SCALE_SUFFIX", "SHAPE_SUFFIX", "bits_for_kind", "kind_for_bits",
           "qmax", "block_for", "encoded_bytes", "payload_bytes", "quantize", "dequantize", "encode_delta",
           "decode_delta", "iter_decoded", "decode_weights", "add_decoded", "payload_shapes", "ErrorFeedback"]
