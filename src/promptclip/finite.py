"""The one finiteness check of tensors read from files: adapters, training states, imported reference checkpoints and
backbone weights all pass through :func:`check_finite` before any of their values is used.

A NaN or an infinity in a learned tensor does not fail loudly downstream: an adapter holding one evaluates to chance
accuracy and a resumed run trains on it. The check names the tensor and how many of its values are not finite.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import PromptClipError


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    """``(name, values not finite, values)`` of each floating-point tensor holding NaN or +-Inf, in ``tensors``'
    order."""
    found = []
    for name, tensor in tensors.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue  # integer and boolean tensors are always finite
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            found.append((name, bad, tensor.numel()))
    return found


def non_finite_message(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """``"tensor 'ctx' has 3 of 2,048 values that are not finite (NaN or infinite)"`` (and how many other tensors
    do), or None when every value is finite."""
    found = non_finite(tensors)
    if not found:
        return None
    name, bad, total = found[0]
    more = f", and {len(found) - 1} more tensor(s) do too" if len(found) > 1 else ""
    return f"tensor {name!r} has {bad:,} of {total:,} values that are not finite (NaN or infinite){more}"


def check_finite(tensors: Mapping[str, torch.Tensor], where: str, error: type[PromptClipError] = PromptClipError,
                 advice: str = "") -> None:
    """Raise ``error("<where>: <what is not finite>; <advice>")`` when a tensor holds NaN or +-Inf."""
    message = non_finite_message(tensors)
    if message is not None:
        raise error(f"{where}: {message}" + (f"; {advice}" if advice else ""))
