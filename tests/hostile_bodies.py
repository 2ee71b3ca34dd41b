"""Request bodies an outsider sends to break the service, each with the 4xx it must get instead: shared by the
unit tests (the app in-process) and the integration tests (a real ``engine serve``)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

JSON = {"content-type": "application/json"}
CHUNK = 1 << 20


@dataclass(frozen=True)
class Hostile:
    """A request (httpx keyword arguments) and the answer it wants: status, and words the error message holds."""

    name: str
    send: dict[str, Any] = field(repr=False)
    status: int
    says: str

    def check(self, answer: Any) -> None:
        assert answer.status_code == self.status, (self.name, answer.status_code, answer.text[:300])
        error = answer.json()["error"]
        assert self.says in error["message"], (self.name, error)
        assert "Traceback" not in answer.text


def chunked(total: int, head: bytes = b"") -> Iterator[bytes]:
    """``total`` bytes as a stream (httpx sends it chunked, without Content-Length)."""
    yield head
    for start in range(len(head), total, CHUNK):
        yield b"a" * min(CHUNK, total - start)


def json_bodies() -> list[Hostile]:
    """Bodies for a JSON endpoint (POST /v1/videos, /v1/images/generations)."""
    boundary = "x" * 8
    file_head = (f'--{boundary}\r\nContent-Disposition: form-data; name="input_reference"; filename="a.png"\r\n'
                 'Content-Type: image/png\r\n\r\n').encode()
    return [
        Hostile("JSON nested 100,000 deep", {"content": b"[" * 100_000 + b"]" * 100_000, "headers": JSON}, 400,
                "nested too deep"),
        Hostile("a 5000-digit integer", {"content": b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "headers": JSON},
                400, "an integer of 5000 digits"),
        Hostile("NaN", {"content": b'{"prompt": "x", "guidance_scale": NaN}', "headers": JSON}, 400, "NaN"),
        Hostile("a key given twice", {"content": b'{"prompt": "x", "prompt": "y"}', "headers": JSON}, 400,
                "'prompt' is given twice"),
        Hostile("a form field given twice", {"data": {"prompt": ["x", "y"]}}, 422, "prompt: given twice"),
        Hostile("a multipart body without a boundary", {"content": b"--x\r\n\r\n",
                                                        "headers": {"content-type": "multipart/form-data"}}, 400,
                "malformed form data"),
        Hostile("a multipart body with a broken boundary", {"content": b"--y\r\nnot a part",
                                                            "headers": {"content-type": "multipart/form-data; boundary=x"}},
                400, "malformed form data"),
        Hostile("50 MB of multipart sent chunked", {"content": chunked(50 << 20, file_head),
                                                    "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}},
                413, "the request body is over"),
        Hostile("a field of infinity in a form", {"data": {"prompt": "x", "guidance_scale": "inf"}}, 422,
                "guidance_scale"),
    ]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int = 16, height: int = 16, *, extra: bytes = b"", idat: bytes | None = None) -> bytes:
    """A grey RGB PNG with valid checksums; ``extra`` chunks before its data, ``idat`` instead of its data."""
    rows = b"".join(b"\0" + b"\x80" * (width * 3) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + extra
            + _chunk(b"IDAT", zlib.compress(rows) if idat is None else idat) + _chunk(b"IEND", b""))


def bomb(kind: bytes) -> bytes:
    """A PNG under 64 KB whose zTXt or iCCP chunk inflates to 60 MB."""
    return png(extra=_chunk(kind, b"k\0\0" + zlib.compress(b"\0" * (60 << 20), 9)))


def image_bodies(field_name: str, fields: dict[str, str]) -> list[Hostile]:
    """Bodies for an endpoint taking an image in ``field_name`` (with the other ``fields`` of a valid job)."""
    def upload(data: bytes) -> dict[str, Any]:
        return {"data": fields, "files": {field_name: ("in.png", data, "image/png")}}

    return [
        Hostile("a zTXt decompression bomb", upload(bomb(b"zTXt")), 422, "not a readable image"),
        Hostile("an iCCP decompression bomb", upload(bomb(b"iCCP")), 422, "not a readable image"),
        Hostile("a PNG with valid checksums and corrupt data", upload(png(idat=b"\x78\x9c" + b"\xff" * 64)), 422,
                "not a readable image"),
        Hostile("an image given twice", {"data": fields, "files": [(field_name, ("a.png", png(), "image/png")),
                                                                   (field_name, ("b.png", png(), "image/png"))]},
                422, f"{field_name}: given twice"),
        Hostile("a valid image with a field refused", {"data": {**fields, "seed": "seven"},
                                                       "files": {field_name: ("in.png", png(), "image/png")}}, 422, "seed"),
    ]

