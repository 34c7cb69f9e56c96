"""Which CPU kernel computes the frozen towers' fp32 matrix products.

PyTorch sends an fp32 ``F.linear`` on the CPU to its BLAS (MKL in the official wheels). On AMD CPUs MKL's sgemm
runs a generic code path: on the AMD EPYC (Zen 5) of docs/performance.md it reaches about half of what oneDNN's
fp32 matmul reaches on the same core (``bench/roofline.py`` prints both). Under bf16 autocast both go to oneDNN
already, so only fp32 changes.

The backends (:func:`cpu_linear` selects one for the current thread or asyncio task, like ``torch.no_grad``):

``auto`` (default)
    ``onednn`` on AMD x86 CPUs, where it was measured faster; ``blas`` elsewhere: on an Intel Xeon with AMX MKL's
    sgemm runs its optimised path and was measured faster than oneDNN (371 vs 337 GFLOP/s, docs/performance.md).
``onednn``
    oneDNN's matmul for fp32 products that nothing is differentiated through: weight, bias and input get no gradient
    (frozen towers in evaluation, CoOp-style training's image tower, teachers). A product with a gradient flowing
    through it (deep prompts, learned text context, weights being trained), autocast, another dtype or device falls
    back to ``F.linear``: training gradients are computed exactly as PyTorch computes them, which keeps the
    whole-run trajectory parity (tests/test_trajectory.py) within its bars; oneDNN's summation order in the backward
    moved the smallest first-epoch updates past them. A model gives the same values under ``no_grad`` whether or not
    its weights have ``requires_grad`` set.
``blas``
    always ``F.linear`` (PyTorch's own choice).

The kernels sum in a different order than MKL: results agree to float32 rounding (about 1e-6 relative), not
bitwise, which the parity tolerances (tests/golden/README.md) absorb.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from ..precision import cpu_vendor

BACKENDS = ("auto", "blas", "onednn")
_CURRENT: ContextVar[str] = ContextVar("promptclip_cpu_linear", default="auto")


@contextlib.contextmanager
def cpu_linear(backend: str) -> Iterator[None]:
    """Use ``backend`` (``auto``, ``blas`` or ``onednn``) for the frozen towers' fp32 CPU products in this block."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown CPU linear backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    token = _CURRENT.set(backend)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's fused linear op (x86 builds of PyTorch >= 2.0 have it)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and platform.machine().lower() in ("x86_64", "amd64"))


def resolved_backend() -> str:
    """The backend in effect, with ``auto`` resolved for this machine."""
    backend = _CURRENT.get()
    if backend == "auto":
        backend = "onednn" if cpu_vendor() == "AuthenticAMD" else "blas"
    return "onednn" if backend == "onednn" and onednn_available() else "blas"


def _onednn(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "none", [], "")


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, by the backend in effect where it applies (see the module docstring)."""
    differentiated = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and not differentiated
            and not torch.is_autocast_enabled("cpu") and resolved_backend() == "onednn"):
        out = _onednn(x.contiguous().reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
