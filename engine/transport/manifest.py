"""What crosses an edge: tensor headers, the payload layout, the manifest and its digest.

A payload is the tensors of one request on one edge, packed back to back into one contiguous region
(engine.transport.payload does the packing and hashing).
Each non-empty tensor starts at a multiple of :data:`ALIGNMENT` bytes from the region's start (so a view of
any dtype is aligned, and CPU/GPU copies run on cache-line boundaries); the only padding is the gap that
alignment needs, and it is written as zeros. The payload ends with the last tensor's last byte.

The manifest's digest is xxh3-128 over a canonical preamble (edge, request id, every header) followed by
the digest of each tensor's bytes (see engine.transport.payload). Every payload byte is hashed exactly once,
the per-tensor digests travel in the manifest so a mismatch can name the tensor, and changing the edge, the
request id or any header field changes the digest. An edge with integrity ``none`` sends no per-tensor
digests; its manifest digest still binds the edge, request and headers.
"""

from __future__ import annotations

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
    tensor_digests: tuple[str, ...] = Field(description="digest of each tensor's bytes, hex; empty on an edge without integrity")
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
    """Bytes a payload of ``tensors`` takes (what a sender asks a slot for)."""
    return max((offset + nbytes for offset, nbytes in layout(tensors)), default=0)


def headers_for(tensors: Mapping[str, torch.Tensor]) -> tuple[TensorHeader, ...]:
    """The headers of ``tensors`` in a payload (where each lies, how to view it)."""
    return tuple(
        TensorHeader(name=name, dtype=dtype_name(tensor.dtype), shape=tuple(tensor.shape), offset=offset, nbytes=nbytes)
        for (name, tensor), (offset, nbytes) in zip(tensors.items(), layout(tensors))
    )


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
