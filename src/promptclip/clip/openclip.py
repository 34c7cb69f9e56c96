"""open_clip's pretrained weights in OpenAI layout: the registry, open_clip's metadata file, and Hub downloads.

open_clip (mlfoundations/open_clip) saves the CLIPs it trains with OpenAI's state-dict key names, so our model loads
them as they are. What a state dict does not say is the activation (open_clip's default is GELU; OpenAI's, MetaCLIP's
and DFN's weights use QuickGELU) and the width of the attention heads (64 except in ViT-H-14, ViT-g-14 and
ViT-bigG-14). This module holds both for the popular weights, as data read from open_clip's ``pretrained.py`` and
``model_configs/*.json``, and reads them from the ``open_clip_config.json`` open_clip publishes beside its weights.

Names: ``open_clip:<model>/<tag>`` in open_clip's spelling (``open_clip:ViT-B-16/laion2b_s34b_b88k``; the
``<model>-quickgelu`` spelling and ``<model>:<tag>`` are accepted too), or ``hf-hub:<repo>`` as in open_clip
(``hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K``, any Hub repository with an ``open_clip_config.json``).

Downloads go through ``huggingface_hub`` (the ``hf`` extra) into its cache (``HF_HOME``/``HF_HUB_CACHE``; a file
open_clip already downloaded is found there), from ``HF_ENDPOINT`` when set. Verification: the file's sha256 must be
the one the Hub lists for it (the name of the cached blob), and its tensors must have exactly the shapes of the
registered architecture (strict load).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackboneWarning, WeightsError
from .architectures import ARCHITECTURES, OPEN_CLIP_QUICKGELU_SUFFIX
from .model import OPENAI_MEAN, OPENAI_STD, CLIPConfig

OPEN_CLIP_PREFIX = "open_clip:"
HF_HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's order of preference
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class OpenClipWeights:
    """One of open_clip's pretrained tags: ``model`` is a key of ``ARCHITECTURES`` (open_clip's model name)."""

    model: str
    tag: str
    hf_hub: str
    quick_gelu: bool = False
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    @property
    def name(self) -> str:
        return f"{OPEN_CLIP_PREFIX}{self.model}/{self.tag}"

    @property
    def config(self) -> CLIPConfig:
        return dataclasses.replace(ARCHITECTURES[self.model], quick_gelu=self.quick_gelu, image_mean=self.mean,
                                   image_std=self.std)


def _tags(model: str, *entries: tuple) -> list[OpenClipWeights]:
    """Entries ``(tag, hub repository)`` or ``(tag, hub repository, {field: value})`` of one model."""
    return [OpenClipWeights(model, tag, repo, **(extra[0] if extra else {})) for tag, repo, *extra in entries]


_QG = {"quick_gelu": True}

# Source: open_clip's src/open_clip/pretrained.py (the _pcfg entries' hf_hub, quick_gelu, mean and std), for the
# OpenAI-layout models whose preprocessing our transforms reproduce (bicubic shorter-side resize + centre crop;
# DFN5B's ViT-H-14 'squash' resize is left out).
OPEN_CLIP_PRETRAINED: dict[str, OpenClipWeights] = {w.name: w for w in [
    *_tags("RN50",
           ("openai", "timm/resnet50_clip.openai", _QG),
           ("yfcc15m", "timm/resnet50_clip.yfcc15m", _QG),
           ("cc12m", "timm/resnet50_clip.cc12m", _QG)),
    *_tags("RN101",
           ("openai", "timm/resnet101_clip.openai", _QG),
           ("yfcc15m", "timm/resnet101_clip.yfcc15m", _QG)),
    *_tags("ViT-B-32",
           ("openai", "timm/vit_base_patch32_clip_224.openai", _QG),
           ("laion400m_e31", "timm/vit_base_patch32_clip_224.laion400m_e31", _QG),
           ("laion400m_e32", "timm/vit_base_patch32_clip_224.laion400m_e32", _QG),
           ("laion2b_e16", "timm/vit_base_patch32_clip_224.laion2b_e16"),
           ("laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
           ("datacomp_xl_s13b_b90k", "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"),
           ("metaclip_400m", "timm/vit_base_patch32_clip_224.metaclip_400m", _QG),
           ("metaclip_fullcc", "timm/vit_base_patch32_clip_224.metaclip_2pt5b", _QG)),
    *_tags("ViT-B-16",
           ("openai", "timm/vit_base_patch16_clip_224.openai", _QG),
           ("laion400m_e31", "timm/vit_base_patch16_clip_224.laion400m_e31"),
           ("laion400m_e32", "timm/vit_base_patch16_clip_224.laion400m_e32"),
           ("laion2b_s34b_b88k", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
           ("datacomp_xl_s13b_b90k", "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K"),
           ("datacomp_l_s1b_b8k", "laion/CLIP-ViT-B-16-DataComp.L-s1B-b8K"),
           ("dfn2b", "apple/DFN2B-CLIP-ViT-B-16", _QG),
           ("metaclip_400m", "timm/vit_base_patch16_clip_224.metaclip_400m", _QG),
           ("metaclip_fullcc", "timm/vit_base_patch16_clip_224.metaclip_2pt5b", _QG)),
    *_tags("ViT-L-14",
           ("openai", "timm/vit_large_patch14_clip_224.openai", _QG),
           ("laion400m_e31", "timm/vit_large_patch14_clip_224.laion400m_e31"),
           ("laion400m_e32", "timm/vit_large_patch14_clip_224.laion400m_e32"),
           ("laion2b_s32b_b82k", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
            {"mean": INCEPTION_MEAN, "std": INCEPTION_STD}),
           ("datacomp_xl_s13b_b90k", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"),
           ("metaclip_400m", "timm/vit_large_patch14_clip_224.metaclip_400m", _QG),
           ("metaclip_fullcc", "timm/vit_large_patch14_clip_224.metaclip_2pt5b", _QG),
           ("dfn2b", "apple/DFN2B-CLIP-ViT-L-14", _QG),
           ("dfn2b_s39b", "apple/DFN2B-CLIP-ViT-L-14-39B")),
    *_tags("ViT-L-14-336",
           ("openai", "timm/vit_large_patch14_clip_336.openai", _QG)),
    *_tags("ViT-H-14",
           ("laion2b_s32b_b79k", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
           ("metaclip_fullcc", "timm/vit_huge_patch14_clip_224.metaclip_2pt5b", _QG),
           ("metaclip_altogether", "timm/vit_huge_patch14_clip_224.metaclip_altogether")),
    *_tags("ViT-g-14",
           ("laion2b_s12b_b42k", "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"),
           ("laion2b_s34b_b88k", "laion/CLIP-ViT-g-14-laion2B-s34B-b88K")),
    *_tags("ViT-bigG-14",
           ("laion2b_s39b_b160k", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"),
           ("metaclip_fullcc", "timm/vit_gigantic_patch14_clip_224.metaclip_2pt5b", _QG)),
]}


def lookup(name: str) -> OpenClipWeights:
    """The registry entry of ``open_clip:<model>/<tag>`` (also ``<model>:<tag>``, ``<model>-quickgelu``, and tags
    written as open_clip normalises them: ``laion2b-s34b-b88k`` is ``laion2b_s34b_b88k``)."""
    rest = name[len(OPEN_CLIP_PREFIX):] if name.startswith(OPEN_CLIP_PREFIX) else name
    model, sep, tag = rest.replace(":", "/").partition("/")
    if not sep or not model or not tag:
        raise WeightsError(f"{name!r}: an open_clip name is open_clip:<model>/<pretrained tag>, e.g. "
                           f"open_clip:ViT-B-16/laion2b_s34b_b88k (see `promptclip list backbones`).")
    tag = tag.lower().replace("-", "_")
    base = model.removesuffix(OPEN_CLIP_QUICKGELU_SUFFIX)
    entry = OPEN_CLIP_PRETRAINED.get(f"{OPEN_CLIP_PREFIX}{base}/{tag}")
    if entry is None:
        close = difflib.get_close_matches(f"{OPEN_CLIP_PREFIX}{base}/{tag}", list(OPEN_CLIP_PRETRAINED), n=3,
                                          cutoff=0.6)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise WeightsError(
            f"{name!r} is not among the open_clip weights promptclip knows.{hint} Known: "
            f"{', '.join(OPEN_CLIP_PRETRAINED)}. Any open_clip Hub repository in OpenAI layout also loads as "
            f"hf-hub:<org>/<repo>, and a downloaded one as a path (its folder, or the weights file with "
            f"--backbone-arch)."
        )
    if base != model and not entry.quick_gelu:
        raise WeightsError(f"{name!r}: {entry.name} was trained with GELU, not QuickGELU; drop "
                           f"{OPEN_CLIP_QUICKGELU_SUFFIX!r} from the model name.")
    return entry


def entry_for_repo(repo_id: str) -> OpenClipWeights | None:
    return next((w for w in OPEN_CLIP_PRETRAINED.values() if w.hf_hub.lower() == repo_id.lower()), None)


# ------------------------------------------------------------------------------- open_clip_config.json

# Keys of open_clip's model config (CLIPVisionCfg, CLIPTextCfg, CLIP) that change nothing at inference, and keys
# that must keep their open_clip default for the model to be OpenAI's architecture (with that default).
_IGNORED = {
    "top": {"cast_dtype", "init_logit_scale"},
    "vision_cfg": {"patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads", "image_seq_len",
                   "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
                   "timm_drop_path"},
    "text_cfg": {"pad_id", "bos_id", "eos_id", "output_tokens", "tiktoken_name"},
}
_DEFAULT_ONLY = {
    "top": {"custom_text": False, "init_logit_bias": None},
    "vision_cfg": {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                   "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
                   "act_kwargs": None, "norm_kwargs": None, "block_type": None, "qk_norm": False,
                   "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                   "scale_fc": False, "timm_model_name": None, "timm_model_kwargs": None},
    "text_cfg": {"text_arch": "clip", "hf_model_name": None, "hf_tokenizer_name": None, "tokenizer_mode": None,
                 "tokenizer_kwargs": None, "tokenizer_type": "", "variable_text": False, "ls_init_value": None,
                 "embed_cls": False, "no_causal_mask": False, "final_ln_after_pool": False, "pool_type": "argmax",
                 "proj_bias": False, "proj_type": "linear", "act_kwargs": None, "norm_kwargs": None,
                 "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
                 "scale_attn_inner": False, "scale_attn": False, "scale_fc": False},
}
_USED = {
    "top": {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"},
    "vision_cfg": {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"},
    "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"},
}
_PREPROCESS_KEYS = {"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"}


def config_from_open_clip(data: Mapping, source: str) -> CLIPConfig:
    """A :class:`CLIPConfig` from open_clip's ``open_clip_config.json`` (``{"model_cfg", "preprocess_cfg"}``) or a
    bare model config (``src/open_clip/model_configs/<name>.json``).

    open_clip's defaults apply to absent keys (GELU, 64-wide heads, MLP ratio 4). A key that makes the model other
    than OpenAI's architecture (a timm or Hugging Face tower, layer scale, attention pooling, another tokenizer, ...)
    is an error naming it, as is a key open_clip does not have.
    """
    model_cfg = data.get("model_cfg", data) if isinstance(data, Mapping) else None
    preprocess = data.get("preprocess_cfg", {}) if isinstance(data, Mapping) and "model_cfg" in data else {}
    if not isinstance(model_cfg, Mapping) or not isinstance(model_cfg.get("vision_cfg"), Mapping) \
            or not isinstance(model_cfg.get("text_cfg"), Mapping) or "embed_dim" not in model_cfg:
        raise WeightsError(f"{source} is not an open_clip model config: expected embed_dim, vision_cfg and text_cfg "
                           f"(directly or under model_cfg).")
    sections = {"top": model_cfg, "vision_cfg": model_cfg["vision_cfg"], "text_cfg": model_cfg["text_cfg"]}
    problems = []
    for section, values in sections.items():
        where = "" if section == "top" else f"{section}."
        for key, value in values.items():
            if key in _USED[section] or key in _IGNORED[section]:
                continue
            if key not in _DEFAULT_ONLY[section]:
                problems.append(f"{where}{key} (not a key promptclip knows in open_clip's CLIP configs)")
            elif value != _DEFAULT_ONLY[section][key] and not (key == "block_type" and value == "default"):
                problems.append(f"{where}{key}={value!r}")
    if problems:
        raise WeightsError(
            f"{source} describes a model that promptclip's CLIP (OpenAI's architecture) does not implement: "
            f"{', '.join(problems)}. Only open_clip models in OpenAI layout load (the ViT and ResNet CLIPs of "
            f"`promptclip list backbones`); use open_clip itself for this one."
        )
    vision, text = sections["vision_cfg"], sections["text_cfg"]
    try:
        layers = vision.get("layers", 12)
        is_resnet = isinstance(layers, (list, tuple))
        width, head_width = int(vision.get("width", 768)), int(vision.get("head_width", 64))
        text_width = int(text.get("width", 512))
        image_size = vision.get("image_size", 224)
        if isinstance(image_size, (list, tuple)):
            if len(set(image_size)) != 1:
                raise ValueError(f"vision_cfg.image_size {image_size} is not square")
            image_size = image_size[0]
        vision_mlp = int(width * float(vision.get("mlp_ratio", 4.0)))
        text_mlp = int(text_width * float(text.get("mlp_ratio", 4.0)))
        mean, std = _normalisation(preprocess, source)
        config = CLIPConfig(
            embed_dim=int(model_cfg["embed_dim"]),
            image_size=int(image_size),
            vision_layers=tuple(int(n) for n in layers) if is_resnet else int(layers),
            vision_width=width,
            vision_patch_size=None if is_resnet else int(vision.get("patch_size", 16)),
            vision_heads=(width * 32 if is_resnet else width) // head_width,
            context_length=int(text.get("context_length", 77)),
            vocab_size=int(text.get("vocab_size", 49408)),
            text_width=text_width,
            text_heads=int(text.get("heads", 8)),
            text_layers=int(text.get("layers", 12)),
            quick_gelu=bool(model_cfg.get("quick_gelu", False)),
            vision_mlp_width=None if is_resnet or vision_mlp == 4 * width else vision_mlp,
            text_mlp_width=None if text_mlp == 4 * text_width else text_mlp,
            image_mean=mean,
            image_std=std,
        )
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise WeightsError(f"{source} has an invalid open_clip model config: {e}") from e
    if (width * 32 if is_resnet else width) % head_width:
        raise WeightsError(f"{source}: vision_cfg.width {width} is not a multiple of vision_cfg.head_width "
                           f"{head_width}.")
    return config


def _normalisation(preprocess: Mapping, source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    unknown = sorted(set(preprocess) - _PREPROCESS_KEYS)
    if unknown:
        raise WeightsError(f"{source}: preprocess_cfg has keys open_clip does not have: {', '.join(unknown)}.")
    differs = {k: preprocess[k] for k, ours in (("interpolation", "bicubic"), ("resize_mode", "shortest"))
               if preprocess.get(k, ours) != ours}
    if differs:
        warnings.warn(f"{source}: preprocess_cfg {differs}; promptclip's transforms resize the shorter side "
                      f"(bicubic) and centre-crop, so inputs differ slightly from the ones the model was trained "
                      f"with.", BackboneWarning, stacklevel=4)
    mean, std = tuple(preprocess.get("mean", OPENAI_MEAN)), tuple(preprocess.get("std", OPENAI_STD))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"preprocess_cfg mean {mean} / std {std} must have 3 values (RGB)")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def read_config_file(path: str | os.PathLike) -> CLIPConfig:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read the open_clip config {path}: {e}") from e
    return config_from_open_clip(data, str(path))


def weights_in_folder(folder: Path) -> Path | None:
    """open_clip's weights file in a (Hub snapshot) folder, safetensors first, or None."""
    return next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)


# ------------------------------------------------------------------------------------------- Hub downloads


def hub_repo(name: str) -> str:
    """The repository of an ``hf-hub:<org>/<repo>`` name; an empty one is an error of its own."""
    repo_id = name[len(HF_HUB_PREFIX):].strip("/")
    if not repo_id:
        raise WeightsError(f"{name!r} names no repository: give hf-hub:<org>/<repo>, an open_clip repository of the "
                           "Hugging Face Hub (e.g. hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K; `promptclip list "
                           "backbones` lists the known ones)")
    return repo_id


def _hub(what: str = "", repo_id: str = "<org>/<repo>"):
    try:
        import huggingface_hub
    except ImportError as e:
        raise WeightsError(f"{what or 'open_clip weights'} ({repo_id} on the Hugging Face Hub) is downloaded with "
                           'huggingface_hub, which is not installed: pip install "promptclip[hf]". '
                           + _local_copy_hint(repo_id)) from e
    return huggingface_hub


def _local_copy_hint(repo_id: str = "<org>/<repo>", activation: str = "--gelu or --quick-gelu") -> str:
    return (f"To use a copy you already have, pass its folder (the one holding {CONFIG_FILE} and "
            f"{WEIGHT_FILES[1]}) as --backbone /path/to/folder, or the weights file with what it cannot say itself: "
            f"--backbone /path/to/{WEIGHT_FILES[1]} {activation} (or --backbone-arch). Files downloaded before "
            f"(by open_clip too) are found in the Hugging Face cache (HF_HOME / HF_HUB_CACHE) with HF_HUB_OFFLINE=1; "
            f"a mirror is used with HF_ENDPOINT. The files are at https://huggingface.co/{repo_id}.")


def hub_download(repo_id: str, filenames: tuple[str, ...], cache_dir: str | os.PathLike | None = None,
                 what: str = "", activation_hint: str = "--gelu or --quick-gelu") -> Path:
    """The first of ``filenames`` that ``repo_id`` serves (or the cache holds), downloaded and sha256-verified."""
    hub = _hub(what, repo_id)
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    what = what or repo_id
    offline, absent, other = [], [], []
    for filename in filenames:
        try:
            path = Path(hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir))
        except LocalEntryNotFoundError as e:  # offline (or HF_HUB_OFFLINE) and not in the cache
            offline.append((filename, e))
        except EntryNotFoundError as e:  # the repository has no such file
            absent.append((filename, e))
        except RepositoryNotFoundError as e:
            raise WeightsError(f"{what}: the Hub has no repository {repo_id} (or it is private or gated: log in with "
                               f"`hf auth login`). {_local_copy_hint(repo_id, activation_hint)}") from e
        except (HfHubHTTPError, OSError, ValueError) as e:
            other.append((filename, e))
        else:
            verify_hub_file(path, f"{repo_id}/{filename}")
            return path
    if offline:
        raise WeightsError(
            f"could not download {what} from the Hugging Face Hub ({repo_id}: {', '.join(f for f, _ in offline)}): "
            f"the machine looks offline (or HF_HUB_OFFLINE is set) and the files are not in the cache. "
            f"{_local_copy_hint(repo_id, activation_hint)}")
    if other:
        filename, error = other[0]
        raise WeightsError(f"could not download {repo_id}/{filename} for {what}: {type(error).__name__}: {error}. "
                           f"{_local_copy_hint(repo_id, activation_hint)}") from error
    raise WeightsError(f"{what}: the Hub repository {repo_id} has none of {', '.join(filenames)}; it is not an "
                       f"open_clip repository in the layout promptclip reads.")


def cached_file(repo_id: str) -> Path | None:
    """open_clip's weights of ``repo_id`` if the Hugging Face cache holds them (no network; None without
    huggingface_hub)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in WEIGHT_FILES:
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


_SHA256 = re.compile(r"[0-9a-f]{64}")


def verify_hub_file(path: Path, label: str) -> None:
    """The Hub names a cached large file by its sha256 (its LFS object id): the content must have that hash.

    Small files (configs) are stored in git, not LFS, and named by their git hash; they are not checked here (a bad
    JSON file fails to parse)."""
    blob = path.resolve()
    if not _SHA256.fullmatch(blob.name):
        return
    digest = hashlib.sha256()
    with open(blob, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != blob.name:
        raise WeightsError(f"{label}: the cached file {blob} has sha256 {digest.hexdigest()}, but the Hub lists "
                           f"{blob.name}; it is corrupt (an interrupted download?). Delete it and load again.")
