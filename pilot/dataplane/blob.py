"""The blob format: safetensors, written and read as a stream, named by the SHA-256 of its bytes.

A blob is served straight from the tensors' memory and received straight into tensors (readinto), hashed
while the bytes move, so no serialised copy of the model ever exists. The same format is the checkpoint
format on disk (save_file / load_tensors: atomic, fsynced).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open

CHUNK = 4 << 20                   # bytes per read/write/hash step: large enough to keep syscalls cheap
HTTP_TIMEOUT_S = 60.0             # a peer silent for this long is gone
MAX_RESUMES = 5                   # reconnections within one fetch before it fails
RESUME_BACKOFF_S = 0.5            # wait before the n-th reconnection in a row: (n-1) x this (a restarting server needs a moment)
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")

# safetensors dtype names (https://github.com/huggingface/safetensors, format spec)
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


class BlobError(RuntimeError):
    """A blob is missing, corrupt, refused or could not be moved."""


class BlobCorrupt(BlobError):
    """A blob arrived whole but its bytes do not hash to the digest asked for."""


# ------------------------------------------------------------------ safetensors as a stream
def _dtype_code(name: str, tensor: torch.Tensor) -> str:
    if tensor.dtype not in _DTYPES:
        raise BlobError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot hold")
    return _DTYPES[tensor.dtype]


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor: a view when it is contiguous on the CPU, else one copy of that tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _header(layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]) -> tuple[bytes, int]:
    """The stream's header for tensors of these dtypes and shapes, in order, and the bytes of data after it."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape) in layout.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format asks for 8-byte alignment of the data
    return struct.pack("<Q", len(raw)) + raw, offset


class TensorBlob:
    """Tensors as one safetensors byte stream, never materialised: header + each tensor's own memory.

    The tensors must not change while the blob is served: its digest promises exactly these bytes.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 digest: str | None = None):
        self.tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        for name, tensor in self.tensors.items():
            _dtype_code(name, tensor)
        self.header, data = _header({n: (t.dtype, tuple(t.shape)) for n, t in self.tensors.items()}, self.metadata)
        self.size = len(self.header) + data
        self._digest = digest

    def chunks(self, start: int = 0, end: int | None = None) -> Iterator[memoryview]:
        """The stream's bytes [start, end) as views of the header and the tensors' memory, CHUNK at a time."""
        end = self.size if end is None else end
        offset = 0  # of the current piece in the stream
        for piece in (memoryview(self.header), *(_tensor_bytes(t) for t in self.tensors.values())):
            lo, hi = max(start - offset, 0), min(end - offset, len(piece))
            for at in range(lo, hi, CHUNK):
                yield piece[at:min(at + CHUNK, hi)]
            offset += len(piece)
            if offset >= end:
                break

    @property
    def digest(self) -> str:
        """SHA-256 of the byte stream (computed once, on first use)."""
        if self._digest is None:
            digest = hashlib.sha256()
            for chunk in self.chunks():
                digest.update(chunk)
            self._digest = digest.hexdigest()
        return self._digest

    def write_to(self, out: BinaryIO) -> str:
        """Write the stream to `out`, hashing on the way; returns the digest."""
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
            out.write(chunk)
        self._digest = digest.hexdigest()
        return self._digest


_TORCH_DTYPES = {code: dtype for dtype, code in _DTYPES.items()}


Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
Spool = Callable[[Mapping[str, str]], "BinaryIO | None"]   # a blob's metadata -> a file to hold its data, or None


class SpooledTensors(Mapping):
    """A spooled blob's tensors by name, each read from the file when asked for (a new tensor every time: hold
    one only as long as it is needed)."""

    def __init__(self, file: BinaryIO, specs: dict[str, tuple[torch.dtype, tuple[int, ...], int]]):
        self._file, self._specs = file, specs   # name -> (dtype, shape, offset of its bytes in the file)

    def __getitem__(self, name: str) -> torch.Tensor:
        dtype, shape, offset = self._specs[name]
        tensor = torch.empty(shape, dtype=dtype)
        view = _tensor_bytes(tensor)
        got = 0
        while got < len(view):
            n = os.preadv(self._file.fileno(), [view[got:got + CHUNK]], offset + got)
            if not n:
                raise BlobError(f"spooled tensor {name!r}: the file ended {len(view) - got} bytes early")
            got += n
        return tensor

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """A tensor's dtype and shape, without reading it."""
        dtype, shape, _ = self._specs[name]
        return dtype, shape

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)


class SpooledBlob:
    """A received blob whose tensor data waits in a file (an unnamed temporary one: gone with the blob), not in
    memory: an upload the server reads through once or twice (check, average) costs it no model-sized memory.
    `tensors` reads each tensor on demand; `chunks` serves the byte stream as TensorBlob does."""

    def __init__(self, file: BinaryIO, header: bytes, specs: dict[str, tuple[torch.dtype, tuple[int, ...], int]],
                 metadata: Mapping[str, str], size: int, digest: str):
        self.file, self.header, self.metadata, self.size, self.digest = file, header, dict(metadata), size, digest
        self.tensors = SpooledTensors(file, specs)

    def chunks(self, start: int = 0, end: int | None = None) -> Iterator[memoryview]:
        end = self.size if end is None else end
        head = len(self.header)
        if start < head:
            yield memoryview(self.header)[start:min(end, head)]
        at = max(start, head)
        while at < end:
            piece = os.pread(self.file.fileno(), min(CHUNK, end - at), at - head)
            if not piece:
                raise BlobError(f"spooled blob {self.digest[:12]}: the file ended early")
            yield memoryview(piece)
            at += len(piece)

    def close(self) -> None:
        self.file.close()


def read_blob(stream: BinaryIO, length: int, expected: str | None = None,
              into: Mapping[str, torch.Tensor] | None = None, allocate: Allocate | None = None,
              spool: Spool | None = None) -> TensorBlob | SpooledBlob:
    """Read a safetensors stream of `length` bytes straight into tensors, hashing as bytes arrive.

    `into`: preallocated tensors (same names, shapes, dtypes) to fill; else `allocate(shape, dtype)` gives
    each tensor (e.g. recycled memory: fresh pages cost more than copying into them), else torch.empty.
    `spool(metadata)`: a file for the tensor data of a blob with this metadata (a SpooledBlob comes back), or
    None (into memory). A stream that ends early, is malformed or does not hash to `expected` raises BlobError.
    """
    digest = hashlib.sha256()
    remaining = length

    def read_exact(view: memoryview) -> None:
        nonlocal remaining
        got = 0
        while got < len(view):
            n = stream.readinto(view[got:got + CHUNK])
            if not n:
                raise BlobError(f"stream ended {remaining - got} bytes early ({length} expected)")
            digest.update(view[got:got + n])
            got += n
        remaining -= got

    if length < 8:
        raise BlobError(f"a safetensors stream has at least 8 bytes, got {length}")
    size_bytes = bytearray(8)
    read_exact(memoryview(size_bytes))
    (header_len,) = struct.unpack("<Q", size_bytes)
    if header_len > min(remaining, 100 << 20):
        raise BlobError(f"safetensors header of {header_len} bytes does not fit the stream")
    header_bytes = bytearray(header_len)
    read_exact(memoryview(header_bytes))
    try:
        header = json.loads(header_bytes)
    except ValueError as error:
        raise BlobError(f"safetensors header is not JSON: {error}") from error
    metadata = header.pop("__metadata__", None) or {}
    file = spool(metadata) if spool is not None and into is None else None
    if file is not None:
        try:
            return _read_spooled(header, metadata, file, read_exact, lambda: remaining, digest, length, expected,
                                 struct.pack("<Q", header_len) + bytes(header_bytes))
        except BaseException:
            file.close()
            raise
    tensors: dict[str, torch.Tensor] = {}
    for name, (dtype, shape, _) in _tensor_specs(header).items():
        if into is not None:
            tensor = into[name]
            if tensor.shape != shape or tensor.dtype != dtype:
                raise BlobError(f"tensor {name!r} is {dtype}{list(shape)}, expected {tensor.dtype}{list(tensor.shape)}")
        else:
            tensor = (allocate or torch.empty)(shape, dtype=dtype)
        if tensor.device.type == "cpu" and tensor.is_contiguous():
            read_exact(_tensor_bytes(tensor))  # the bytes land in the tensor's own memory
        else:  # a strided or GPU target gets the bytes through one staging copy of this tensor
            staged = torch.empty(shape, dtype=dtype)
            read_exact(_tensor_bytes(staged))
            tensor.copy_(staged)
        tensors[name] = tensor
    if remaining:
        raise BlobError(f"{remaining} bytes after the last tensor")
    got = digest.hexdigest()
    if expected is not None and got != expected:
        raise BlobCorrupt(f"blob corrupt: expected sha256 {expected}, received {got}")
    return TensorBlob(tensors, metadata, digest=got)


def spool_file(directory: str | os.PathLike[str]) -> BinaryIO:
    """An unnamed temporary file in `directory` (created if missing) to spool a blob's data into: its space goes
    when it is closed, and a crash leaves nothing behind."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryFile(dir=directory)


def spool_blob(tensors: Iterator[tuple[str, torch.Tensor]], layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
               file: BinaryIO, metadata: Mapping[str, str] | None = None) -> SpooledBlob:
    """A blob written to `file` as `tensors` yields them (names, dtypes and shapes as `layout` says, in its order),
    hashed on the way: one tensor in memory at a time, however large the blob."""
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    header, _ = _header(layout, metadata)
    digest = hashlib.sha256(header)   # the header stays in memory, the file holds the data (as a received blob's)
    specs: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
    offset = 0
    for (name, tensor), (want, (dtype, shape)) in zip(tensors, layout.items(), strict=True):
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise BlobError(f"spool_blob: got {name!r} {tensor.dtype}{list(tensor.shape)}, the layout says "
                            f"{want!r} {dtype}{list(shape)}")
        data = _tensor_bytes(tensor)
        digest.update(data)
        file.write(data)
        specs[name] = (dtype, tuple(shape), offset)
        offset += len(data)
    file.flush()
    return SpooledBlob(file, header, specs, metadata, len(header) + offset, digest.hexdigest())


def _tensor_specs(header: dict) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """name -> (dtype, shape, offset of its bytes in the data) from a safetensors header, in order; BlobError
    for an unknown dtype, data out of order or a byte range that does not hold the shape."""
    specs: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
    offset = 0
    for name, spec in header.items():
        dtype = _TORCH_DTYPES.get(spec.get("dtype"))
        start, end = spec.get("data_offsets", [None, None])
        if dtype is None or start != offset:
            raise BlobError(f"tensor {name!r}: unsupported dtype or out-of-order data ({spec})")
        shape = tuple(spec["shape"])
        if math.prod(shape) * dtype.itemsize != end - start:
            raise BlobError(f"tensor {name!r}: {end - start} bytes do not hold {dtype}{list(shape)}")
        specs[name] = (dtype, shape, start)
        offset = end
    return specs


def _read_spooled(header: dict, metadata: Mapping[str, str], file: BinaryIO, read_exact: Callable[[memoryview], None],
                  remaining: Callable[[], int], digest, length: int, expected: str | None,
                  raw_header: bytes) -> SpooledBlob:
    """read_blob's tail for a spooled blob: the tensor specs checked as read_blob checks them, the data copied to
    `file` CHUNK at a time (hashed on the way)."""
    specs = _tensor_specs(header)
    offset = sum(math.prod(shape) * dtype.itemsize for dtype, shape, _ in specs.values())
    if remaining() != offset:
        raise BlobError(f"{remaining() - offset} bytes after the last tensor" if remaining() > offset
                        else f"stream ended {offset - remaining()} bytes early ({length} expected)")
    buffer = bytearray(CHUNK)
    while remaining():
        view = memoryview(buffer)[:min(CHUNK, remaining())]
        read_exact(view)
        file.write(view)
    file.flush()
    got = digest.hexdigest()
    if expected is not None and got != expected:
        raise BlobCorrupt(f"blob corrupt: expected sha256 {expected}, received {got}")
    return SpooledBlob(file, raw_header, specs, metadata, length, got)


def save_file(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
              metadata: Mapping[str, str] | None = None) -> str:
    """Write a safetensors file atomically (temp file, fsync, rename); returns its SHA-256."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as out:
            digest = TensorBlob(tensors, metadata).write_to(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_tensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file."""
    with safe_open(str(path), framework="pt", device=device) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


