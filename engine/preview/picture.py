"""From a denoising loop's prediction of the clean latent to a small JPEG, at the steps the open sink asks for.

The loop calls :func:`offer` once per step; without a sink wanting that step it returns at once. The prediction is
computed by the loop's callable on copies (the loop's tensors are read, never written), a few of its frames are
picked (a video's strip: up to :data:`STRIP_FRAMES` latent frames side by side, evenly spaced from first to last),
copied to the CPU, projected to RGB, scaled so a frame's longer side is about :data:`FRAME_SIDE` pixels, and
encoded at falling JPEG qualities, then smaller, until it fits in :data:`MAX_JPEG_BYTES`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from engine.preview.latent_spaces import LatentSpace
from engine.preview.sink import Picture, active

MAX_JPEG_BYTES = 48 << 10  #: the largest preview JPEG (the control message bounds it too: engine.control.messages)
STRIP_FRAMES = 4  #: latent frames of a video shown side by side
FRAME_SIDE = 256  #: a frame's longer side in the picture, in pixels (a latent pixel covers 8 or 16 of the video's)
QUALITIES = (85, 70, 55, 40, 25)  #: JPEG qualities tried in turn before the picture is made smaller


@dataclass(frozen=True)
class Projection:
    """A latent's channels to RGB: a published linear map of its latent space, or, for a latent of no known space
    (channels that match no table), its first three channels, each stretched to [0, 1] (shapes, not colours)."""

    space: LatentSpace | None

    def rgb(self, latent: torch.Tensor) -> torch.Tensor:
        """``latent`` [C, F, H, W] as RGB in [0, 1], [F, H, W, 3] float32."""
        pixels = latent.float().movedim(0, -1)
        if self.space is not None:
            factors = torch.tensor(self.space.factors, dtype=torch.float32, device=pixels.device)
            bias = torch.tensor(self.space.bias, dtype=torch.float32, device=pixels.device)
            return ((pixels @ factors + bias + 1) / 2).clamp(0, 1)
        first = pixels[..., [min(c, pixels.shape[-1] - 1) for c in range(3)]]
        low, high = first.amin(dim=(0, 1, 2)), first.amax(dim=(0, 1, 2))
        return (first - low) / (high - low).clamp_min(1e-6)


def projection_for(channels: int, *spaces: LatentSpace) -> Projection:
    """The projection of the one of ``spaces`` with ``channels`` channels, else of the first three channels."""
    return Projection(next((space for space in spaces if space.channels == channels), None))


def flow_x0(sample: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """A flow-matching step's prediction of the clean sample: ``x_t - sigma * v``, computed anew in float32 (what the
    flow schedulers compute as their x0 before stepping)."""
    return sample.float() - float(sigma) * velocity.float()


def strip_frames(frames: int) -> list[int]:
    """The frames a preview shows: all of up to :data:`STRIP_FRAMES`, else that many evenly spaced, first and last
    included."""
    if frames <= STRIP_FRAMES:
        return list(range(frames))
    return [round(i * (frames - 1) / (STRIP_FRAMES - 1)) for i in range(STRIP_FRAMES)]


def encode_strip(rgb: torch.Tensor) -> tuple[bytes, int, int]:
    """Frames [F, H, W, 3] in [0, 1] side by side as a JPEG of at most :data:`MAX_JPEG_BYTES`: (bytes, width, height)."""
    frames, height, width, _ = rgb.shape
    strip = (rgb.permute(1, 0, 2, 3).reshape(height, frames * width, 3) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(strip, mode="RGB")
    factor = FRAME_SIDE / max(height, width)
    factor = math.floor(factor) if factor >= 1 else factor  # whole multiples keep latent pixels square
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    while True:
        scaled = image.resize(size, Image.Resampling.BILINEAR) if size != image.size else image
        for quality in QUALITIES:
            buffer = io.BytesIO()
            scaled.save(buffer, format="JPEG", quality=quality)
            if buffer.tell() <= MAX_JPEG_BYTES:
                return buffer.getvalue(), scaled.width, scaled.height
        size = (max(1, size[0] // 2), max(1, size[1] // 2))


def offer(step: int, total: int, predict: Callable[[], torch.Tensor], projection: Projection) -> None:
    """Step ``step`` of ``total`` is done: if the open sink wants a preview of it, ``predict()`` the clean latent
    ([C, F, H, W], or [C, H, W] for an image) and send its picture. ``predict`` must only read the loop's tensors."""
    sink = active()
    if sink is None or not sink.wants(step):
        return
    with torch.no_grad():
        latent = predict()
        if latent.dim() == 3:
            latent = latent.unsqueeze(1)
        picked = latent[:, strip_frames(latent.shape[1])].to("cpu", torch.float32)
        jpeg, width, height = encode_strip(projection.rgb(picked))
    sink.emit(Picture(step, total, width, height, jpeg))
