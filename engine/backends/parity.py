"""The parity gate: an artifact's output against eager PyTorch's on the same input, within the precision's tolerance."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from engine.backends.cache import Parity

FP32_MAX_ABS = 3e-4  #: float32: largest absolute difference
HALF_COSINE = 0.9999  #: float16 / bfloat16: smallest cosine similarity
HALF_PSNR_DB = 40.0  #: float16 / bfloat16: smallest PSNR, over the reference's range
FAR = 1e30  #: a difference too large to measure (JSON carries no infinity)


def parity(expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor], precision: str) -> Parity:
    """Compare every output; the worst figure of all outputs counts."""
    if len(expected) != len(actual):
        return Parity(passed=False, max_abs=FAR, cosine=0.0, psnr_db=0.0,
                      threshold=f"{len(actual)} outputs where eager gives {len(expected)}")
    max_abs, cosine, psnr = 0.0, 1.0, math.inf
    for ref, out in zip(expected, actual):
        ref, out = ref.detach().double().cpu().flatten(), out.detach().double().cpu().flatten()
        if ref.shape != out.shape:
            return Parity(passed=False, max_abs=FAR, cosine=0.0, psnr_db=0.0,
                          threshold=f"output of {out.numel()} values where eager gives {ref.numel()}")
        diff = (ref - out).abs()
        max_abs = max(max_abs, float(diff.max()) if diff.numel() else 0.0)
        norms = float(ref.norm() * out.norm())
        cosine = min(cosine, float(ref @ out) / norms if norms else float(torch.equal(ref, out)))
        mse = float((diff**2).mean()) if diff.numel() else 0.0
        peak = float(ref.max() - ref.min()) if ref.numel() else 0.0
        psnr = min(psnr, 10 * math.log10(peak**2 / mse) if mse > 0 and peak > 0 else math.inf)
    if not all(map(math.isfinite, (max_abs, cosine))):
        return Parity(passed=False, max_abs=FAR, cosine=0.0, psnr_db=0.0, threshold="non-finite output")
    if precision == "float32":
        return Parity(passed=max_abs <= FP32_MAX_ABS, max_abs=max_abs, cosine=cosine, psnr_db=_finite(psnr),
                      threshold=f"max abs <= {FP32_MAX_ABS:g}")
    return Parity(passed=cosine >= HALF_COSINE and psnr >= HALF_PSNR_DB, max_abs=max_abs, cosine=cosine,
                  psnr_db=_finite(psnr), threshold=f"cosine >= {HALF_COSINE:g} and PSNR >= {HALF_PSNR_DB:g} dB")


def _finite(psnr: float) -> float:
    """PSNR of identical outputs is infinite: JSON carries 999 dB instead."""
    return min(psnr, 999.0)
