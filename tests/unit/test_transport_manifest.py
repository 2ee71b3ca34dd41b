"""Packing, unpacking and the digests of edge payloads."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xxhash

from engine.transport import payload
from engine.transport.manifest import ALIGNMENT, DTYPES, Manifest, SlotGrant, TensorHeader, combine, payload_nbytes
from engine.transport.payload import CHUNK_BYTES, pack, source_digests, tensor_digests, unpack


def make_manifest(tensors, buffer, *, edge="phase1", request_id="req-1") -> Manifest:
    headers, digests = pack(tensors, buffer, hashing=True)
    return Manifest(
        edge=edge, request_id=request_id, slot=0, generation=0, nbytes=payload_nbytes(tensors),
        tensors=headers, tensor_digests=digests, digest=combine(edge, request_id, headers, digests),
    )


def test_bf16_round_trips_bit_exact_including_nan_payloads():
    raw = torch.randint(-(2**15), 2**15, (257,), dtype=torch.int16)
    tensors = {"latents": raw.view(torch.bfloat16).reshape(1, 257)}
    buffer = bytearray(payload_nbytes(tensors))
    manifest = make_manifest(tensors, buffer)
    out = unpack(buffer, manifest)["latents"]
    assert out.dtype == torch.bfloat16 and out.shape == (1, 257)
    assert torch.equal(out.view(torch.int16).reshape(-1), raw)


def test_unpack_returns_views_into_the_buffer_without_copying():
    tensors = {"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, 4, dtype=torch.float16)}
    buffer = torch.zeros(payload_nbytes(tensors), dtype=torch.uint8)
    manifest = make_manifest(tensors, buffer)
    views = unpack(buffer, manifest)
    buffer[manifest.tensors[0].offset : manifest.tensors[0].offset + 4] = 0
    assert views["a"][0].item() == 0.0 and views["a"][1].item() == 1.0
    assert views["b"].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def test_tensors_are_aligned_and_only_alignment_pads():
    tensors = {"x": torch.ones(3, dtype=torch.int8), "y": torch.ones(5, dtype=torch.float64), "z": torch.ones(0)}
    headers, digests = pack(tensors, bytearray(payload_nbytes(tensors)))
    assert digests == ()
    assert [h.offset for h in headers] == [0, ALIGNMENT, ALIGNMENT + 40]
    assert payload_nbytes(tensors) == ALIGNMENT + 40
    assert [h.nbytes for h in headers] == [3, 40, 0]


def test_pack_refuses_a_buffer_too_small():
    with pytest.raises(ValueError, match="does not fit"):
        pack({"x": torch.ones(100)}, bytearray(399))


def test_unsupported_dtype_is_named():
    with pytest.raises(ValueError, match="cannot cross an edge"):
        pack({"x": torch.ones(2, dtype=torch.uint16)}, bytearray(64))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 7), min_size=0, max_size=3)),
        min_size=1, max_size=5,
    )
)
def test_any_tensors_round_trip_byte_exact(specs):
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i, (name, shape) in enumerate(specs):
        dtype = DTYPES[name]
        nbytes = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
        tensors[f"t{i}"] = raw.view(dtype).reshape(shape)
    buffer = bytearray(payload_nbytes(tensors))
    manifest = make_manifest(tensors, buffer)
    for name, view in unpack(buffer, manifest).items():
        assert view.dtype == tensors[name].dtype and view.shape == tensors[name].shape
        assert bytes(view.reshape(-1).view(torch.uint8).numpy()) == bytes(tensors[name].reshape(-1).view(torch.uint8).numpy())


def digest(buffer, edge, request_id, headers) -> str:
    return combine(edge, request_id, headers, tensor_digests(buffer, headers))


def test_digest_binds_edge_request_and_every_header_field():
    tensors = {"a": torch.arange(16, dtype=torch.float32), "b": torch.arange(8, dtype=torch.int64)}
    buffer = bytearray(payload_nbytes(tensors))
    headers, _ = pack(tensors, buffer)
    base = digest(buffer, "phase1", "req-1", headers)
    assert digest(buffer, "phase1", "req-1", headers) == base
    assert digest(buffer, "phase2", "req-1", headers) != base
    assert digest(buffer, "phase1", "req-2", headers) != base
    changes = {"name": "c", "dtype": "int32", "shape": (4, 4), "offset": 64, "nbytes": 60}
    for field, value in changes.items():
        tampered = (headers[0].model_copy(update={field: value}), headers[1])
        assert digest(buffer, "phase1", "req-1", tampered) != base, field
    buffer[headers[1].offset] ^= 0x01
    assert digest(buffer, "phase1", "req-1", headers) != base


def reference_digest(data: bytes) -> str:
    """A tensor's digest as the manifest documents it: xxh3-128 over the xxh3-128 of each 1 MiB chunk."""
    chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
    return xxhash.xxh3_128_hexdigest(b"".join(xxhash.xxh3_128_digest(c) for c in chunks))


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_digests_follow_the_chunked_definition_from_slot_and_from_source(monkeypatch, workers):
    monkeypatch.setattr(payload, "WORKERS", workers)
    gen = torch.Generator().manual_seed(3)
    tensors = {  # 0, 1 and 7 chunks + a partial one, with gaps; large enough to be split among threads
        "empty": torch.empty(0, dtype=torch.float16),
        "mask": torch.randint(0, 2, (999,), generator=gen).bool(),
        "latents": torch.randn(7 * CHUNK_BYTES // 2 + 3, generator=gen).to(torch.bfloat16),
        "embeds": torch.randn(2 * CHUNK_BYTES // 4 + 5, generator=gen),
        "big": torch.randn(9 * CHUNK_BYTES // 4, generator=gen),
    }
    buffer = torch.full((payload_nbytes(tensors),), 0xAB, dtype=torch.uint8)
    headers, packed = pack(tensors, buffer, hashing=True)
    expected = tuple(reference_digest(t.reshape(-1).view(torch.uint8).numpy().tobytes()) for t in tensors.values())
    assert packed == expected
    assert tensor_digests(buffer, headers) == expected
    assert source_digests(payload.cpu_sources(tensors)) == expected
    assert buffer[headers[1].offset + headers[1].nbytes : headers[2].offset].eq(0).all()  # gaps zeroed
    buffer[headers[2].offset + 5 * CHUNK_BYTES + 17] ^= 0x10  # one bit, deep inside a later chunk
    changed = tensor_digests(buffer, headers)
    assert [a != b for a, b in zip(changed, expected)] == [False, False, True, False, False]


def test_digest_is_xxh3_128_hex():
    tensors = {"a": torch.ones(4)}
    buffer = bytearray(payload_nbytes(tensors))
    value = digest(buffer, "e", "r", pack(tensors, buffer)[0])
    assert len(value) == 32 and int(value, 16) >= 0


def test_manifest_and_grant_round_trip_as_json_and_forbid_unknown_keys():
    tensors = {"a": torch.ones(2, 3, dtype=torch.bfloat16)}
    manifest = make_manifest(tensors, bytearray(payload_nbytes(tensors)))
    assert Manifest.model_validate_json(manifest.model_dump_json()) == manifest
    grant = SlotGrant(edge="e", request_id="r", slot=1, generation=2, offset=4096, capacity=4096,
                      location={"transport": "shm", "segment": "x", "size": 8192})
    assert SlotGrant.model_validate_json(grant.model_dump_json()) == grant
    data = json.loads(manifest.model_dump_json())
    data["extra"] = 1
    with pytest.raises(ValueError):
        Manifest.model_validate(data)
    with pytest.raises(ValueError):
        TensorHeader(name="a", dtype="float32", shape=(1,), offset=-1, nbytes=4)
    with pytest.raises(ValueError, match="needs 8"):
        TensorHeader(name="a", dtype="float32", shape=(2,), offset=0, nbytes=4)
    with pytest.raises(ValueError, match="is not one of"):
        TensorHeader(name="a", dtype="float31", shape=(1,), offset=0, nbytes=4)
