"""The backbone fingerprint: a short hash that identifies a backbone's weights (and its non-OpenAI choices)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch

from ..model import CLIP, OPENAI_MEAN, OPENAI_STD, CLIPConfig

FINGERPRINT_SAMPLES = 64


def backbone_fingerprint(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A short (16 hex digits) stable hash identifying a backbone's weights, cheap for any model size.

    sha256 over, for each state-dict key in sorted order: the key, the tensor's shape, and ``FINGERPRINT_SAMPLES``
    values at evenly spaced flat indices (``i * numel // n``) plus the last value, as float32 little-endian bytes.
    Two different checkpoints (another model, or a fine-tune) differ at the sampled positions with overwhelming
    probability; it is not a proof that every value is identical (use ``state_dict_sha256`` for that). Values are
    hashed as float32, so the same weights give the same fingerprint on any device.

    For a :class:`CLIP`, the choices that change its features without changing its tensors are hashed too when
    they are not OpenAI's (GELU, heads other than 64 wide, another pixel normalisation): the same file loaded with
    another activation is another backbone, and an adapter trained on one does not load onto the other.
    """
    state_dict = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module)
                  else model_or_state_dict)
    digest = hashlib.sha256()
    if isinstance(model_or_state_dict, CLIP) and (choices := _non_openai_choices(model_or_state_dict.config)):
        digest.update(json.dumps(choices, sort_keys=True).encode("utf-8"))
    for key in sorted(state_dict):
        tensor = state_dict[key].detach()
        digest.update(key.encode("utf-8"))
        digest.update(repr(tuple(tensor.shape)).encode("ascii"))
        flat = tensor.reshape(-1)
        numel = flat.numel()
        if numel:
            n = min(FINGERPRINT_SAMPLES, numel)
            index = torch.cat([torch.arange(n, device=flat.device) * numel // n,
                               torch.tensor([numel - 1], device=flat.device)])
            sample = flat[index].to(device="cpu", dtype=torch.float32).contiguous()
            digest.update(sample.numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()[:16]


def _non_openai_choices(config: CLIPConfig) -> dict:
    """The architecture choices of ``config`` that differ from OpenAI's conventions and no tensor shape shows."""
    choices = {}
    if not config.quick_gelu:
        choices["quick_gelu"] = False
    if config.vision_head_width != 64:
        choices["vision_heads"] = config.vision_heads
    if config.text_head_width != 64:
        choices["text_heads"] = config.text_heads
    if config.image_mean != OPENAI_MEAN or config.image_std != OPENAI_STD:
        choices["image_mean"], choices["image_std"] = list(config.image_mean), list(config.image_std)
    return choices
