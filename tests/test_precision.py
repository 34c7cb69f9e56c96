import contextlib

import pytest
import torch

from promptclip import precision


def test_explicit_precisions_pass_through():
    for name in ("fp32", "bf16", "fp16"):
        assert precision.resolve_precision(name, "cpu") == name


def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        precision.resolve_precision("half", "cpu")


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx2", "avx512f"}, "fp32"),
        ({"avx2", "avx512_bf16"}, "bf16"),
        ({"amx_bf16", "amx_tile"}, "bf16"),
        (set(), "fp32"),
    ],
)
def test_auto_uses_bf16_only_with_native_cpu_support(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    assert precision.resolve_precision("auto", "cpu") == expected


def test_fp32_autocast_is_a_no_op_context():
    ctx = precision.autocast("fp32", "cpu")
    assert isinstance(ctx, contextlib.nullcontext)
    with precision.autocast("bf16", "cpu"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.is_autocast_enabled("cpu")


def test_cpu_description_names_the_capability():
    text = precision.cpu_description()
    assert "torch CPU capability" in text
