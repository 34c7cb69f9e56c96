"""CLIP backbones with the public API of OpenAI's ``clip`` package.

Code written for ``import clip`` ports by changing the import::

    from promptclip import clip

    model, preprocess = clip.load("ViT-B/16")
    logits_per_image, logits_per_text = model(images, clip.tokenize(["a photo of a cat"]))

Unlike OpenAI's ``load``, the model is always our eager fp32 :class:`CLIP` (frozen, eval mode), the device defaults
to the CPU, and ``name`` may also be open_clip weights, a state dict, a safetensors file or a Hugging Face
``CLIPModel`` folder (see :mod:`promptclip.clip.weights` and :mod:`promptclip.clip.openclip`). The tokenizer and
image transforms are imported on first use.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

import torch

from .architectures import ARCHITECTURES, build_random
from .model import CLIP, CLIPConfig
from .weights import available_models, backbone_fingerprint, load_backbone, load_model

if TYPE_CHECKING:
    from .transforms import EvalTransform

__all__ = [
    "ARCHITECTURES",
    "CLIP",
    "CLIPConfig",
    "available_models",
    "backbone_fingerprint",
    "build_random",
    "load",
    "load_backbone",
    "load_model",
    "tokenize",
]


def load(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
         download_root: str | os.PathLike | None = None, jit: bool = False, quick_gelu: bool | None = None
         ) -> tuple[CLIP, EvalTransform]:
    """``(model, preprocess)`` as OpenAI's ``clip.load``: a frozen fp32 CLIP and its evaluation transform.

    ``name_or_path`` is a name from :func:`available_models` (downloaded into ``download_root``, default
    ``promptclip.clip.weights.cache_dir()``), an open_clip name (``open_clip:ViT-B-16/laion2b_s34b_b88k``), a test
    backbone (``tiny``, ``tiny-rn``, ``golden-mini``) or a local path. ``preprocess(pil_image)`` returns a
    ``[3, R, R]`` tensor normalised with the weights' pixel statistics, ``R = model.visual.input_resolution``.
    A plain state dict does not say its activation: pass ``quick_gelu=True`` (OpenAI's weights) or ``False``.
    ``jit=True`` is accepted for compatibility only: a TorchScript model is never returned.
    """
    if jit:
        warnings.warn("promptclip.clip.load ignores jit=True: it always returns the eager CLIP model.", stacklevel=2)
    from .transforms import clip_eval_transform

    model = load_model(name_or_path, device=device, cache_dir=download_root, quick_gelu=quick_gelu)
    return model, clip_eval_transform(model.visual.input_resolution, model.config.image_mean, model.config.image_std)


def tokenize(texts: str | list[str], context_length: int = 77, truncate: bool = False) -> torch.Tensor:
    """Token ids ``[N, context_length]`` (SOT, BPE ids, EOT, zero padding), as OpenAI's ``clip.tokenize``."""
    from .tokenizer import tokenize as _tokenize

    return _tokenize(texts, context_length=context_length, truncate=truncate)
