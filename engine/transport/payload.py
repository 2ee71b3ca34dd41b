"""Putting tensors into a payload and hashing them, on several cores, in one pass over the bytes.

A tensor's digest is xxh3-128 over the xxh3-128 digests of its bytes cut into :data:`CHUNK_BYTES` chunks
(the last one shorter; an empty tensor has no chunk). Chunks make the work divisible: a large payload is
hashed on several threads (xxhash and ``memmove`` release the GIL), and a sender that copies a payload
hashes each chunk right after copying it, while the chunk is still in cache, instead of reading the whole
payload a second time. The digest of a tensor is the same whether it is computed from the sender's tensor
or from the receiver's slot, which is what lets a sender hash its tensors while the transfer engine moves
them, and lets a receiver hash the part of a payload that has landed while the rest still moves
(:func:`hash_ahead`). :func:`engine.transport.manifest.combine` binds the per-tensor digests to the edge,
request and headers.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from engine.transport.manifest import DTYPES, Manifest, TensorHeader, headers_for

CHUNK_BYTES = 1 << 20
"""Bytes per hashed chunk: large enough that per-chunk overhead vanishes, small enough to stay in L2."""
PARALLEL_BYTES = 8 << 20
"""Payloads smaller than this are copied and hashed on the calling thread alone."""
WORKERS = max(1, min(4, os.cpu_count() or 1))
"""Threads that share a large payload's chunks (the calling thread is one of them)."""

_pool = ThreadPoolExecutor(max(1, WORKERS - 1), thread_name_prefix="engine-payload")  # threads start on first use


@dataclass(frozen=True)
class _Chunk:
    tensor: int  # index of the tensor the chunk belongs to
    data: memoryview  # the chunk's bytes where they are hashed (after the copy, if any)
    copy: tuple[int, int] | None = None  # (destination address, source address) of a CPU copy to make first


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor (any dtype, any shape) as a flat memoryview, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def as_bytes(buffer: Any) -> torch.Tensor:
    """A flat uint8 CPU tensor over ``buffer`` (a uint8 tensor, or any writable buffer-protocol object)."""
    if isinstance(buffer, torch.Tensor):
        if buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise ValueError(f"a byte buffer must be a 1-d uint8 tensor, got {buffer.dtype} {tuple(buffer.shape)}")
        return buffer
    if memoryview(buffer).nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(buffer, dtype=torch.uint8)


def cpu_sources(tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor as a contiguous CPU tensor: the tensor itself when it already is one, else a copy."""
    return [t.detach().to("cpu").contiguous() for t in tensors.values()]


def tensor_digests(
    payload: Any, headers: Sequence[TensorHeader], known: Mapping[tuple[int, int], Future[bytes]] | None = None
) -> tuple[str, ...]:
    """The digest of each tensor whose bytes lie in ``payload`` (a uint8 tensor or buffer) at ``headers``.

    ``known`` maps ``(start, stop)`` chunk spans to digests already being computed (see :func:`hash_ahead`);
    a chunk found there is not hashed again.
    """
    view, known = byte_view(as_bytes(payload)), known or {}
    spans = [(index, span) for index, header in enumerate(headers) for span in _spans(header.offset, header.nbytes)]
    computed = iter(_run([_Chunk(index, view[a:b]) for index, (a, b) in spans if (a, b) not in known], True))
    hashed = [known[span].result() if span in known else next(computed) for _, span in spans]
    return _fold(len(headers), [index for index, _ in spans], hashed)


def hash_ahead(payload: memoryview, ranges: Sequence[tuple[int, int]]) -> dict[tuple[int, int], Future[bytes]]:
    """Start hashing ``ranges`` of ``payload`` chunk by chunk in the background; the futures by chunk span.

    Each range must start where a tensor or one of its chunks starts, so its chunks are the tensor's.
    """
    spans = [span for start, stop in ranges for span in _spans(start, stop - start)]
    return {span: _pool.submit(xxhash.xxh3_128_digest, payload[span[0] : span[1]]) for span in spans}


def source_digests(sources: Sequence[torch.Tensor]) -> tuple[str, ...]:
    """The digest of each contiguous CPU tensor, read where it lies (what the payload will carry)."""
    chunks = [
        _Chunk(index, view[start:stop])
        for index, view in enumerate(byte_view(source) for source in sources)
        for start, stop in _spans(0, len(view))
    ]
    return _fold(len(sources), [c.tensor for c in chunks], _run(chunks, True))


def pack(
    tensors: Mapping[str, torch.Tensor], buffer: Any, *, hashing: bool = False
) -> tuple[tuple[TensorHeader, ...], tuple[str, ...]]:
    """Copy ``tensors`` back to back into ``buffer``; return their headers and, when ``hashing``, their digests.

    CPU tensors are copied chunk by chunk, each chunk hashed right after its copy, on several threads for
    a large payload. A CUDA tensor is copied device-to-host in one go (into pinned memory when ``buffer``
    is a sender's staging buffer) and then hashed. Alignment gaps are zeroed. Raises ValueError if the
    payload does not fit.
    """
    out = as_bytes(buffer)
    headers = headers_for(tensors)
    total = max((h.offset + h.nbytes for h in headers), default=0)
    if total > out.numel():
        raise ValueError(f"payload of {total} bytes does not fit a buffer of {out.numel()} bytes")
    view, base = byte_view(out), out.data_ptr()
    sources, chunks, end = [], [], 0
    for index, (header, tensor) in enumerate(zip(headers, tensors.values())):
        if header.offset > end:
            out[end : header.offset].zero_()
        end = header.offset + header.nbytes
        if not header.nbytes:
            continue
        tensor, at = tensor.detach(), None
        if tensor.device.type == "cpu":
            source = tensor.contiguous()
            sources.append(source)  # alive until the copies are done
            at = source.data_ptr() - header.offset  # where payload byte 0 would be
        else:
            out[header.offset : end].copy_(tensor.reshape(-1).view(torch.uint8))
        chunks += [
            _Chunk(index, view[start:stop], None if at is None else (base + start, at + start))
            for start, stop in _spans(header.offset, header.nbytes)
        ]
    hashed = _run(chunks, hashing)
    return headers, (_fold(len(headers), [c.tensor for c in chunks], hashed) if hashing else ())


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


def _spans(offset: int, nbytes: int) -> list[tuple[int, int]]:
    return [(start, min(start + CHUNK_BYTES, offset + nbytes)) for start in range(offset, offset + nbytes, CHUNK_BYTES)]


def _fold(count: int, owners: Sequence[int], hashed: Sequence[bytes | None]) -> tuple[str, ...]:
    """Per tensor: xxh3-128 over its chunks' digests in order (``owners[i]``: the tensor of chunk i)."""
    parts: list[list[bytes]] = [[] for _ in range(count)]
    for owner, value in zip(owners, hashed):
        parts[owner].append(value)
    return tuple(xxhash.xxh3_128_hexdigest(b"".join(values)) for values in parts)


def _work(chunks: Sequence[_Chunk], hashing: bool) -> list[bytes | None]:
    out: list[bytes | None] = []
    for chunk in chunks:
        if chunk.copy is not None:
            ctypes.memmove(chunk.copy[0], chunk.copy[1], len(chunk.data))
        out.append(xxhash.xxh3_128_digest(chunk.data) if hashing else None)
    return out


def _run(chunks: list[_Chunk], hashing: bool) -> list[bytes | None]:
    """Copy and/or hash ``chunks``: on this thread for a small payload, else split among WORKERS threads."""
    total = sum(len(chunk.data) for chunk in chunks)
    if WORKERS == 1 or total < PARALLEL_BYTES:
        return _work(chunks, hashing)
    groups, group, filled = [], [], 0
    share = total / WORKERS
    for chunk in chunks:
        group.append(chunk)
        filled += len(chunk.data)
        if filled >= share * (len(groups) + 1) and len(groups) < WORKERS - 1:
            groups.append(group)
            group = []
    groups.append(group)
    futures = [_pool.submit(_work, g, hashing) for g in groups[1:]]
    results = _work(groups[0], hashing)
    for future in futures:
        results += future.result()
    return results
