"""The parts of an artifact's key read off the running machine and the model: device fingerprint, weights digest."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch
import xxhash

#: CPU flags that change what a compiled kernel may use.
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "neon", "sve")


@cache
def fingerprint(device: str) -> str:
    """The device an artifact was built for: CPU ISA, or GPU name, SM, driver and CUDA."""
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} sm_{major}{minor} driver {_nvidia_driver()} cuda {torch.version.cuda}"
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
    return f"{platform.machine()} {' '.join(f for f in _ISA_FLAGS if f in flags) or 'baseline'}"


def _nvidia_driver() -> str:
    """The NVIDIA kernel driver's version, as /proc/driver/nvidia/version states it."""
    try:
        first = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "unknown"
    words = first.split()
    return next((w for w in words if w[:1].isdigit() and "." in w), "unknown")


def weights_digest(module: torch.nn.Module) -> str:
    """xxh3-128 over the names, dtypes, shapes and bytes of a module's parameters and buffers."""
    digest = xxhash.xxh3_128()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
