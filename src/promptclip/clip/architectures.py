"""Architecture configs (separate from the pretrained-weights registry), seeded random weights, and the inference
of an architecture from a state dict in OpenAI layout."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Mapping

import torch

from .model import CLIP, CLIPConfig

_TEXT_B = dict(context_length=77, vocab_size=49408, text_width=512, text_heads=8, text_layers=12)


def _vit(embed, image, layers, width, patch, text_width, text_layers=12, head_width=64, mlp_width=None,
         quick_gelu=True) -> CLIPConfig:
    """A ViT CLIP. Text heads are 64 wide in every released CLIP; ``head_width`` is the image tower's."""
    text = dict(_TEXT_B, text_width=text_width, text_heads=text_width // 64, text_layers=text_layers)
    return CLIPConfig(embed_dim=embed, image_size=image, vision_layers=layers, vision_width=width,
                      vision_patch_size=patch, vision_heads=width // head_width, vision_mlp_width=mlp_width,
                      quick_gelu=quick_gelu, **text)


def _resnet(embed, image, layers, width, text_width) -> CLIPConfig:
    text = dict(_TEXT_B, text_width=text_width, text_heads=text_width // 64)
    return CLIPConfig(embed_dim=embed, image_size=image, vision_layers=layers, vision_width=width,
                      vision_patch_size=None, vision_heads=width * 32 // 64, **text)


ARCHITECTURES: dict[str, CLIPConfig] = {
    # OpenAI's models (openai/CLIP, clip/model.py build_model): QuickGELU, 64-wide heads.
    "RN50": _resnet(1024, 224, (3, 4, 6, 3), 64, 512),
    "RN101": _resnet(512, 224, (3, 4, 23, 3), 64, 512),
    "RN50x4": _resnet(640, 288, (4, 6, 10, 6), 80, 640),
    "RN50x16": _resnet(768, 384, (6, 8, 18, 8), 96, 768),
    "RN50x64": _resnet(1024, 448, (3, 15, 36, 10), 128, 1024),
    "ViT-B/32": _vit(512, 224, 12, 768, 32, 512),
    "ViT-B/16": _vit(512, 224, 12, 768, 16, 512),
    "ViT-L/14": _vit(768, 224, 24, 1024, 14, 768),
    "ViT-L/14@336px": _vit(768, 336, 24, 1024, 14, 768),
    # open_clip's OpenAI-layout ViTs, in its spelling (src/open_clip/model_configs/<name>.json). Its default
    # activation is GELU; "<name>-quickgelu" (OPEN_CLIP_QUICKGELU_SUFFIX) is the same architecture with QuickGELU.
    # ViT-H/g/bigG have wider image-tower heads (head_width 80/88/104) and g/bigG other MLP ratios
    # (mlp_ratio 4.3637 and 4.9231: open_clip's MLP width int(width * mlp_ratio) is 6144 and 8192).
    "ViT-B-32": _vit(512, 224, 12, 768, 32, 512, quick_gelu=False),
    "ViT-B-16": _vit(512, 224, 12, 768, 16, 512, quick_gelu=False),
    "ViT-L-14": _vit(768, 224, 24, 1024, 14, 768, quick_gelu=False),
    "ViT-L-14-336": _vit(768, 336, 24, 1024, 14, 768, quick_gelu=False),
    "ViT-H-14": _vit(1024, 224, 32, 1280, 14, 1024, text_layers=24, head_width=80, quick_gelu=False),
    "ViT-g-14": _vit(1024, 224, 40, 1408, 14, 1024, text_layers=24, head_width=88, mlp_width=6144,
                     quick_gelu=False),
    "ViT-bigG-14": _vit(1280, 224, 48, 1664, 14, 1280, text_layers=32, head_width=104, mlp_width=8192,
                        quick_gelu=False),
    # Test backbones (random weights only). Widths are multiples of 64 so that heads = width // 64, OpenAI's rule,
    # and a saved tiny model infers back to the same architecture. 12 layers per tower, as ViT-B, so that every
    # official preset (prompt depths up to 12) runs on it unchanged.
    "tiny": CLIPConfig(embed_dim=64, image_size=224, vision_layers=12, vision_width=128, vision_patch_size=32,
                       vision_heads=2, context_length=77, vocab_size=49408, text_width=128, text_heads=2,
                       text_layers=12),
    "tiny-rn": CLIPConfig(embed_dim=64, image_size=64, vision_layers=(1, 1, 1, 1), vision_width=16,
                          vision_patch_size=None, vision_heads=8, context_length=77, vocab_size=49408,
                          text_width=128, text_heads=2, text_layers=2),
    # The reference-parity backbone of the goldens (tests/golden/README.md).
    "golden-mini": CLIPConfig(embed_dim=512, image_size=32, vision_layers=4, vision_width=768, vision_patch_size=16,
                              vision_heads=12, context_length=77, vocab_size=49408, text_width=512, text_heads=8,
                              text_layers=4),
}

RANDOM_ONLY = ("tiny", "tiny-rn", "golden-mini")
GOLDEN_MINI_SEED = 1000
OPEN_CLIP_QUICKGELU_SUFFIX = "-quickgelu"


def architecture(name: str) -> CLIPConfig:
    """The config of a name of :data:`ARCHITECTURES`, or of open_clip's ``<name>-quickgelu`` spelling of one."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    base = name.removesuffix(OPEN_CLIP_QUICKGELU_SUFFIX)
    if base != name and base in ARCHITECTURES:
        return dataclasses.replace(ARCHITECTURES[base], quick_gelu=True)
    raise KeyError(name)


def architecture_names() -> list[str]:
    """Every name :func:`architecture` accepts, the ``-quickgelu`` spellings of open_clip's names included."""
    open_clip_names = [n for n, c in ARCHITECTURES.items() if not c.quick_gelu and n not in RANDOM_ONLY]
    return list(ARCHITECTURES) + [n + OPEN_CLIP_QUICKGELU_SUFFIX for n in open_clip_names]


def recipe_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One tensor of the golden-mini weight recipe (tests/golden/README.md), extended to ResNet towers.

    The rule, by key: ``randn(shape, generator=manual_seed(seed))`` scaled by what the key holds. ResNet-only keys
    (convolutions, BatchNorm statistics) are our extension: convs scale by fan-in, BN statistics are the identity.
    """
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)
    if key.endswith("running_mean"):
        return torch.zeros(shape)
    if key.endswith("running_var"):
        return torch.ones(shape)
    if key == "logit_scale":
        return torch.tensor(math.log(100.0), dtype=torch.float32)
    r = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    if key in ("token_embedding.weight", "positional_embedding", "visual.positional_embedding",
               "visual.class_embedding") or key.endswith("attnpool.positional_embedding"):
        return 0.02 * r
    if key in ("text_projection", "visual.proj"):
        return r * shape[0] ** -0.5
    if key.endswith("bias"):
        return 0.02 * r
    if key.endswith("weight") and len(shape) == 1:
        return 1 + 0.1 * r
    if key.endswith("weight") and len(shape) == 2:
        return r * shape[1] ** -0.5
    if key.endswith("weight") and len(shape) == 4:
        return r * math.prod(shape[1:]) ** -0.5
    raise KeyError(f"the weight recipe has no rule for {key!r} of shape {shape}")


def recipe_state_dict(config: CLIPConfig, seed: int = GOLDEN_MINI_SEED) -> dict[str, torch.Tensor]:
    """Seeded random weights for ``config``: the key at index i of ``sorted(keys)`` uses seed ``seed + i``."""
    shapes = {k: tuple(v.shape) for k, v in CLIP(config).state_dict().items()}
    return {key: recipe_tensor(key, shapes[key], seed + i) for i, key in enumerate(sorted(shapes))}


def build_random(name_or_config: str | CLIPConfig, seed: int = GOLDEN_MINI_SEED) -> CLIP:
    """A CLIP with seeded recipe weights (``golden-mini`` with the default seed is the goldens' backbone)."""
    config = ARCHITECTURES[name_or_config] if isinstance(name_or_config, str) else name_or_config
    model = CLIP(config)
    model.load_state_dict(recipe_state_dict(config, seed), strict=True)
    return model.eval()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over each key (sorted) followed by its tensor's float32 little-endian bytes (the goldens' checksum)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode("utf-8"))
        tensor = state_dict[key].detach().to(torch.float32).contiguous().cpu()
        digest.update(tensor.numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()


def _count_indices(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state_dict if (m := pattern.match(k))})


def shapes_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The :data:`SHAPE_FIELDS` of an OpenAI-layout state dict: everything of its architecture but the activation
    and the heads, which no tensor shape shows."""
    required = ["text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight"]
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise KeyError(f"not a CLIP state dict in OpenAI layout: missing {', '.join(missing)}")
    text_width = state_dict["ln_final.weight"].shape[0]
    shapes = dict(
        embed_dim=state_dict["text_projection"].shape[1],
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        text_width=text_width,
        text_layers=_count_indices(state_dict, "transformer.resblocks."),
        text_mlp_width=_mlp_width(state_dict, "transformer.resblocks.0.", text_width),
    )
    if "visual.proj" in state_dict:
        width = state_dict["visual.conv1.weight"].shape[0]
        patch = state_dict["visual.conv1.weight"].shape[-1]
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = _count_indices(state_dict, "visual.transformer.resblocks.")
        return dict(shapes, image_size=patch * grid, vision_layers=layers, vision_width=width, vision_patch_size=patch,
                    vision_mlp_width=_mlp_width(state_dict, "visual.transformer.resblocks.0.", width))
    if "visual.attnpool.positional_embedding" in state_dict:
        grid = round((state_dict["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        return dict(shapes, image_size=grid * 32,
                    vision_layers=tuple(_count_indices(state_dict, f"visual.layer{b}.") for b in (1, 2, 3, 4)),
                    vision_width=state_dict["visual.layer1.0.conv1.weight"].shape[0], vision_patch_size=None,
                    vision_mlp_width=None)
    raise KeyError("not a CLIP state dict in OpenAI layout: no 'visual.proj' (ViT) nor 'visual.attnpool.*' (ResNet)")


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], quick_gelu: bool = True,
                           vision_head_width: int = 64, text_head_width: int = 64) -> CLIPConfig:
    """The architecture of an OpenAI-layout state dict, with the activation and head widths given.

    The heads are ``width // head_width`` (64 is OpenAI's convention and open_clip's default; a ResNet's attention
    pool is 32 x width wide)."""
    shapes = shapes_from_state_dict(state_dict)
    pool_width = shapes["vision_width"] * (1 if isinstance(shapes["vision_layers"], int) else 32)
    return CLIPConfig(**shapes, vision_heads=_heads(pool_width, vision_head_width, "image"),
                      text_heads=_heads(shapes["text_width"], text_head_width, "text"), quick_gelu=quick_gelu)


def _heads(width: int, head_width: int, tower: str) -> int:
    if head_width < 1 or width % head_width:
        raise ValueError(f"the {tower} tower's width {width} is not a multiple of the head width {head_width}")
    return width // head_width


def _mlp_width(state_dict: Mapping[str, torch.Tensor], block: str, width: int) -> int | None:
    """The MLP width of a tower from its first block; None for OpenAI's 4 x width (or a tower without blocks)."""
    weight = state_dict.get(block + "mlp.c_fc.weight")
    if weight is None or weight.shape[0] == 4 * width:
        return None
    return int(weight.shape[0])


SHAPE_FIELDS = ("embed_dim", "image_size", "vision_layers", "vision_width", "vision_patch_size", "context_length",
                "vocab_size", "text_width", "text_layers", "vision_mlp_width", "text_mlp_width")


def known_architectures_with_shapes(shapes: Mapping) -> dict[str, CLIPConfig]:
    """The architectures of :data:`ARCHITECTURES` with these :func:`shapes_from_state_dict`; they may differ in
    heads, activation and pixel normalisation."""
    return {name: known for name, known in ARCHITECTURES.items()
            if all(getattr(known, f) == shapes[f] for f in SHAPE_FIELDS)}
