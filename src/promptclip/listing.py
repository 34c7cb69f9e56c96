"""What ``promptclip list`` shows: one line per method, dataset, backbone or preset, built from the registries (the
CLI only prints them)."""

from __future__ import annotations

import sys
from collections.abc import Callable


def method_lines() -> list[str]:
    from .methods import get_method_class, list_methods, method_source

    lines = []
    for name in list_methods():
        cls = get_method_class(name)
        source = method_source(name)
        module_doc = sys.modules[cls.__module__].__doc__
        # A built-in method's file describes it; a plugin's class does (its module may hold several).
        doc = (module_doc if source.kind == "builtin" else cls.__doc__ or module_doc) or ""
        doc = (doc.strip().splitlines() or [""])[0]
        vit = "" if cls.supports_resnet else "  [ViT only]"
        origin = "" if source.kind == "builtin" else f"  [{source.kind}: {source.distribution or source.spec}]"
        lines.append(f"{name:14s} {doc}{vit}{origin}")
    return lines


def dataset_lines() -> list[str]:
    from .data import get_spec, list_datasets

    return [f"{name:16s} {getattr(get_spec(name), 'num_classes', '') or '':>5} classes  template "
            f"{get_spec(name).template!r}" for name in list_datasets()]


def backbone_lines() -> list[str]:
    from .clip.architectures import RANDOM_ONLY
    from .clip.model import OPENAI_MEAN
    from .clip.openclip import OPEN_CLIP_PRETRAINED, cached_file
    from .clip.weights import PRETRAINED, cache_dir

    lines = ["OpenAI (QuickGELU; downloaded from OpenAI, sha256-verified):"]
    for name, entry in PRETRAINED.items():
        cached = (cache_dir() / entry.filename).exists()
        lines.append(f"  {name:16s} {'cached' if cached else 'downloads on first use'}  {entry.url}")
    lines.append("open_clip (downloaded from the Hugging Face Hub with huggingface_hub, pip install "
                 "\"promptclip[hf]\"):")
    for name, entry in OPEN_CLIP_PRETRAINED.items():
        config = entry.config
        details = ["QuickGELU" if entry.quick_gelu else "GELU"]
        if config.vision_head_width != 64:
            details.append(f"image heads {config.vision_heads} x {config.vision_head_width}")
        if config.image_mean != OPENAI_MEAN:
            details.append(f"mean/std {config.image_mean}/{config.image_std}")
        status = "cached" if cached_file(entry.hf_hub) else "downloads on first use"
        lines.append(f"  {name:46s} {', '.join(details)}; {status}  hf-hub:{entry.hf_hub}")
    lines.append("test backbones (random weights, for tests and pipeline checks only): " + ", ".join(RANDOM_ONLY))
    lines.append("or hf-hub:<repo> (any open_clip Hub repository in OpenAI layout), or a path: an OpenAI .pt, an "
                 "open_clip Hub folder, a Hugging Face CLIPModel folder, or a .pt/.bin/.safetensors state dict with "
                 "--gelu/--quick-gelu or --backbone-arch (docs/backbones.md)")
    return lines


def preset_lines() -> list[str]:
    from .presets import inherited_presets, list_presets, load_preset

    inherited = inherited_presets()
    lines = []
    for name in list_presets():
        train = load_preset(name).train
        summary = f"batch {train.batch_size}, lr {train.lr}, {train.max_epoch} epochs" if train else "no training"
        if name in inherited:
            summary += f"  [inherited from {inherited[name]}]"
        lines.append(f"{name:60s} {summary}")
    return lines


#: ``promptclip list WHAT`` -> the function giving its lines.
LISTINGS: dict[str, Callable[[], list[str]]] = {"methods": method_lines, "datasets": dataset_lines,
                                                "backbones": backbone_lines, "presets": preset_lines}
