"""The architecture to build for a state dict (stated, declared by its source, or inferred from its shapes) and the
strict build of a frozen fp32 :class:`CLIP` from it."""

from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from ...errors import BackboneWarning, WeightsError
from .. import openclip
from ..architectures import (
    architecture,
    architecture_names,
    config_from_state_dict,
    known_architectures_with_shapes,
    shapes_from_state_dict,
)
from ..model import CLIP, CLIPConfig
from .formats import ACCEPTED_FORMATS, NON_WEIGHT_KEYS, Declared, preview


def _how_to_state(source: str) -> str:
    return (f"State it: on the command line --gelu or --quick-gelu, or --backbone-arch with an architecture name "
            f"(e.g. ViT-B-16 for open_clip's GELU ViT-B-16, ViT-B-16-quickgelu, ViT-H-14) or an open_clip config "
            f"file (open_clip_config.json or model_configs/<name>.json); in Python, quick_gelu=True/False or "
            f"arch=NAME. open_clip's Hub folders say it themselves: pass the folder holding {openclip.CONFIG_FILE} "
            f"(or keep that file beside {openclip.WEIGHT_FILES[1]}). See docs/backbones.md.")


def infer_config(state_dict: Mapping[str, torch.Tensor], quick_gelu: bool | None, source: str) -> CLIPConfig:
    """The architecture of a state dict that declares none: the shapes, the heads of a known architecture with
    those shapes (``ARCHITECTURES``; 64-wide heads, with a warning, for unknown ones) and the given activation."""
    try:
        shapes = shapes_from_state_dict(state_dict)
    except (KeyError, ValueError, IndexError) as e:
        message = e.args[0] if e.args else str(e)
        raise WeightsError(
            f"{source} is not a CLIP state dict in OpenAI layout ({message}). Its first keys: "
            f"{preview(list(state_dict), 10)}. Accepted: {ACCEPTED_FORMATS}."
        ) from e
    if quick_gelu is None:
        raise WeightsError(
            f"{source} does not say which activation its model uses, and a state dict cannot show it: OpenAI's "
            f"CLIPs, MetaCLIP, DFN and open_clip's *-quickgelu models use QuickGELU, open_clip's LAION-2B and "
            f"DataComp models (and most others it trains) GELU; the wrong one gives features about 1e-2 off without "
            f"any error. {_how_to_state(source)}"
        )
    known = known_architectures_with_shapes(shapes)
    heads = {(c.vision_heads, c.text_heads) for c in known.values()}
    if len(heads) == 1:
        vision_heads, text_heads = heads.pop()
        return CLIPConfig(**shapes, vision_heads=vision_heads, text_heads=text_heads, quick_gelu=quick_gelu)
    try:
        config = config_from_state_dict(state_dict, quick_gelu=quick_gelu)
    except ValueError as e:
        raise WeightsError(f"{source}: the width of its attention heads cannot be known and the default, 64, does "
                           f"not fit ({e}). State the architecture with --backbone-arch FILE.json (an open_clip model "
                           f"config with vision_cfg.head_width and text_cfg.heads), or arch= in Python.") from e
    warnings.warn(
        f"{source}: no known architecture has these shapes ({_describe(config)}), so the width of its attention "
        f"heads cannot be known; assuming 64 (OpenAI's and open_clip's default: {config.vision_heads} image heads, "
        f"{config.text_heads} text heads). If that is wrong the features are wrong: state the architecture with "
        f"--backbone-arch FILE.json (an open_clip model config), or arch= in Python.", BackboneWarning, stacklevel=3)
    return config


def architecture_from(arch: str | os.PathLike | CLIPConfig) -> tuple[CLIPConfig, str]:
    """``(config, description)`` of an architecture given as a config, a name (``architecture_names()``: OpenAI's
    names with QuickGELU, open_clip's with GELU or ``-quickgelu``) or an open_clip config JSON file."""
    if isinstance(arch, CLIPConfig):
        return arch, "the architecture given"
    name = os.fspath(arch)
    try:
        return architecture(name), f"the architecture {name}"
    except KeyError:
        pass
    if Path(name).expanduser().is_file():
        return openclip.read_config_file(Path(name).expanduser()), f"the architecture of {name}"
    close = difflib.get_close_matches(name, architecture_names(), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise WeightsError(f"architecture {name!r} is neither a known architecture name nor an existing file.{hint} "
                       f"Names: {', '.join(architecture_names())}; or an open_clip config JSON file.")


def choose_config(state_dict: Mapping[str, torch.Tensor], declared: Declared, source: str,
                  arch: str | os.PathLike | CLIPConfig | None = None, quick_gelu: bool | None = None
                  ) -> tuple[CLIPConfig, str]:
    """The architecture to build, and where it comes from: ``arch`` if given, else what the source declares, else
    the shapes (:func:`infer_config`); ``quick_gelu`` (if given) sets the activation in every case."""
    if arch is not None:
        config, origin = architecture_from(arch)
    elif declared.config is not None:
        config, origin = declared.config, f"declared by {declared.by}"
    else:
        activation = quick_gelu if quick_gelu is not None else declared.quick_gelu
        config = infer_config(state_dict, activation, source)
        origin = "inferred from its tensors" + (f", activation from {declared.by}"
                                              if quick_gelu is None and declared.quick_gelu is not None else "")
    if quick_gelu is not None and quick_gelu != config.quick_gelu:
        config = dataclasses.replace(config, quick_gelu=quick_gelu)
    said = declared.config.quick_gelu if declared.config is not None else declared.quick_gelu
    if said is not None and said != config.quick_gelu:
        warnings.warn(f"{source}: loading with {_activation(config.quick_gelu)} although {declared.by} says "
                      f"{_activation(said)}, the activation the weights were trained with.", BackboneWarning,
                      stacklevel=3)
    return config, origin


def _activation(quick_gelu: bool) -> str:
    return "QuickGELU" if quick_gelu else "GELU"


def model_from_state_dict(state_dict: Mapping[str, torch.Tensor], config: CLIPConfig | None = None,
                          quick_gelu: bool | None = None, source: str = "the state dict",
                          origin: str = "inferred from it") -> CLIP:
    """Build a fp32 :class:`CLIP` holding ``state_dict`` (OpenAI layout), checked strictly against its keys.

    Without ``config`` the architecture is inferred (:func:`infer_config`: ``quick_gelu`` is then required)."""
    state_dict = {k: v for k, v in state_dict.items() if k not in NON_WEIGHT_KEYS}
    if config is None:
        config = infer_config(state_dict, quick_gelu, source)
    elif quick_gelu is not None and quick_gelu != config.quick_gelu:
        config = dataclasses.replace(config, quick_gelu=quick_gelu)
    with torch.device("meta"):
        model = CLIP(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {preview(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {preview(shapes)}")
        raise WeightsError(f"{source} does not fit the CLIP architecture {origin} ({_describe(config)}): "
                           + "; ".join(parts) + ".")
    tensors = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()).contiguous()
               for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return frozen(model)


def _describe(config: CLIPConfig) -> str:
    if config.is_vit:
        tower = (f"ViT width {config.vision_width}, {config.vision_layers} layers, patch {config.vision_patch_size}, "
                 f"{config.vision_heads} heads of {config.vision_head_width}")
    else:
        tower = f"ResNet layers {config.vision_layers}, width {config.vision_width}"
    return (f"{tower}, image {config.image_size}; text width {config.text_width}, {config.text_layers} layers, "
            f"{config.text_heads} heads of {config.text_head_width}; embed {config.embed_dim}; "
            f"{_activation(config.quick_gelu)}")


def frozen(model: CLIP) -> CLIP:
    model.float().eval()
    model.requires_grad_(False)
    return model
