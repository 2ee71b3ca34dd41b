"""Reading a job's body strictly: JSON or form fields, and an uploaded image checked down to its last pixel.

Whatever a client sends is refused with an :class:`~engine.serve.api_errors.ApiError` naming what is wrong
(HTTP 4xx), never let through to fail later or raise out of the server: JSON nested too deep for the parser,
integers of thousands of digits, ``NaN`` and ``Infinity``, a key or form field given twice (no silent "last one
wins"), malformed multipart, and images that are not PNG, JPEG or WebP, are too large, carry a compressed bomb in
a text or colour-profile chunk, or have valid checksums around data that does not decode.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from engine.serve.api_errors import ApiError

MAX_INTEGER_DIGITS = 40  #: longer than any field's range (a seed is 64 bits: 20 digits)
IMAGE_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


class _Refused(ValueError):
    """Raised from the JSON parser's hooks; becomes the 400 answer."""


def parse_json_object(data: bytes, image_field: str) -> dict[str, Any]:
    """A JSON body as the fields of a job; ApiError for anything a strict reading refuses."""
    try:
        raw = json.loads(data or b"null", object_pairs_hook=_no_repeated_keys, parse_int=_bounded_int,
                         parse_constant=_no_constant)
    except _Refused as exc:
        raise ApiError(400, f"body: {exc}", param="body") from None
    except RecursionError:
        raise ApiError(400, "body: JSON nested too deep (a job's fields are flat)", param="body") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"body: not valid JSON ({exc})", param="body") from None
    if not isinstance(raw, dict):
        raise ApiError(422, "body: expected a JSON object", param="body")
    if image_field in raw:
        raise ApiError(422, f"{image_field}: send the image as a file in a multipart/form-data body", param=image_field)
    return raw


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _Refused(f"the key {key!r} is given twice")
        found[key] = value
    return found


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        raise _Refused(f"an integer of {digits} digits (at most {MAX_INTEGER_DIGITS})")
    return int(text)


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number JSON allows")


class FormReader:
    """A multipart or URL-encoded body as fields, its one file checked and saved as ``<uploads>/<job id>.<ext>``."""

    def __init__(self, uploads: Path, *, takes_image: bool, max_image_bytes: int, max_image_pixels: int):
        self.uploads, self.takes_image = uploads, takes_image
        self.max_image_bytes, self.max_image_pixels = max_image_bytes, max_image_pixels

    async def read(self, request: Request, image_field: str, job_id: str) -> tuple[dict[str, Any], tuple[str, Path] | None]:
        try:
            async with request.form(max_part_size=self.max_image_bytes) as form:
                fields: dict[str, Any] = {}
                image = None
                for name, value in form.multi_items():
                    if name in fields or (image is not None and name == image[0]):
                        raise ApiError(422, f"{name}: given twice", param=name)
                    if isinstance(value, UploadFile):
                        if name != image_field:
                            raise ApiError(422, f"{name}: no file is expected here (the image goes in {image_field})",
                                           param=name)
                        image = (name, await self._save(value, name, job_id))
                    else:
                        fields[name] = value
        except MultiPartException as exc:
            raise ApiError(400, f"body: malformed form data: {exc.message}", param="body") from None
        except HTTPException as exc:  # Starlette's answer to a malformed multipart body
            raise ApiError(exc.status_code, f"body: malformed form data: {exc.detail}", param="body") from None
        return fields, image

    async def _save(self, upload: UploadFile, field: str, job_id: str) -> Path:
        if not self.takes_image:
            raise ApiError(422, f"{field}: this service's model takes no image", param=field)
        data = await upload.read()
        if len(data) > self.max_image_bytes:
            raise ApiError(413, f"{field}: the image is over {self.max_image_bytes} bytes", param=field)
        suffix = await asyncio.to_thread(check_image_bytes, data, field, self.max_image_pixels)
        path = self.uploads / f"{job_id}{suffix}"
        await asyncio.to_thread(path.write_bytes, data)
        return path


def check_image_bytes(data: bytes, field: str, max_pixels: int) -> str:
    """The file suffix of an uploaded PNG, JPEG or WebP that decodes completely; ApiError (422) for anything else:
    another format, over ``max_pixels``, a decompression bomb in any chunk, corrupt data under valid checksums."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
            if kind not in IMAGE_SUFFIXES:
                raise ApiError(422, f"{field}: a {kind} image; send PNG, JPEG or WebP", param=field)
            if image.width * image.height > max_pixels:
                raise ApiError(422, f"{field}: {image.width}x{image.height} is over {max_pixels} pixels", param=field)
            image.load()  # every pixel: checksums alone pass corrupt data the worker would fail on later
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError, zlib.error, struct.error,
            Image.DecompressionBombError) as exc:
        raise ApiError(422, f"{field}: not a readable image ({exc})", param=field) from None
    return IMAGE_SUFFIXES[kind]
