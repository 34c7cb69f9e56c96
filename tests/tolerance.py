"""Tensor closeness relative to the size of the values compared, so a bar holds for any data (other goldens, seeds,
backbones): ``max|ours - expected| <= rel * max|expected|``, as the goldens' parity bars (tests/golden/README.md)."""

from __future__ import annotations

import torch


def scaled_error(ours: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """``(max|ours - expected|, max|expected|)`` in float64."""
    ours, expected = torch.as_tensor(ours).detach().double(), torch.as_tensor(expected).detach().double()
    assert ours.shape == expected.shape, f"shape {tuple(ours.shape)} vs {tuple(expected.shape)}"
    return (ours - expected).abs().max().item(), expected.abs().max().item()


def assert_close(ours: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    """The same values up to rounding: ``max|ours - expected| <= rel * max|expected|``."""
    err, scale = scaled_error(ours, expected)
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel:g} x max|expected| {scale:.3g}"


def assert_differ(ours: torch.Tensor, expected: torch.Tensor, rel: float = 1e-3, what: str = "") -> None:
    """Really different values, not rounding: ``max|ours - expected| > rel * max|expected|``."""
    err, scale = scaled_error(ours, expected)
    assert err > rel * scale, f"{what}: max abs difference {err:.3g} <= {rel:g} x max|expected| {scale:.3g}"
