"""Hugging Face ``CLIPModel`` folders: the key mapping to OpenAI's layout, ``config.json``, and (sharded) reading."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from ...errors import BackboneWarning, WeightsError
from ..architectures import SHAPE_FIELDS, shapes_from_state_dict
from ..model import CLIPConfig
from .formats import detect_format, preview, read_safetensors, read_torch, unwrap_state_dict

# Per-layer renames inside an encoder layer (HF -> OpenAI resblock). q/k/v are handled separately.
_HF_LAYER_RENAMES = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_HF_RENAMES = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
# HF stores projections as nn.Linear weights [out, in]; OpenAI multiplies x @ P with P of shape [in, out].
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_HF_IGNORED = re.compile(r"^(text_model|vision_model)\.embeddings\.position_ids$")
_HF_LAYER = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
_TOWER_PREFIX = {"text_model": "transformer.resblocks.", "vision_model": "visual.transformer.resblocks."}


def hf_to_openai_state_dict(hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a Hugging Face ``CLIPModel`` state dict to OpenAI key names and layouts.

    q/k/v projections are concatenated (in that order, as ``nn.MultiheadAttention`` packs them) into
    ``attn.in_proj_weight``/``in_proj_bias``; ``visual_projection``/``text_projection`` weights are transposed.
    ``position_ids`` buffers are ignored. A key no rule maps, or an incomplete q/k/v triple, raises WeightsError.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unmapped: list[str] = []
    for key, value in hf_state_dict.items():
        if _HF_IGNORED.match(key):
            continue
        if key in _HF_RENAMES:
            out[_HF_RENAMES[key]] = value
            continue
        if key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = value.t().contiguous()
            continue
        layer = _HF_LAYER.match(key)
        if layer:
            tower, index, rest = layer.groups()
            prefix = f"{_TOWER_PREFIX[tower]}{index}."
            if rest in _HF_LAYER_RENAMES:
                out[prefix + _HF_LAYER_RENAMES[rest]] = value
                continue
            proj = _HF_QKV.match(rest)
            if proj:
                qkv.setdefault((prefix, proj.group(2)), {})[proj.group(1)] = value
                continue
        unmapped.append(key)
    incomplete = []
    for (prefix, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            incomplete.append(f"{prefix}attn (has {'/'.join(sorted(parts))}_proj.{kind} only)")
            continue
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"{prefix}attn.{name}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unmapped or incomplete:
        problems = []
        if unmapped:
            problems.append(f"{len(unmapped)} keys with no OpenAI equivalent: {preview(unmapped)}")
        if incomplete:
            problems.append(f"incomplete q/k/v projections: {preview(incomplete)}")
        raise WeightsError("cannot map these Hugging Face CLIPModel weights to OpenAI layout: " + "; ".join(problems))
    return out


_QUICK_GELU_ACTS = {"quick_gelu": True, "gelu": False}


def hf_config_to_clip_config(hf_config: Mapping, state_dict: Mapping[str, torch.Tensor] | None = None,
                             source: str = "config.json") -> CLIPConfig:
    """A :class:`CLIPConfig` from a Hugging Face ``CLIPModel`` ``config.json`` dict.

    Values missing from the file take transformers' ``CLIPConfig`` defaults. When ``state_dict`` (OpenAI layout) is
    given, its shapes must agree with the config.
    """
    if hf_config.get("model_type", "clip") != "clip":
        raise WeightsError(f"{source} describes a {hf_config.get('model_type')!r} model; only Hugging Face "
                           f"CLIPModel folders (model_type 'clip') are supported.")
    text = {**_HF_TEXT_DEFAULTS, **(hf_config.get("text_config") or {})}
    vision = {**_HF_VISION_DEFAULTS, **(hf_config.get("vision_config") or {})}
    acts = {}
    for tower, cfg in (("text", text), ("vision", vision)):
        act = cfg["hidden_act"]
        if act not in _QUICK_GELU_ACTS:
            raise WeightsError(f"{source}: {tower} hidden_act {act!r} is not supported (our CLIP implements "
                               f"'quick_gelu' and 'gelu').")
        acts[tower] = _QUICK_GELU_ACTS[act]
        if abs(float(cfg.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
            warnings.warn(f"{source}: {tower} layer_norm_eps is {cfg['layer_norm_eps']}; our CLIP uses 1e-5, so "
                          f"outputs will differ slightly from transformers'.", BackboneWarning, stacklevel=3)
    if acts["text"] != acts["vision"]:
        raise WeightsError(f"{source}: the text and vision towers use different activations "
                           f"({text['hidden_act']} / {vision['hidden_act']}); our CLIP uses one for both.")
    try:
        config = CLIPConfig(
            embed_dim=int(hf_config.get("projection_dim", 512)),
            image_size=int(vision["image_size"]),
            vision_layers=int(vision["num_hidden_layers"]),
            vision_width=int(vision["hidden_size"]),
            vision_patch_size=int(vision["patch_size"]),
            vision_heads=int(vision["num_attention_heads"]),
            context_length=int(text["max_position_embeddings"]),
            vocab_size=int(text["vocab_size"]),
            text_width=int(text["hidden_size"]),
            text_heads=int(text["num_attention_heads"]),
            text_layers=int(text["num_hidden_layers"]),
            quick_gelu=acts["text"],
            vision_mlp_width=_hf_mlp_width(vision),
            text_mlp_width=_hf_mlp_width(text),
        )
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{source} has an invalid CLIP configuration: {e}") from e
    if state_dict is not None:
        try:
            inferred = shapes_from_state_dict(state_dict)
        except KeyError as e:
            raise WeightsError(f"{source}: the weights are not a complete CLIPModel: {e.args[0]}") from e
        diffs = [f"{f} {getattr(config, f)} in config vs {inferred[f]} in the weights"
                 for f in SHAPE_FIELDS if getattr(config, f) != inferred[f]]
        if diffs:
            raise WeightsError(f"{source} does not match its weights: " + "; ".join(diffs))
    return config


def _hf_mlp_width(tower: Mapping) -> int | None:
    width = int(tower["intermediate_size"])
    return None if width == 4 * int(tower["hidden_size"]) else width


# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults (ViT-B/32), for keys absent from a file.
_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5)
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)

_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")


def read_hf_folder(folder: Path) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    config_path = folder / "config.json"
    try:
        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read {config_path}: {e}") from e
    if not isinstance(hf_config, dict):
        raise WeightsError(f"{config_path} is not a JSON object.")
    weights_name = next((n for n in _HF_WEIGHT_FILES if (folder / n).is_file()), None)
    if weights_name is None:
        raise WeightsError(f"{folder} has config.json but no weights: expected one of {', '.join(_HF_WEIGHT_FILES)}.")
    if weights_name.endswith(".index.json"):
        index_path = folder / weights_name
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"cannot read the shard index {index_path}: {e}") from e
        shards = sorted(set(weight_map.values()))
    else:
        shards = [weights_name]
    hf_state_dict: dict[str, torch.Tensor] = {}
    for shard in shards:
        shard_path = folder / shard
        if not shard_path.is_file():
            raise WeightsError(f"{folder}: the shard {shard} listed in {weights_name} does not exist.")
        fmt = detect_format(shard_path)
        if fmt == "safetensors":
            hf_state_dict.update(read_safetensors(shard_path))
        elif fmt == "torch":
            hf_state_dict.update(unwrap_state_dict(read_torch(shard_path), shard_path))
        else:
            raise WeightsError(f"{shard_path} is a {fmt} file; a Hugging Face folder holds safetensors or "
                               f"pytorch_model.bin weights.")
    state_dict = hf_to_openai_state_dict(hf_state_dict)
    return state_dict, hf_config_to_clip_config(hf_config, state_dict, source=str(config_path))
