"""Stream chunks from a remote decoder: their delivery keys, what the collector admits, the decoder's sink."""

from __future__ import annotations

import pytest
import torch

from engine.stream import listening, stream_sink
from engine.stream.remote import ChunkSender, chunk_expected, chunk_key, chunk_of
from engine.transport.expect import Expected, mismatch
from engine.transport.manifest import Manifest, TensorHeader


def test_a_chunk_key_names_its_request_and_index_and_a_request_id_names_none():
    assert chunk_key("video_0123456789abcdef01234567", 3) == "video_0123456789abcdef01234567.stream-3"
    assert chunk_of("video_0123456789abcdef01234567.stream-3") == ("video_0123456789abcdef01234567", 3)
    assert chunk_of("video_0123456789abcdef01234567") is None and chunk_of("r1.stream-") is None
    assert chunk_key("x" * 60, 0) is None  # past the 64 characters of a request id: that request does not stream


def manifest(shape: tuple[int, ...]) -> Manifest:
    nbytes = 4
    for dim in shape:
        nbytes *= dim
    header = TensorHeader(name="frames", dtype="float32", shape=shape, offset=0, nbytes=nbytes)
    return Manifest(request_id="r", edge="outputs", slot=0, generation=0, tensors=(header,), nbytes=nbytes,
                    tensor_digests=(), digest="0" * 32)


def test_the_collector_admits_fewer_frames_in_a_chunk_and_nothing_else_different():
    expected = (Expected("frames", "float32", (1, 17, 128, 160, 3), optional=False, variable=()),)
    chunk = chunk_expected(expected)
    assert mismatch(manifest((1, 4, 128, 160, 3)), chunk) is None
    assert mismatch(manifest((1, 4, 128, 160, 3)), expected) is not None  # a chunk is no whole output
    assert "shape [1, 18, 128, 160, 3]" in mismatch(manifest((1, 18, 128, 160, 3)), chunk)
    assert "shape [1, 4, 64, 160, 3]" in mismatch(manifest((1, 4, 64, 160, 3)), chunk)


def test_the_decoders_sink_sends_each_chunk_under_its_key_and_stops_when_dropped():
    sent: list[tuple[str, tuple[int, ...]]] = []
    dropped = []

    def check() -> None:
        if dropped:
            raise RuntimeError("dropped")

    sender = ChunkSender("r1", "frames", lambda key, tensors: sent.append((key, tuple(tensors["frames"].shape))), check)

    def decode() -> str:
        sink = stream_sink()
        sink(torch.zeros(1, 1, 8, 8, 3))
        sink(torch.zeros(1, 4, 8, 8, 3))
        dropped.append(True)
        sink(torch.zeros(1, 4, 8, 8, 3))
        return "done"

    with pytest.raises(RuntimeError, match="dropped"):
        sender.feeding(decode)
    assert sent == [("r1.stream-0", (1, 1, 8, 8, 3)), ("r1.stream-1", (1, 4, 8, 8, 3))]
    assert stream_sink() is None
    with listening(sent.append):
        assert stream_sink() is not None
