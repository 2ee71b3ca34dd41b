"""The fragmented-MP4 writer: playable at every fragment boundary, the final file's frames, a file that grows
fragment by fragment while a reader follows it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import av
import numpy as np
import pytest

from engine.stream.boxes import playable_end
from engine.stream.fmp4 import FragmentedMp4Writer, to_levels
from engine.stream.follow import FileWatch, follow_growing
from nodes.wan.output import encode_mp4
from tests.stream_support import decode, frames_at_each_cut, level_error, top_boxes

CHUNKS = (1, 4, 4, 4)  #: frames per chunk as the Wan decoder makes them (13 frames from 4 latent frames)
HEIGHT, WIDTH, FPS = 48, 64, 16


def clip(frames: int = sum(CHUNKS)) -> np.ndarray:
    """A moving colour gradient, [F, H, W, 3] uint8: smooth like decoded video, different in every frame."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    out = [np.stack([0.5 + 0.4 * np.sin((x + 3 * t) / 11), y / HEIGHT, 0.5 + 0.4 * np.sin((x + y) / 9 + t / 3)], -1)
           for t in range(frames)]
    return to_levels(np.stack(out))


def write(path: Path, frames: np.ndarray, chunks=CHUNKS) -> list[int]:
    """Write ``frames`` in ``chunks``; the file's size after each chunk."""
    sizes, start = [], 0
    with FragmentedMp4Writer(path, FPS) as writer:
        for count in chunks:
            writer.add(frames[start:start + count])
            start += count
            sizes.append(path.stat().st_size)
    return sizes


def test_the_stream_plays_at_every_fragment_boundary(tmp_path):
    frames = clip()
    path = tmp_path / "a.stream.mp4"
    write(path, frames)
    data = path.read_bytes()
    boxes = top_boxes(data)
    assert [kind for kind, *_ in boxes[:2]] == [b"ftyp", b"moov"]
    assert [kind for kind, *_ in boxes].count(b"moof") == len(CHUNKS)  # one fragment per chunk
    assert frames_at_each_cut(data) == [sum(CHUNKS[:k + 1]) for k in range(len(CHUNKS))]
    with av.open(path) as container:  # each fragment opens with a keyframe
        keys = [packet.is_keyframe for packet in container.demux(video=0) if packet.size]
    assert [i for i, key in enumerate(keys) if key] == [sum(CHUNKS[:k]) for k in range(len(CHUNKS))]


def test_its_frames_are_the_final_files_frames_within_the_compression_noise(tmp_path):
    """Both files are lossy H.264 yuv420p of the same frames at the same quality (crf 23), so they cannot be equal
    bit for bit: the stream's encoder has no lookahead and a keyframe per chunk, so its bits go elsewhere. The bound:
    decoded, the two differ by less than 4 levels of 255 on average (at this tiny size the 4:2:0 chroma dominates:
    each is 3-4 levels from the frames themselves), and the stream is no farther from the frames than the final
    file is, give or take a level."""
    frames = clip()
    write(tmp_path / "a.stream.mp4", frames)
    encode_mp4(frames, tmp_path / "a.mp4", FPS)
    streamed, final = decode((tmp_path / "a.stream.mp4").read_bytes()), decode((tmp_path / "a.mp4").read_bytes())
    assert streamed.shape == final.shape == frames.shape
    assert level_error(streamed, final) < 4.0
    assert level_error(streamed, frames) <= level_error(final, frames) + 1.0


def test_fragments_reach_the_file_one_chunk_later_and_the_last_at_close(tmp_path):
    path = tmp_path / "a.stream.mp4"
    sizes = write(path, clip())
    with path.open("rb") as file:
        ends = [playable_end(file, 0, size) for size in sizes]
        final = playable_end(file, 0, path.stat().st_size)
    assert ends[0] > 0  # the init segment is there at once
    assert ends[0] < ends[1] < ends[2] < ends[3] < final  # then each chunk's fragment as the next one starts
    with path.open("rb") as file:
        assert len(decode(file.read(ends[1]))) == CHUNKS[0]


def test_a_writer_closed_midway_leaves_a_playable_video(tmp_path):
    path = tmp_path / "a.stream.mp4"
    writer = FragmentedMp4Writer(path, FPS)
    writer.add(clip()[:5])
    writer.close()
    writer.close()
    assert len(decode(path.read_bytes())) == 5
    FragmentedMp4Writer(tmp_path / "none.mp4", FPS).close()
    assert not (tmp_path / "none.mp4").exists()


def test_a_chunk_of_the_wrong_kind_is_refused(tmp_path):
    with FragmentedMp4Writer(tmp_path / "a.mp4", FPS) as writer:
        with pytest.raises(ValueError, match=r"\[frames, height, width, 3\] uint8; got float32"):
            writer.add(np.zeros((1, 8, 8, 3), np.float32))
        writer.add(np.zeros((1, 8, 8, 3), np.uint8))
        with pytest.raises(ValueError, match="chunk of 16x8 in a 8x8 video"):
            writer.add(np.zeros((1, 8, 16, 3), np.uint8))


def test_the_playable_end_stops_before_a_box_being_written(tmp_path):
    path = tmp_path / "a.stream.mp4"
    write(path, clip())
    data = path.read_bytes()
    boxes = top_boxes(data)
    moov_end = next(end for kind, _, end in boxes if kind == b"moov")
    first_mdat_end = next(end for kind, _, end in boxes if kind == b"mdat")
    with path.open("rb") as file:
        assert playable_end(file, 0, moov_end - 1) == 0  # no init segment yet
        assert playable_end(file, 0, moov_end + 10) == moov_end  # a moof begun
        assert playable_end(file, 0, first_mdat_end - 1) == moov_end  # a moof without its whole mdat
        assert playable_end(file, 0, first_mdat_end) == first_mdat_end
        assert playable_end(file, moov_end, first_mdat_end) == first_mdat_end  # resumed from a boundary


def test_a_reader_follows_the_growing_file_until_it_is_finished(tmp_path):
    """The reader is woken by the writes (inotify), hands on only playable bytes, and after ``finished`` reads the
    rest: what it read is the whole file, in pieces as it grew (the writer adds a chunk once the reader got the
    last one's bytes)."""
    path = tmp_path / "a.stream.mp4"
    frames = clip()
    finished, got = threading.Event(), threading.Event()

    def writer() -> None:
        start = 0
        with FragmentedMp4Writer(path, FPS) as stream:
            for count in CHUNKS:
                stream.add(frames[start:start + count])
                start += count
                assert got.wait(10.0), "the reader got nothing of the file written so far"
                got.clear()
        finished.set()

    async def read() -> list[bytes]:
        pieces = []
        thread = threading.Thread(target=writer)
        thread.start()
        async for data in follow_growing(path, finished.is_set, asyncio.Event()):
            pieces.append(data)
            got.set()
        await asyncio.to_thread(thread.join)
        return pieces

    pieces = asyncio.run(read())
    assert b"".join(pieces) == path.read_bytes()
    assert len(pieces) >= len(CHUNKS) + 1  # the init segment, then fragment after fragment
    assert [len(decode(b"".join(pieces[:n]))) for n in (2, 3, 4)] == [1, 5, 9]


def test_a_write_to_the_file_wakes_its_watcher_and_other_files_do_not(tmp_path):
    async def watch() -> tuple[bool, bool]:
        wake = asyncio.Event()
        watcher = FileWatch(tmp_path, "a.stream.mp4", wake)
        try:
            (tmp_path / "other.mp4").write_bytes(b"x")
            await asyncio.sleep(0.05)
            other = wake.is_set()
            (tmp_path / "a.stream.mp4").write_bytes(b"x")
            async with asyncio.timeout(5.0):
                await wake.wait()
            return other, wake.is_set()
        finally:
            watcher.close()

    assert asyncio.run(watch()) == (False, True)


def test_a_file_written_again_from_the_start_ends_its_readers_stream(tmp_path):
    """A request run again (its worker died) rewrites its stream file: a reader cannot take back what it sent, so its
    stream ends there (a playable prefix of the first attempt's video)."""
    path = tmp_path / "a.stream.mp4"
    write(path, clip())
    first = path.read_bytes()

    async def read() -> bytes:
        received = b""
        async with asyncio.timeout(10):
            async for data in follow_growing(path, lambda: False, asyncio.Event()):
                received += data
                path.write_bytes(first[:100])  # the new attempt's first bytes
        return received

    received = asyncio.run(read())
    assert received == first and len(decode(received)) == sum(CHUNKS)
