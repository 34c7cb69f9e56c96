"""The plugin author's own tests: the method contract in one line, plus what is specific to this method."""

import torch

from clip_adapter import ClipAdapter
from promptclip.clip import tokenize
from promptclip.testing import check_method, contract_backbone


def test_clip_adapter_keeps_the_method_contract():
    check_method(ClipAdapter)


def test_ratio_zero_is_zero_shot_clip():
    backbone = contract_backbone()
    method = ClipAdapter(backbone, ClipAdapter.config_class(ratio=0.0), ["forest", "river"], "a photo of a {}.")
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    method.eval()
    with torch.no_grad():
        logits = method({"image": images})
        image = backbone.encode_image(images)
        text = backbone.encode_text(tokenize(["a photo of a forest.", "a photo of a river."]))
        expected = backbone.logit_scale.exp() * torch.nn.functional.normalize(image, dim=-1) @ \
            torch.nn.functional.normalize(text, dim=-1).t()
    assert torch.allclose(logits, expected, atol=1e-5 * float(expected.abs().max()))
