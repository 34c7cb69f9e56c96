"""Pretrained CLIP weights: the OpenAI registry, verified downloads, and loading from local files.

Accepted sources for ``load_model(name_or_path)``:

- a registry name (``RN50`` ... ``ViT-L/14@336px``): downloaded once into :func:`cache_dir`, sha256-verified;
- an open_clip name (``open_clip:<model>/<tag>``, ``hf-hub:<repo>``): see :mod:`promptclip.clip.openclip`;
- a test backbone name (``tiny``, ``tiny-rn``, ``golden-mini``): seeded random weights, nothing is read;
- a path. The format is detected from the file's content, not from its suffix:

  * an OpenAI TorchScript archive (the official ``.pt`` files: a zip holding TorchScript code);
  * a plain state dict saved by ``torch.save`` (``.pt``/``.pth``/``.bin``; possibly nested under ``"state_dict"``
    or ``"model"`` with a ``"module."`` prefix, as open_clip and DDP checkpoints are) in OpenAI key layout;
  * a ``.safetensors`` file in OpenAI key layout;
  * an open_clip Hub folder (``open_clip_config.json`` + its weights file);
  * a Hugging Face ``CLIPModel`` folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, possibly
    sharded), whose keys are mapped to OpenAI names by :func:`hf_to_openai_state_dict`.

No pickled Python code ever runs (how each format is read safely: :mod:`.formats`). Every model returned is fp32, in
eval mode, with ``requires_grad=False`` on all parameters.

One concern a module, each importing only the ones listed before it:

- ``registry``: OpenAI's downloadable checkpoints (``PRETRAINED``);
- ``downloads``: the cache directory and sha256-verified downloads;
- ``formats``: format detection and the single-file readers (TorchScript, ``torch.save``, safetensors);
- ``hf``: Hugging Face ``CLIPModel`` folders (key mapping, ``config.json``);
- ``build``: the architecture of a state dict (stated, declared or inferred) and the strict build of the model;
- ``load``: names and paths to models (``resolve``, ``read_state_dict``, ``load_backbone``, ``load_model``);
- ``fingerprint``: ``backbone_fingerprint``.

A new format is a new module beside ``hf``, a case in ``formats.detect_format`` and one in ``load.read_state_dict``.
"""

from ...errors import WeightsError
from .build import architecture_from, choose_config, infer_config, model_from_state_dict
from .downloads import cache_dir, download, file_sha256
from .fingerprint import FINGERPRINT_SAMPLES, backbone_fingerprint
from .formats import ACCEPTED_FORMATS, NON_WEIGHT_KEYS, Declared, detect_format
from .hf import hf_config_to_clip_config, hf_to_openai_state_dict
from .load import load_backbone, load_model, read_state_dict, resolve
from .registry import PRETRAINED, PretrainedWeights, available_models

__all__ = [
    "ACCEPTED_FORMATS",
    "FINGERPRINT_SAMPLES",
    "NON_WEIGHT_KEYS",
    "PRETRAINED",
    "Declared",
    "PretrainedWeights",
    "WeightsError",
    "architecture_from",
    "available_models",
    "backbone_fingerprint",
    "cache_dir",
    "choose_config",
    "detect_format",
    "download",
    "file_sha256",
    "hf_config_to_clip_config",
    "hf_to_openai_state_dict",
    "infer_config",
    "load_backbone",
    "load_model",
    "model_from_state_dict",
    "read_state_dict",
    "resolve",
]
