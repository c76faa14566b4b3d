"""What a site sends back after a round: its update, as one of the payload kinds (run setting `update-payload`).

    weights-fp32   the site's weights at the end of the round, fp32: 4 bytes a parameter, exact
    delta-bf16     the pseudo-gradient start - end (the round's starting weights minus the site's), cast to
                   bf16: 2 bytes a parameter, half the bytes; the error is bf16 rounding of the delta (a
                   relative 2^-9 of each element of the delta), not of the weights
    delta-int8     the pseudo-gradient quantized block-wise (pilot/dataplane/quantize.py) with error feedback
    delta-int4     kept at the site (what a round does not send is added to the next round's delta): 8.06,
    delta-int2     4.06 or 2.06 bits a parameter with the scales; decoded to fp32 on the server

The server always gets fp32 weights back (start - delta), so averaging and the outer optimizer run in fp32.
Memory (at most two copies of the model per process during a sync): a site holds its live model (`end`)
and one buffer with the round's start weights (`start`); `reuse_start=True` writes the payload into that
buffer's own memory (the bf16 delta fills its first half), so encoding allocates nothing model-sized.

    start = fetched global weights          # the site's staging buffer, fetched with fetch_blob(into=...)
    end = trainer.get_weights()             # after the round
    payload = encode_update(start, end, "delta-bf16", reuse_start=True)    # start is consumed
    digest = upload_blob(url, update_blob(start, end, "delta-bf16"), token=token)   # the same, as a blob
    ...                                     # on the server, with the round's global weights as start:
    kind, tensors = read_update(store.get(digest))                       # the kind travels in the blob
    weights = decode_update(tensors, global_weights, kind)               # fp32, = end +- rounding
    delta = as_delta(tensors, global_weights, kind)                      # or the pseudo-gradient, to average

Tensors that are not floating point (counters, masks) travel as they are in both kinds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from pilot.dataplane import quantize
from pilot.dataplane.blob import SpooledTensors, TensorBlob

QUANTIZED = tuple(quantize.KINDS)
KINDS = ("weights-fp32", "delta-bf16", *QUANTIZED)
BLOCK = 1 << 20  # elements per step: a cache-sized scratch, not a model-sized one (and ~7x faster on CPU)

_WIRE_DTYPE = {"weights-fp32": torch.float32, "delta-bf16": torch.bfloat16,
               **{kind: torch.float32 for kind in quantize.KINDS}}   # quantized payloads: as read_update decodes them


def check_kind(kind: str) -> str:
    """`kind` if it is a payload kind, else ValueError naming the choices."""
    if kind not in KINDS:
        raise ValueError(f"unknown update payload {kind!r}: choose one of {', '.join(KINDS)}")
    return kind


def _check_names(got: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str) -> None:
    if set(got) != set(reference):
        missing, extra = sorted(set(reference) - set(got)), sorted(set(got) - set(reference))
        raise ValueError(f"{what}: tensor names differ from the start weights' (missing {missing[:3]}, "
                         f"extra {extra[:3]})")
    for name in got:
        shape = _spec(got, name)[1]
        if shape != tuple(reference[name].shape):
            raise ValueError(f"{what}: {name} has shape {shape}, the start weights' is {tuple(reference[name].shape)}")


def _spec(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """A tensor's dtype and shape (a spooled blob's without reading it)."""
    if isinstance(tensors, SpooledTensors):
        return tensors.spec(name)
    return tensors[name].dtype, tuple(tensors[name].shape)


def _blocks(n: int) -> range:
    return range(0, n, BLOCK)


def _delta_bf16(start: torch.Tensor, end: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = bf16(start - end), block by block. `out` may be the bf16 view of `start`'s own memory: the
    results of elements [lo, hi) land on bytes that held fp32 elements [lo/2, hi/2), all of which were read
    already (a block is computed before it is written)."""
    s, e, o = start.view(-1), end.detach().reshape(-1), out.view(-1)
    for lo in _blocks(s.numel()):
        hi = min(lo + BLOCK, s.numel())
        o[lo:hi] = s[lo:hi] - e[lo:hi].to(s.device, torch.float32)
    return out


def _weights_from_delta(start: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = start - fp32(delta), block by block (`out` may be `start`)."""
    s, d, o = start.reshape(-1), delta.reshape(-1), out.view(-1)
    for lo in _blocks(o.numel()):
        hi = min(lo + BLOCK, o.numel())
        torch.sub(s[lo:hi], d[lo:hi].to(o.device, torch.float32), out=o[lo:hi])
    return out


@torch.no_grad()
def encode_update(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], kind: str, *,
                  reuse_start: bool = False) -> dict[str, torch.Tensor]:
    """The payload a site uploads: its weights (`weights-fp32`) or bf16(start - end) (`delta-bf16`).

    reuse_start=False: `start` is left alone; weights-fp32 returns `end`'s own tensors (no copy), delta-bf16
    allocates the bf16 delta (half a model). reuse_start=True: the payload is written into `start`'s memory
    and `start` no longer holds the start weights (no model-sized allocation; for fp32 `start` tensors).
    """
    check_kind(kind)
    if kind in QUANTIZED:
        raise ValueError(f"{kind} is encoded with the site's error feedback: use update_blob(..., feedback=...)")
    _check_names(end, start, "encode_update")
    payload: dict[str, torch.Tensor] = {}
    for name, s in start.items():
        e = end[name].detach()
        if not e.is_floating_point():
            payload[name] = e
        elif kind == "weights-fp32":
            if reuse_start and s.dtype == torch.float32:
                payload[name] = s.copy_(e)
            else:
                payload[name] = e.float()
        elif reuse_start and s.dtype == torch.float32 and s.is_contiguous():
            own = s.view(-1).view(torch.bfloat16)[:s.numel()].view(s.shape)  # the first half of s's bytes
            payload[name] = _delta_bf16(s.float(), e, own)
        else:
            payload[name] = _delta_bf16(s.float(), e, torch.empty(s.shape, dtype=torch.bfloat16, device=s.device))
    return payload


@torch.no_grad()
def decode_update(payload: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], kind: str, *,
                  out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A site's fp32 weights from its payload and the round's start weights (start - delta for delta-bf16).

    out: fp32 tensors to write into (may be `start` itself, which then becomes the site's weights); else
    weights-fp32 returns the payload's own tensors and delta-bf16 allocates one fp32 model.
    """
    check_kind(kind)
    _check_names(payload, start, "decode_update")
    weights: dict[str, torch.Tensor] = {}
    for name, p in payload.items():
        if p.is_floating_point() and p.dtype != _WIRE_DTYPE[kind]:
            raise ValueError(f"decode_update: {name} is {p.dtype}, a {kind} payload holds {_WIRE_DTYPE[kind]}")
        target = out[name] if out is not None else None
        if not p.is_floating_point() or kind == "weights-fp32":
            weights[name] = target.copy_(p) if target is not None else p
        elif target is not None and target.is_contiguous() and target.dtype == torch.float32:
            weights[name] = _weights_from_delta(start[name], p, target)
        elif target is not None:
            weights[name] = torch.sub(start[name], p, out=target)
        else:
            weights[name] = _weights_from_delta(start[name], p, torch.empty(p.shape, device=start[name].device))
    return weights


def payload_bytes(state: Mapping[str, torch.Tensor], kind: str) -> int:
    """Bytes of tensor data a payload of this kind holds for a model shaped like `state`."""
    check_kind(kind)
    if kind in QUANTIZED:
        floats = {k: tuple(t.shape) for k, t in state.items() if t.is_floating_point()}
        return quantize.encoded_bytes(floats, quantize.bits_for_kind(kind)) + \
            sum(t.numel() * t.element_size() for t in state.values() if not t.is_floating_point())
    return sum(t.numel() * (_WIRE_DTYPE[kind].itemsize if t.is_floating_point() else t.element_size())
               for t in state.values())


# ------------------------------------------------------------------ as blobs
def update_blob(start: Mapping[str, torch.Tensor] | None, end: Mapping[str, torch.Tensor], kind: str, *,
                feedback: quantize.ErrorFeedback | None = None, reuse_start: bool = True) -> TensorBlob:
    """A site's update as a blob that names its kind. `start`: the round's start weights, consumed with
    reuse_start (the payload is written into its memory); None only for weights-fp32, which then holds a copy of
    `end`. A quantized kind needs the site's `feedback` (its residual carries over to the next round)."""
    check_kind(kind)
    if start is None:
        if kind != "weights-fp32":
            raise ValueError(f"a {kind} update needs the round's start weights, which this site did not keep")
        return TensorBlob({k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                           for k, v in end.items()}, {"payload": kind})
    if kind in QUANTIZED:
        if feedback is None or feedback.kind != kind:
            raise ValueError(f"a {kind} update needs the site's error feedback of that kind")
        return TensorBlob(feedback.encode(start, end), {"payload": kind})
    return TensorBlob(encode_update(start, end, kind, reuse_start=reuse_start), {"payload": kind})


def delta_blob(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], kind: str) -> TensorBlob:
    """The pseudo-gradient start - end as a blob of a delta kind, with no error feedback: for a sender that keeps
    what the payload leaves out in its own weights (an overlapping site, pilot/site/trainer.py, folds the payload
    as sent back in). `start` and `end` are left alone; the payload is allocated (half a model in bf16)."""
    check_kind(kind)
    if kind == "weights-fp32":
        raise ValueError("delta_blob: weights-fp32 is not a delta")
    if kind in QUANTIZED:
        return TensorBlob(quantize.encode_delta(start, end, bits=quantize.bits_for_kind(kind)), {"payload": kind})
    return TensorBlob(encode_update(start, end, kind), {"payload": kind})


def sent_deltas(tensors: Mapping[str, torch.Tensor], kind: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, delta) for each tensor of a delta payload, as the receiver decodes it: bf16 tensors as they are, a
    quantized payload dequantized one tensor at a time (nothing model-sized is allocated); pass-through tensors
    as they travel."""
    check_kind(kind)
    if kind == "weights-fp32":
        raise ValueError("sent_deltas: weights-fp32 is not a delta")
    if kind in QUANTIZED:
        yield from quantize.iter_decoded(tensors, quantize.bits_for_kind(kind))
    else:
        yield from tensors.items()


class _Decoded(Mapping):
    """A quantized payload's fp32 pseudo-gradient by name, each tensor decoded when asked for."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], bits: int):
        self._tensors, self._bits = tensors, bits
        self._names = [name for name in tensors if not name.endswith((quantize.SCALE_SUFFIX, quantize.SHAPE_SUFFIX))]

    def __getitem__(self, name: str) -> torch.Tensor:
        return quantize.decode_delta({k: self._tensors[k] for k in (name, name + quantize.SCALE_SUFFIX,
                                                                  name + quantize.SHAPE_SUFFIX)
                                      if k in self._tensors}, self._bits)[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def read_update(blob) -> tuple[str, Mapping[str, torch.Tensor]]:
    """The kind and tensors of an uploaded update (ValueError for a kind this server does not know), as a
    mapping that may read (a spooled blob) or decode (a quantized payload, to the fp32 pseudo-gradient it stands
    for) each tensor when it is asked for: go through it tensor by tensor, holding one at a time."""
    kind = check_kind(blob.metadata.get("payload", "weights-fp32"))
    if kind in QUANTIZED:
        return kind, _Decoded(blob.tensors, quantize.bits_for_kind(kind))
    return kind, blob.tensors


@torch.no_grad()
def as_delta(payload: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], kind: str) -> Mapping[str, torch.Tensor]:
    """The pseudo-gradient start - end that a payload stands for: a delta as sent (bf16, or decoded from a
    quantized kind; averaged in fp32 by the server; the payload's own mapping, read as it is), or computed in
    fp32 from the site's weights."""
    check_kind(kind)
    if kind != "weights-fp32":
        return payload
    return {k: start[k].float() - w.float() for k, w in payload.items()}


# ------------------------------------------------------------------ the global model to a site, as a bf16 delta
# The server keeps exact fp32 masters G. What the sites are sent is a view S of them: S_0 = G_0, and each later
# view S' = S - fp32(bf16(S - G)), the last view moved by the bf16 delta to the masters. A site that holds S
# fetches only that delta (2 bytes a parameter, half the weights) and applies it with the same fp32 arithmetic,
# so it holds S' bit for bit (IEEE subtraction is exact-rounded everywhere) and checks S' against its digest.
# The view differs from the masters by one bf16 rounding of one round's move, never more: each delta is
# measured from the last view, not from the last masters, so rounding does not pile up over rounds.
GLOBAL_DELTA = "global-delta-bf16"


@torch.no_grad()
def global_delta(view: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """bf16(view - weights) for every floating tensor (non-floating ones travel as the masters hold them)."""
    _check_names(weights, view, "global_delta")
    return {name: _delta_bf16(v, weights[name], torch.empty(v.shape, dtype=torch.bfloat16))
            if v.is_floating_point() else weights[name].detach().clone()
            for name, v in view.items()}


@torch.no_grad()
def next_view(view: torch.Tensor, weights: torch.Tensor, in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One tensor of the next view and of its delta: (bf16(view - weights), view - fp32(that)), the arithmetic a
    site repeats with apply_global_delta; the new view is written into `view`'s own memory with in_place."""
    if not view.is_floating_point():
        delta = weights.detach().clone()
        return delta, view.copy_(delta) if in_place else delta.clone()
    delta = _delta_bf16(view, weights, torch.empty(view.shape, dtype=torch.bfloat16))
    return delta, _weights_from_delta(view, delta, view if in_place else torch.empty_like(view))


@torch.no_grad()
def add_into(out: torch.Tensor, plus: torch.Tensor | None = None, minus: torch.Tensor | None = None) -> None:
    """out += fp32(plus) - fp32(minus), block by block (no tensor-sized temporary; `out` may live on another
    device or in another dtype than the operands)."""
    o = out.view(-1)
    p = None if plus is None else plus.reshape(-1)
    m = None if minus is None else minus.reshape(-1)
    for lo in _blocks(o.numel()):
        hi = min(lo + BLOCK, o.numel())
        x = p[lo:hi].float() if p is not None else torch.zeros(hi - lo)
        if m is not None:
            x = x - m[lo:hi].float()
        o[lo:hi] += x.to(o.device, o.dtype)


@torch.no_grad()
def apply_global_delta(view: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> None:
    """view <- view - fp32(delta), in place: the next view, bit for bit the server's (ValueError if the delta
    is not shaped like the view)."""
    _check_names(delta, view, "apply_global_delta")
    for name, v in view.items():   # every tensor checked before any is written: a bad delta leaves the view whole
        dtype = _spec(delta, name)[0]
        if v.is_floating_point() and (dtype != torch.bfloat16 or v.dtype != torch.float32 or not v.is_contiguous()):
            raise ValueError(f"apply_global_delta: {name} is {v.dtype} with a {dtype} delta; "
                             f"a view is contiguous fp32 and its delta bf16")
    for name, v in view.items():
        if v.is_floating_point():
            _weights_from_delta(v, delta[name], v)
        else:
            v.copy_(delta[name])
