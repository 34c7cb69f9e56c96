"""From a name or path to a model: what a name points at (downloaded if needed), reading any accepted local source,
and the loaders that build the frozen CLIP."""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path

import torch

from ...errors import WeightsError
from .. import openclip
from ..architectures import ARCHITECTURES, GOLDEN_MINI_SEED, RANDOM_ONLY, build_random
from ..model import CLIP, CLIPConfig
from .build import choose_config, frozen, model_from_state_dict
from .downloads import cache_dir as default_cache_dir  # resolve() takes a cache_dir argument that shadows the name
from .downloads import download
from .formats import (
    NON_WEIGHT_KEYS,
    Declared,
    detect_format,
    read_safetensors,
    read_torch,
    read_torchscript,
    unwrap_state_dict,
)
from .hf import read_hf_folder
from .registry import PRETRAINED

_WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".jit"}


def resolve(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, progress: bool = True
            ) -> tuple[str, object]:
    """What a name points at, downloaded if needed: ``("pretrained", local_path)`` (OpenAI's registry),
    ``("hub", (local_path, Declared))`` (open_clip names), ``("random", name)`` or ``("path", path)``."""
    name = os.fspath(name_or_path)
    if name in PRETRAINED:
        entry = PRETRAINED[name]
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        return "pretrained", download(entry.url, entry.sha256, root, progress=progress)
    if name.startswith(openclip.OPEN_CLIP_PREFIX) or name.startswith(openclip.HF_HUB_PREFIX):
        return "hub", _resolve_hub(name, cache_dir)
    if name in RANDOM_ONLY:
        return "random", name
    path = Path(name).expanduser()
    if path.exists():
        return "path", path
    looks_like_path = (name.startswith(("/", "./", "../", "~")) or "\\" in name or name.count("/") >= 2
                       or path.suffix.lower() in _WEIGHT_SUFFIXES)
    if looks_like_path:
        raise WeightsError(f"no such file or directory: {path.absolute()} (give the path of a weights file or "
                           f"Hugging Face CLIPModel folder, or a model name: {', '.join(PRETRAINED)})")
    names = list(PRETRAINED) + list(RANDOM_ONLY)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    open_clip_names = [w.name for w in openclip.OPEN_CLIP_PRETRAINED.values() if w.model == name]
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    if open_clip_names:
        hint += f" As an open_clip name, {name} has the weights {', '.join(open_clip_names)}."
    raise WeightsError(
        f"{name!r} is neither a known model name nor an existing file or folder.{hint} Available models: "
        f"{', '.join(PRETRAINED)}; open_clip's as open_clip:<model>/<tag> or hf-hub:<repo> (`promptclip list "
        f"backbones`); random-weight test backbones: {', '.join(RANDOM_ONLY)}; or pass the path of a weights file, "
        f"open_clip Hub folder or Hugging Face CLIPModel folder."
    )


def _resolve_hub(name: str, cache_dir: str | os.PathLike | None) -> tuple[Path, Declared]:
    """An open_clip name downloaded from the Hub: the weights file and the architecture that goes with it."""
    if name.startswith(openclip.OPEN_CLIP_PREFIX):
        entry = openclip.lookup(name)
    else:
        repo_id = openclip.hub_repo(name)
        entry = openclip.entry_for_repo(repo_id)
    if entry is not None:
        activation = "--quick-gelu" if entry.quick_gelu else "--gelu"
        path = openclip.hub_download(entry.hf_hub, openclip.WEIGHT_FILES, cache_dir, what=entry.name,
                                     activation_hint=activation)
        return path, Declared(config=entry.config, by=f"promptclip's registry entry {entry.name}")
    config_path = openclip.hub_download(repo_id, (openclip.CONFIG_FILE,), cache_dir, what=name)
    config = openclip.read_config_file(config_path)
    path = openclip.hub_download(repo_id, openclip.WEIGHT_FILES, cache_dir, what=name,
                                 activation_hint="--quick-gelu" if config.quick_gelu else "--gelu")
    return path, Declared(config=config, by=f"{repo_id}'s {openclip.CONFIG_FILE}")


def read_state_dict(path: str | os.PathLike, sidecar: bool = True) -> tuple[dict[str, torch.Tensor], Declared]:
    """Read weights from any accepted local source: an OpenAI-layout state dict and what the source declares.

    With ``sidecar``, an open_clip weights file (``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``)
    reads the ``open_clip_config.json`` beside it, as the folder holding both does."""
    path = Path(path).expanduser()
    fmt = detect_format(path)
    declared = Declared()
    if fmt == "hf-folder":
        state_dict, config = read_hf_folder(path)
        declared = Declared(config=config, by=str(path / "config.json"))
    elif fmt == "open_clip-folder":
        return read_state_dict(openclip.weights_in_folder(path), sidecar=True)
    elif fmt == "torchscript":
        state_dict = read_torchscript(path)
        declared = Declared(quick_gelu=True, by="an OpenAI TorchScript archive (OpenAI's CLIPs use QuickGELU)")
    elif fmt == "safetensors":
        state_dict = unwrap_state_dict(read_safetensors(path), path)
    else:
        state_dict = unwrap_state_dict(read_torch(path), path)
    config_file = path.parent / openclip.CONFIG_FILE
    if sidecar and fmt in ("torch", "safetensors") and path.name in openclip.WEIGHT_FILES and config_file.is_file():
        declared = Declared(config=openclip.read_config_file(config_file), by=str(config_file))
    for key in NON_WEIGHT_KEYS:
        state_dict.pop(key, None)
    return state_dict, declared


def load_backbone(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                  cache_dir: str | os.PathLike | None = None, quick_gelu: bool | None = None, progress: bool = True,
                  seed: int = GOLDEN_MINI_SEED, arch: str | os.PathLike | CLIPConfig | None = None
                  ) -> tuple[CLIP, str]:
    """Load a frozen fp32 CLIP and say where it came from.

    Returns ``(model, source)``: ``source`` is the local file or folder read (downloaded first for registry
    names), or ``"random:<name>:seed=<seed>"`` for the test backbones. The architecture is the one ``arch`` names
    (:func:`architecture_from`), else the one the source declares (registry entry, ``config.json``,
    ``open_clip_config.json``), else the one of its shapes; ``quick_gelu`` sets the activation. A plain state dict
    does not say its activation: without ``quick_gelu`` or ``arch`` it is an error that says how to state it.
    """
    kind, where = resolve(name_or_path, cache_dir=cache_dir, progress=progress)
    if kind == "random":
        if arch is not None:
            raise WeightsError(f"{name_or_path} is a test backbone with its own architecture; an architecture "
                               "(--backbone-arch, arch=) applies only to weights files")
        config = ARCHITECTURES[where]
        if quick_gelu is not None and quick_gelu != config.quick_gelu:
            config = dataclasses.replace(config, quick_gelu=quick_gelu)
        model = frozen(build_random(config, seed=seed))
        source = f"random:{where}:seed={seed}"
    else:
        if kind == "hub":
            where, declared = where
            state_dict, _ = read_state_dict(where, sidecar=False)  # the registry entry or the config read before
        else:
            state_dict, declared = read_state_dict(where)
        if kind == "pretrained":
            entry = PRETRAINED[os.fspath(name_or_path)]
            declared = Declared(quick_gelu=entry.quick_gelu, by=f"the registry entry {entry.name}")
        from ...finite import check_finite

        check_finite(state_dict, f"backbone weights {where}", WeightsError, "the file is damaged; get it again")
        config, origin = choose_config(state_dict, declared, str(where), arch, quick_gelu)
        model = model_from_state_dict(state_dict, config=config, source=str(where), origin=origin)
        source = str(where)
    return model.to(device), source


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
               cache_dir: str | os.PathLike | None = None, quick_gelu: bool | None = None, progress: bool = True,
               seed: int = GOLDEN_MINI_SEED, arch: str | os.PathLike | CLIPConfig | None = None) -> CLIP:
    """A frozen fp32 CLIP in eval mode from a registry name, a test backbone name or a local path."""
    return load_backbone(name_or_path, device=device, cache_dir=cache_dir, quick_gelu=quick_gelu,
                         progress=progress, seed=seed, arch=arch)[0]
