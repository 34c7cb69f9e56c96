"""The one dtype policy of promptclip.

Weights (backbone and learnable prompts) are always fp32 masters. Reduced precision is applied only through
autocast around forward passes. ``auto`` picks bf16 where the hardware computes it natively (CUDA with bf16
support, or a CPU with AMX or AVX512-BF16) and fp32 otherwise: on CPUs without native bf16, autocast bf16 is
several times *slower* than fp32.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU's vendor id from /proc/cpuinfo (``GenuineIntel``, ``AuthenticAMD``, ...; empty where unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return ""


def cpu_has_native_bf16() -> bool:
    flags = cpu_flags()
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def cpu_description() -> str:
    """CPU model and capabilities, printed beside every benchmark figure."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    native = sorted({"amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2"} & cpu_flags())
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{model}; torch CPU capability {capability}; flags {' '.join(native) or 'none'}"


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """Map ``auto|fp32|bf16|fp16`` to a concrete precision for ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    device_type = torch.device(device).type
    if precision != "auto":
        return precision
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device_type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def autocast(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """Autocast context for a concrete or ``auto`` precision; fp32 is a no-op context."""
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[resolved])
