"""CLIP-Adapter: what the generic parity tests do not cover (mutations, the preset, the tutorial's name)."""

import pytest
import torch
from torch import nn

from parity import assert_close_values, build_method, golden_batch, load_golden
from promptclip.methods import get_method_class
from promptclip.presets import default_preset, load_preset


def _eval_error(method, golden) -> float:
    method.eval()
    with torch.no_grad():
        logits = method(golden_batch(golden, train=False))
    expected = golden.tensors["eval.logits"]
    return (logits - expected).abs().max().item() / (1e-4 * max(1.0, expected.abs().max().item()))


def test_the_golden_passes_and_fails_without_the_second_relu():
    golden = load_golden("clip_adapter")
    method, _ = build_method(golden)
    assert _eval_error(method, golden) <= 1
    method.adapter.fc[3] = nn.Identity()  # mutation: no ReLU after the second linear
    assert _eval_error(method, golden) > 10


def test_the_golden_fails_with_another_residual_ratio():
    golden = load_golden("clip_adapter")
    method, _ = build_method(golden)
    method.config.ratio = 0.25
    assert _eval_error(method, golden) > 10


def test_adapter_output_is_stored_and_non_negative():
    golden = load_golden("clip_adapter")
    if "eval.adapter_out" not in golden.tensors:
        pytest.skip("no adapter output in this golden")
    method, _ = build_method(golden)
    method.eval()
    with torch.no_grad():
        out = method.adapter(method.clip.encode_image(golden.images()))
    assert_close_values(out, golden.tensors["eval.adapter_out"], "eval.adapter_out")
    assert (out >= 0).all()


def test_the_official_preset_and_the_reference_options():
    preset = load_preset(default_preset("fewshot", "clip_adapter"))
    assert preset.source and preset.backbone == "RN50" and preset.train.lr == 0.002 and preset.train.max_epoch == 200
    cls = get_method_class("clip_adapter")
    assert cls.config_from_reference({"N_CTX": 16, "CSC": False, "PREC": "fp16"}) == cls.config_class()
    with pytest.raises(Exception, match="RATIO"):
        cls.config_from_reference({"RATIO": 0.5})


def test_the_tutorial_plugin_does_not_take_the_built_in_name():
    import importlib.util
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "examples" / "clip_adapter.py").read_text()
    assert 'name = "clip_adapter"' not in source
    assert importlib.util.find_spec("promptclip.methods.clip_adapter") is not None
