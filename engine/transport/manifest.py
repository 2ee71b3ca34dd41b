"""What crosses an edge: tensor headers, the manifest and its digest, and packing into one region.

A payload is the tensors of one request on one edge, packed back to back into one contiguous region.
Each non-empty tensor starts at a multiple of :data:`ALIGNMENT` bytes from the region's start (so a view of
any dtype is aligned, and CPU/GPU copies run on cache-line boundaries); the only padding is the gap that
alignment needs, and it is written as zeros. The payload ends with the last tensor's last byte.

The manifest's digest is xxh3-128 over a canonical preamble (edge, request id, every header) followed by
the xxh3-128 digest of each tensor's bytes. Every payload byte is hashed exactly once (per tensor), the
per-tensor digests travel in the manifest so a mismatch can name the tensor, and changing the edge, the
request id or any header field changes the digest.
"""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import xxhash
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.plan.model import PAYLOAD_ALIGNMENT as ALIGNMENT  # the planner sizes slots with the same layout
from engine.plan.model import align as aligned

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
        "complex64", "complex128",
        "int64", "int32", "int16", "int8", "uint8", "bool",
    )
}
"""Dtypes an edge can carry, by the name used in headers."""

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class TensorHeader(BaseModel):
    """Where one tensor lies in a payload and how to view it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="tensor name as the consuming stage declares it")
    dtype: str = Field(description="dtype name, one of engine.transport.manifest.DTYPES")
    shape: tuple[int, ...] = Field(description="tensor shape")
    offset: int = Field(ge=0, description=f"byte offset from the payload start, a multiple of {ALIGNMENT} unless empty")
    nbytes: int = Field(ge=0, description="byte length of the tensor's data")

    @model_validator(mode="after")
    def _consistent(self) -> TensorHeader:
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        expected = math.prod(self.shape) * DTYPES[self.dtype].itemsize
        if self.nbytes != expected:
            raise ValueError(f"tensor {self.name!r}: {self.nbytes} bytes, but {self.dtype} {self.shape} needs {expected}")
        return self


class Manifest(BaseModel):
    """The small control message that tells a receiver what a sender wrote into a slot."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    edge: str = Field(min_length=1, description="edge name")
    request_id: str = Field(min_length=1, description="request the payload belongs to")
    slot: int = Field(ge=0, description="slot of the receiver's pool the payload was written into")
    generation: int = Field(ge=0, description="generation of the slot the grant was issued for")
    nbytes: int = Field(ge=0, description="payload length in bytes, alignment gaps included")
    tensors: tuple[TensorHeader, ...] = Field(description="one header per tensor, in payload order")
    tensor_digests: tuple[str, ...] = Field(description="xxh3-128 hex digest of each tensor's bytes")
    digest: str = Field(min_length=32, max_length=32, description="xxh3-128 hex digest binding all of the above")


class SlotGrant(BaseModel):
    """What a receiver hands a sender: where to write one request's payload."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    edge: str = Field(min_length=1, description="edge name")
    request_id: str = Field(min_length=1, description="request the slot is granted to")
    slot: int = Field(ge=0, description="slot index in the receiver's pool")
    generation: int = Field(ge=0, description="slot generation; bumped by every fence")
    offset: int = Field(ge=0, description="byte offset of the slot from the pool base")
    capacity: int = Field(gt=0, description="slot size in bytes")
    location: dict[str, Any] = Field(description="the receiver's location (transport specific, JSON)")


def dtype_name(dtype: torch.dtype) -> str:
    """The header name of ``dtype``; raises ValueError for a dtype an edge cannot carry."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot cross an edge; supported: {', '.join(DTYPES)}") from None


def layout(tensors: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
    """``(offset, nbytes)`` of each tensor in a payload; an empty tensor takes no space and no padding."""
    spans, end = [], 0
    for tensor in tensors.values():
        nbytes = tensor.numel() * tensor.element_size()
        offset = aligned(end) if nbytes else end
        spans.append((offset, nbytes))
        end = offset + nbytes
    return spans


def payload_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes :func:`pack` will use for ``tensors`` (what a sender asks a slot for)."""
    return max((offset + nbytes for offset, nbytes in layout(tensors)), default=0)


def headers_for(tensors: Mapping[str, torch.Tensor]) -> tuple[TensorHeader, ...]:
    """The headers :func:`pack` writes for ``tensors``, without packing them."""
    return tuple(
        TensorHeader(name=name, dtype=dtype_name(tensor.dtype), shape=tuple(tensor.shape), offset=offset, nbytes=nbytes)
        for (name, tensor), (offset, nbytes) in zip(tensors.items(), layout(tensors))
    )


def as_bytes(buffer: Any) -> torch.Tensor:
    """A flat uint8 CPU tensor over ``buffer`` (a uint8 tensor, or any writable buffer-protocol object)."""
    if isinstance(buffer, torch.Tensor):
        if buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise ValueError(f"a byte buffer must be a 1-d uint8 tensor, got {buffer.dtype} {tuple(buffer.shape)}")
        return buffer
    if memoryview(buffer).nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(buffer, dtype=torch.uint8)


def pack(tensors: Mapping[str, torch.Tensor], buffer: Any) -> tuple[TensorHeader, ...]:
    """Copy ``tensors`` back to back into ``buffer`` (one copy per tensor) and return their headers.

    Tensors may live on any device; a CUDA tensor is copied device-to-host into the buffer (pinned when
    the buffer is a sender's staging buffer). Raises ValueError if the payload does not fit.
    """
    out = as_bytes(buffer)
    headers = headers_for(tensors)
    total = max((h.offset + h.nbytes for h in headers), default=0)
    if total > out.numel():
        raise ValueError(f"payload of {total} bytes does not fit a buffer of {out.numel()} bytes")
    end = 0
    for header, tensor in zip(headers, tensors.values()):
        if header.offset > end:
            out[end : header.offset].zero_()
        if header.nbytes:
            _copy_bytes(out, header.offset, tensor.detach().contiguous(), header.nbytes)
        end = header.offset + header.nbytes
    return headers


def _copy_bytes(out: torch.Tensor, offset: int, src: torch.Tensor, nbytes: int) -> None:
    """Copy a contiguous tensor's bytes to ``out[offset:]``.

    A CPU tensor goes through one ``memmove`` (which releases the GIL): torch's own copy splits the work
    across its intra-op threads, which on a busy host runs at a fraction of memcpy speed.
    """
    if src.device.type == "cpu":
        ctypes.memmove(out.data_ptr() + offset, src.data_ptr(), nbytes)
    else:
        out[offset : offset + nbytes].copy_(src.reshape(-1).view(torch.uint8))


def unpack(buffer: Any, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Zero-copy views of the manifest's tensors over ``buffer`` (the payload's first byte at index 0)."""
    data = as_bytes(buffer)
    views = {}
    for header in manifest.tensors:
        dtype = DTYPES[header.dtype]
        if header.nbytes == 0:  # no bytes to view, and an unaligned empty slice cannot change dtype
            views[header.name] = torch.empty(header.shape, dtype=dtype)
            continue
        views[header.name] = data[header.offset : header.offset + header.nbytes].view(dtype).reshape(header.shape)
    return views


def tensor_digests(payload: Any, headers: Sequence[TensorHeader]) -> tuple[str, ...]:
    """xxh3-128 hex digest of each tensor's bytes in ``payload`` (a buffer-protocol object or uint8 tensor)."""
    view = memoryview(payload.numpy() if isinstance(payload, torch.Tensor) else payload).cast("B")
    return tuple(xxhash.xxh3_128_hexdigest(view[h.offset : h.offset + h.nbytes]) for h in headers)


def combine(edge: str, request_id: str, headers: Sequence[TensorHeader], digests: Sequence[str]) -> str:
    """The manifest digest from the per-tensor digests, bound to the edge, request and headers."""
    preamble = json.dumps(
        {"edge": edge, "request_id": request_id, "tensors": [h.model_dump(mode="json") for h in headers]},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    hasher = xxhash.xxh3_128(len(preamble).to_bytes(8, "little"))
    hasher.update(preamble)
    for value in digests:
        hasher.update(bytes.fromhex(value))
    return hasher.hexdigest()


def digest(payload: Any, edge: str, request_id: str, headers: Sequence[TensorHeader]) -> str:
    """xxh3-128 over the payload bytes, bound to ``edge``, ``request_id`` and ``headers``."""
    return combine(edge, request_id, headers, tensor_digests(payload, headers))
