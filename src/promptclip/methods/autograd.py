"""Small autograd pieces methods (and plugins) share.

:func:`scale_gradient` is the identity in the forward pass and multiplies the gradient by a constant in the backward
pass. MMA's reference wraps its adapter branches with two of them (``s`` where a branch reads the block, ``1/s``
after its output is scaled by ``s``), so that the adapters get ``1/s`` times their true gradient while the gradient
flowing back into the tower is the true one.
"""

from __future__ import annotations

import torch


class ScaleGradient(torch.autograd.Function):
    """``y = x``; ``dL/dx = factor * dL/dy``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged, its gradient multiplied by ``factor`` on the way back (no-op when ``factor`` is 1)."""
    if factor == 1:
        return x
    return ScaleGradient.apply(x, factor)
