"""The public ``promptclip.clip`` API has the shape of OpenAI's ``clip`` package."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from promptclip import clip
from promptclip.clip import weights as W


def test_reexports():
    from promptclip.clip.architectures import ARCHITECTURES, build_random
    from promptclip.clip.model import CLIP, CLIPConfig

    assert clip.CLIP is CLIP and clip.CLIPConfig is CLIPConfig
    assert clip.ARCHITECTURES is ARCHITECTURES and clip.build_random is build_random
    assert clip.available_models() == ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16",
                                       "ViT-L/14", "ViT-L/14@336px"]
    for name in clip.__all__:
        assert hasattr(clip, name), name


def test_tokenize_like_openai():
    tokens = clip.tokenize(["a photo of a cat", "a dog"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert tokens[:, 0].tolist() == [49406, 49406]
    # EOT (49407) is the largest id of each row, right after the words; zeros after it.
    eot = tokens.argmax(dim=-1)
    assert tokens[0, eot[0]] == 49407 and tokens[1, eot[1]] == 49407
    assert eot[0] > eot[1]
    assert (tokens[0, eot[0] + 1:] == 0).all()
    assert clip.tokenize("x", context_length=10).shape == (1, 10)
    assert clip.tokenize("word " * 100, truncate=True)[0, -1] == 49407


def _pil(seed: int, size=(50, 40)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=g)
    return Image.fromarray(pixels.numpy(), "RGB")


@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
def test_load_returns_model_and_preprocess(name):
    model, preprocess = clip.load(name)
    assert isinstance(model, clip.CLIP)
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    size = model.visual.input_resolution
    images = torch.stack([preprocess(_pil(0)), preprocess(_pil(1, (30, 70)))])
    assert images.shape == (2, 3, size, size) and images.dtype == torch.float32
    tokens = clip.tokenize(["a photo of a cat", "a photo of a dog", "a diagram"])
    with torch.no_grad():
        logits_per_image, logits_per_text = model(images, tokens)
    assert logits_per_image.shape == (2, 3) and logits_per_text.shape == (3, 2)
    assert torch.equal(logits_per_image, logits_per_text.t())
    # The logits are the scaled cosine similarities of the two encoders' features.
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text(tokens)
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    assert torch.allclose(logits_per_image, model.logit_scale.exp() * img @ txt.t(), atol=1e-5)


def test_load_from_path_and_download_root(tmp_path):
    source = clip.build_random("tiny", seed=3)
    torch.save(source.state_dict(), tmp_path / "ViT-T.pt")
    from promptclip.errors import WeightsError

    with pytest.raises(WeightsError, match="does not say which activation"):  # a state dict does not say it
        clip.load(str(tmp_path / "ViT-T.pt"))
    model, preprocess = clip.load(str(tmp_path / "ViT-T.pt"), device="cpu", download_root=tmp_path / "unused",
                                  quick_gelu=True)
    assert W.backbone_fingerprint(model) == W.backbone_fingerprint(source)
    assert preprocess(_pil(2)).shape == (3, 224, 224)
    with pytest.warns(UserWarning, match="jit=True"):
        clip.load("tiny", jit=True)


def test_load_unknown_name_is_a_weights_error():
    from promptclip.errors import WeightsError

    with pytest.raises(WeightsError, match="Available models: RN50"):
        clip.load("ViT-Z/99")
