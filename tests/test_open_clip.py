"""open_clip weights: checkpoints in open_clip's Hub layout (with and without open_clip_config.json) loaded through
the CLI, checked against a reference forward written here (per-head attention, GELU or QuickGELU); the registry;
downloads from a local fake Hub (HF_ENDPOINT) and from a pre-populated Hub cache offline.

Every file is made by the test (random weights); no request leaves 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from promptclip.cli import _load_backbone, build_parser, main
from promptclip.clip import openclip
from promptclip.clip import weights as W
from promptclip.clip.architectures import ARCHITECTURES
from promptclip.errors import WeightsError

EOT, SOT = 49407, 49406
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads cost more than they bring

# Model configs in open_clip's format (src/open_clip/model_configs/*.json), tiny. HEAD80 has open_clip's ViT-H-14
# head width (a 64-wide default would give 5 heads instead of 4) and an MLP ratio like ViT-g-14's.
GELU_VIT = {"embed_dim": 48,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
HEAD80_VIT = {"embed_dim": 48,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 320, "head_width": 80, "mlp_ratio": 4.3637,
                             "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
QUICKGELU_VIT = {**GELU_VIT, "quick_gelu": True}


# ---------------------------------------------------------------------------------- checkpoints, reference


def open_clip_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes open_clip's CLIP (OpenAI layout) has for ``cfg``."""
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    w, tw, embed = vision["width"], text["width"], cfg["embed_dim"]
    grid = vision["image_size"] // vision["patch_size"]
    shapes = {"visual.class_embedding": (w,), "visual.positional_embedding": (grid * grid + 1, w),
              "visual.conv1.weight": (w, 3, vision["patch_size"], vision["patch_size"]), "visual.proj": (w, embed),
              "token_embedding.weight": (text["vocab_size"], tw), "positional_embedding": (text["context_length"], tw),
              "text_projection": (tw, embed)}
    for name, width in (("visual.ln_pre", w), ("visual.ln_post", w), ("ln_final", tw)):
        shapes.update({f"{name}.weight": (width,), f"{name}.bias": (width,)})
    for prefix, width, layers, ratio in (("visual.transformer", w, vision["layers"], vision.get("mlp_ratio", 4.0)),
                                         ("transformer", tw, text["layers"], text.get("mlp_ratio", 4.0))):
        mlp = int(width * ratio)
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}."
            shapes.update({p + "ln_1.weight": (width,), p + "ln_1.bias": (width,), p + "ln_2.weight": (width,),
                           p + "ln_2.bias": (width,), p + "attn.in_proj_weight": (3 * width, width),
                           p + "attn.in_proj_bias": (3 * width,), p + "attn.out_proj.weight": (width, width),
                           p + "attn.out_proj.bias": (width,), p + "mlp.c_fc.weight": (mlp, width),
                           p + "mlp.c_fc.bias": (mlp,), p + "mlp.c_proj.weight": (width, mlp),
                           p + "mlp.c_proj.bias": (width,)})
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in sorted(shapes.items()):
        r = torch.randn(shape, generator=g)
        if key.endswith("weight") and len(shape) == 1:  # LayerNorm gains
            state[key] = 1 + 0.2 * r
        elif key in ("visual.proj", "text_projection"):  # x @ P
            state[key] = r * shape[0] ** -0.5
        elif "embedding" in key or len(shape) == 1:
            state[key] = 0.05 * r
        else:  # nn.Linear / conv weights [out, in, ...]
            state[key] = r * math.prod(shape[1:]) ** -0.5
    state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return state


def save_open_clip_folder(folder: Path, cfg: dict, state: dict, config: bool = True, formats=("bin",),
                          mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)) -> Path:
    """The files open_clip's push_to_hf_hub writes: the state dict (torch.save, safetensors), open_clip_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    if "bin" in formats:
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    if "safetensors" in formats:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))
    if config:
        (folder / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": cfg, "preprocess_cfg": {"mean": list(mean), "std": list(std)}}, indent=2))
    return folder


def _act(x, quick_gelu):
    return x * torch.sigmoid(1.702 * x) if quick_gelu else F.gelu(x)


def _ln(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], 1e-5)


def _reference_blocks(x, state, prefix, layers, heads, quick_gelu, causal):
    """Pre-LN residual blocks with an explicit loop over heads (each head a contiguous slice of q, k, v)."""
    width = x.shape[-1]
    head = width // heads
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}."
        h = _ln(x, state, p + "ln_1")
        q, k, v = (h @ state[p + "attn.in_proj_weight"].T + state[p + "attn.in_proj_bias"]).split(width, dim=-1)
        attended = []
        for j in range(heads):
            cols = slice(j * head, (j + 1) * head)
            scores = q[..., cols] @ k[..., cols].transpose(-1, -2) / head ** 0.5
            if causal:
                n = scores.shape[-1]
                scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            attended.append(scores.softmax(dim=-1) @ v[..., cols])
        x = x + torch.cat(attended, dim=-1) @ state[p + "attn.out_proj.weight"].T + state[p + "attn.out_proj.bias"]
        h = _act(_ln(x, state, p + "ln_2") @ state[p + "mlp.c_fc.weight"].T + state[p + "mlp.c_fc.bias"], quick_gelu)
        x = x + h @ state[p + "mlp.c_proj.weight"].T + state[p + "mlp.c_proj.bias"]
    return x


def reference_features(cfg: dict, state: dict, images, tokens):
    """Image and text features of open_clip's CLIP (OpenAI layout) for ``cfg``, in float64."""
    state = {k: v.double() for k, v in state.items()}
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    quick_gelu = cfg.get("quick_gelu", False)
    patch, width = vision["patch_size"], vision["width"]
    patches = F.unfold(images.double(), patch, stride=patch).transpose(1, 2)  # [B, grid^2, 3 * patch^2]
    x = patches @ state["visual.conv1.weight"].reshape(width, -1).T
    x = torch.cat([state["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = _ln(x + state["visual.positional_embedding"], state, "visual.ln_pre")
    x = _reference_blocks(x, state, "visual.transformer", vision["layers"], width // vision.get("head_width", 64),
                          quick_gelu, causal=False)
    image = _ln(x[:, 0], state, "visual.ln_post") @ state["visual.proj"]
    t = state["token_embedding.weight"][tokens] + state["positional_embedding"]
    t = _reference_blocks(t, state, "transformer", text["layers"], text["heads"], quick_gelu, causal=True)
    t = _ln(t[torch.arange(tokens.shape[0]), tokens.argmax(dim=-1)], state, "ln_final")
    return image, t @ state["text_projection"]


def inputs(cfg: dict):
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    tokens = torch.zeros(3, 77, dtype=torch.long)
    for row, eot in enumerate((4, 11, 76)):
        tokens[row, 0], tokens[row, eot] = SOT, EOT
        tokens[row, 1:eot] = torch.randint(1, SOT - 1, (eot - 1,), generator=g)
    return images, tokens


def feature_error(model, cfg: dict, state: dict) -> tuple[float, float]:
    """``(max abs difference of our features from the reference, max abs of the reference)`` over both towers."""
    images, tokens = inputs(cfg)
    with torch.no_grad():
        ours = (model.encode_image(images).double(), model.encode_text(tokens).double())
    ref = reference_features(cfg, state, images, tokens)
    return (max((a - b).abs().max().item() for a, b in zip(ours, ref, strict=True)),
            max(r.abs().max().item() for r in ref))


def assert_matches(model, cfg, state):
    error, scale = feature_error(model, cfg, state)
    assert error <= 1e-5 * scale, (error, scale)


def assert_differs(model, cfg, state):
    """The trap the issue is about: a plausible wrong architecture loads, and its features are off."""
    error, scale = feature_error(model, cfg, state)
    assert error >= 1e-3 * scale, (error, scale)


def cli_backbone(argv: list[str]):
    """The backbone a CLI command loads: its own option parsing and loading helper."""
    args = build_parser().parse_args(["predict", "x.png", "--quiet", *argv])
    return _load_backbone(args.backbone, args)


def assert_banner(capsys, *phrases: str) -> None:
    """The CLI printed a warning banner holding ``phrases`` (on stderr, framed by '!')."""
    err = " ".join(line.strip("! ") for line in capsys.readouterr().err.splitlines())
    assert "WARNING:" in err, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("open_clip")
    out = {}
    for name, cfg in (("gelu", GELU_VIT), ("head80", HEAD80_VIT), ("quickgelu", QUICKGELU_VIT)):
        state = open_clip_state_dict(cfg, seed=len(out))
        out[name] = (cfg, state, save_open_clip_folder(root / name, cfg, state, formats=("bin", "safetensors")))
        save_open_clip_folder(root / f"{name}-bare", cfg, state, config=False)
    out["root"] = root
    return out


# -------------------------------------------------------------------------------- local files through the CLI


def test_reference_is_sensitive_to_activation_and_heads(checkpoints):
    """The reference itself distinguishes what the loader must get right (else the tests below prove nothing)."""
    cfg, state, _ = checkpoints["head80"]
    images, tokens = inputs(cfg)
    right = reference_features(cfg, state, images, tokens)[0]
    wrong_heads = reference_features({**cfg, "vision_cfg": {**cfg["vision_cfg"], "head_width": 64}}, state, images,
                                     tokens)[0]
    wrong_act = reference_features({**cfg, "quick_gelu": True}, state, images, tokens)[0]
    scale = right.abs().max().item()
    assert (right - wrong_heads).abs().max().item() > 1e-2 * scale
    assert (right - wrong_act).abs().max().item() > 1e-3 * scale


@pytest.mark.parametrize("name", ["gelu", "head80", "quickgelu"])
def test_hub_folder_with_open_clip_config(checkpoints, name):
    cfg, state, folder = checkpoints[name]
    backbone = cli_backbone(["--backbone", str(folder)])
    config = backbone.model.config
    assert config.quick_gelu is cfg.get("quick_gelu", False)
    assert config.vision_head_width == cfg["vision_cfg"].get("head_width", 64)
    assert_matches(backbone.model, cfg, state)
    # The weights file alone reads the open_clip_config.json beside it (the .bin, or the safetensors file).
    for filename in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
        assert_matches(cli_backbone(["--backbone", str(folder / filename)]).model, cfg, state)


def test_gelu_checkpoint_without_config_is_not_silent(checkpoints, capsys):
    cfg, state, _ = checkpoints["gelu"]
    path = checkpoints["root"] / "gelu-bare" / "open_clip_pytorch_model.bin"
    image = checkpoints["root"] / "img.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (120, 30, 200)).save(image)
    assert main(["predict", str(image), "--classnames", "a,b", "--backbone", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "does not say which activation" in err and "--gelu" in err and "--quick-gelu" in err
    assert "--backbone-arch" in err and str(path) in err
    # Stated: right with --gelu (the architecture being unknown, the assumed 64-wide heads are announced, loudly).
    assert main(["predict", str(image), "--classnames", "a,b", "--backbone", str(path), "--gelu", "--quiet",
                 "--format", "json"]) == 0
    assert_banner(capsys, "assuming 64", "--backbone-arch")
    assert_matches(cli_backbone(["--backbone", str(path), "--gelu"]).model, cfg, state)
    # The old silent default, QuickGELU, is what the issue found wrong.
    assert_differs(cli_backbone(["--backbone", str(path), "--quick-gelu"]).model, cfg, state)
    # An architecture file states everything: no assumption, no warning.
    capsys.readouterr()
    config_file = checkpoints["gelu"][2] / "open_clip_config.json"
    assert_matches(cli_backbone(["--backbone", str(path), "--backbone-arch", str(config_file)]).model, cfg, state)
    assert "WARNING" not in capsys.readouterr().err


def test_head_width_80_without_config(checkpoints, capsys):
    cfg, state, folder = checkpoints["head80"]
    path = checkpoints["root"] / "head80-bare" / "open_clip_pytorch_model.bin"
    # Unknown shapes, activation stated: the assumed 64-wide heads (5 instead of 4) are announced, and are wrong.
    backbone = cli_backbone(["--backbone", str(path), "--gelu"])
    assert_banner(capsys, "assuming 64", "5 image heads", "--backbone-arch")
    assert backbone.model.config.vision_heads == 5
    assert_differs(backbone.model, cfg, state)
    # Stated with --backbone-arch (open_clip's model config: bare, or open_clip_config.json).
    bare = checkpoints["root"] / "HEAD80.json"
    bare.write_text(json.dumps(cfg))
    for arch in (str(bare), str(folder / "open_clip_config.json")):
        backbone = cli_backbone(["--backbone", str(path), "--backbone-arch", arch])
        assert backbone.model.config.vision_heads == 4 and backbone.model.config.vision_mlp_width == 1396
        assert_matches(backbone.model, cfg, state)


def test_quickgelu_checkpoint_without_config(checkpoints):
    cfg, state, _ = checkpoints["quickgelu"]
    path = checkpoints["root"] / "quickgelu-bare" / "open_clip_pytorch_model.bin"
    assert_matches(cli_backbone(["--backbone", str(path), "--quick-gelu"]).model, cfg, state)
    assert_differs(cli_backbone(["--backbone", str(path), "--gelu"]).model, cfg, state)


def test_override_of_a_declared_activation_warns(checkpoints, capsys):
    cfg, state, folder = checkpoints["gelu"]
    backbone = cli_backbone(["--backbone", str(folder), "--quick-gelu"])
    assert_banner(capsys, "loading with QuickGELU although", "open_clip_config.json says GELU")
    assert backbone.model.config.quick_gelu is True
    assert_differs(backbone.model, cfg, state)


def test_activation_and_heads_are_part_of_the_fingerprint(checkpoints):
    _, _, folder = checkpoints["gelu"]
    path = folder / "open_clip_pytorch_model.bin"
    gelu = W.backbone_fingerprint(W.load_model(path))
    with pytest.warns(UserWarning, match="says GELU"):
        quick = W.backbone_fingerprint(W.load_model(path, quick_gelu=True))
    assert gelu != quick  # an adapter trained on one refuses to load onto the other
    assert W.backbone_fingerprint(W.load_model(path, quick_gelu=False)) == gelu


def test_pixel_statistics_come_from_the_config(tmp_path, checkpoints):
    """open_clip_config.json's preprocess_cfg mean/std (ViT-L-14 laion2b_s32b_b82k uses 0.5) reach the transforms."""
    from promptclip.api import zero_shot
    from promptclip.protocols import RunOptions, _dataset

    cfg, state, _ = checkpoints["gelu"]
    folder = save_open_clip_folder(tmp_path / "inception", cfg, state, mean=(0.5,) * 3, std=(0.5,) * 3)
    backbone = cli_backbone(["--backbone", str(folder)])
    assert backbone.model.config.image_mean == (0.5, 0.5, 0.5) and backbone.model.config.image_std == (0.5,) * 3
    predictor = zero_shot(["a", "b"], backbone)
    assert predictor.transform.mean == (0.5, 0.5, 0.5) and predictor.transform.std == (0.5, 0.5, 0.5)
    for train in (True, False):
        transform = _dataset([], backbone, train=train, seed=1, options=RunOptions()).transform
        assert transform.mean == (0.5, 0.5, 0.5) and transform.std == (0.5, 0.5, 0.5)
    assert backbone.fingerprint != cli_backbone(["--backbone", str(checkpoints["gelu"][2])]).fingerprint


# ------------------------------------------------------------------------------------ open_clip config files

# From open_clip's src/open_clip/model_configs/ (data, copied as published).
OPEN_CLIP_MODEL_CONFIGS = {
    "ViT-B-16": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    "ViT-L-14": {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}},
    "ViT-H-14": {"embed_dim": 1024,
                 "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
    "ViT-g-14": {"embed_dim": 1024,
                 "vision_cfg": {"image_size": 224, "layers": 40, "width": 1408, "head_width": 88, "mlp_ratio": 4.3637,
                                "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
    "ViT-bigG-14": {"embed_dim": 1280,
                    "vision_cfg": {"image_size": 224, "layers": 48, "width": 1664, "head_width": 104,
                                   "mlp_ratio": 4.9231, "patch_size": 14},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20, "layers": 32}},
    "RN50": {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64,
                                               "patch_size": None},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
}


@pytest.mark.parametrize("name", list(OPEN_CLIP_MODEL_CONFIGS))
def test_architectures_are_open_clips(name):
    config = openclip.config_from_open_clip(OPEN_CLIP_MODEL_CONFIGS[name], name)
    if name == "RN50":  # the same name as OpenAI's RN50, which keeps OpenAI's QuickGELU
        assert dataclasses.replace(config, quick_gelu=True) == ARCHITECTURES[name]
        return
    assert config == ARCHITECTURES[name]
    quick = openclip.config_from_open_clip({**OPEN_CLIP_MODEL_CONFIGS[name], "quick_gelu": True}, name)
    assert quick.quick_gelu is True and W.architecture_from(f"{name}-quickgelu")[0] == quick


def test_head_widths_of_the_big_vits():
    widths = {name: (c.vision_heads, c.vision_head_width, c.vision_mlp_width) for name, c in ARCHITECTURES.items()
              if name in ("ViT-H-14", "ViT-g-14", "ViT-bigG-14", "ViT-L-14")}
    assert widths == {"ViT-L-14": (16, 64, None), "ViT-H-14": (16, 80, None), "ViT-g-14": (16, 88, 6144),
                      "ViT-bigG-14": (16, 104, 8192)}


@pytest.mark.parametrize("section,key,value", [
    ("vision_cfg", "ls_init_value", 1e-5), ("vision_cfg", "timm_model_name", "vit_base_patch16_224"),
    ("vision_cfg", "attentional_pool", True), ("vision_cfg", "no_ln_pre", True),
    ("text_cfg", "hf_model_name", "xlm-roberta-base"), ("text_cfg", "hf_tokenizer_name", "facebook/xlm-v-base"),
    ("text_cfg", "pool_type", "last"), ("text_cfg", "no_causal_mask", True), ("top", "custom_text", True),
    ("top", "init_logit_bias", -10), ("vision_cfg", "frobnicate", 3),
])
def test_open_clip_configs_outside_openai_layout_are_refused(section, key, value):
    cfg = json.loads(json.dumps(GELU_VIT))
    (cfg if section == "top" else cfg[section])[key] = value
    with pytest.raises(WeightsError, match=key) as info:
        openclip.config_from_open_clip({"model_cfg": cfg}, "open_clip_config.json")
    assert "open_clip_config.json" in str(info.value)
    # Keys that change nothing at inference, or keep open_clip's default, are fine.
    harmless = json.loads(json.dumps(GELU_VIT))
    harmless["vision_cfg"].update(patch_dropout=0.5, ls_init_value=None, pool_type="tok")
    harmless["text_cfg"].update(pad_id=0, proj_type="linear")
    assert openclip.config_from_open_clip(harmless, "x").vision_width == 128


def test_open_clip_preprocessing_other_than_ours_warns():
    with pytest.warns(UserWarning, match="squash"):
        config = openclip.config_from_open_clip(
            {"model_cfg": GELU_VIT, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"}},
            "open_clip_config.json")
    assert config.image_mean == (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------------------------------- the registry


def test_registry_entries():
    entries = openclip.OPEN_CLIP_PRETRAINED
    for name, entry in entries.items():
        assert name == f"open_clip:{entry.model}/{entry.tag}" and entry.model in ARCHITECTURES
        assert entry.hf_hub.count("/") == 1 and not entry.hf_hub.endswith("/")
        assert entry.config.quick_gelu is entry.quick_gelu
    required = ["ViT-B-32/laion2b_s34b_b79k", "ViT-B-16/laion2b_s34b_b88k", "ViT-L-14/laion2b_s32b_b82k",
                "ViT-H-14/laion2b_s32b_b79k", "ViT-g-14/laion2b_s34b_b88k", "ViT-bigG-14/laion2b_s39b_b160k",
                "ViT-B-16/datacomp_xl_s13b_b90k", "ViT-L-14/datacomp_xl_s13b_b90k", "ViT-B-16/metaclip_fullcc",
                "ViT-H-14/metaclip_fullcc"]
    assert all(f"open_clip:{n}" in entries for n in required)
    h14 = entries["open_clip:ViT-H-14/laion2b_s32b_b79k"]
    assert (h14.hf_hub, h14.quick_gelu, h14.config.vision_heads) == ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", False, 16)
    assert entries["open_clip:ViT-B-16/metaclip_fullcc"].quick_gelu is True  # MetaCLIP: QuickGELU
    assert entries["open_clip:ViT-B-16/datacomp_xl_s13b_b90k"].quick_gelu is False
    assert entries["open_clip:ViT-L-14/laion2b_s32b_b82k"].config.image_mean == (0.5, 0.5, 0.5)
    assert entries["open_clip:ViT-bigG-14/laion2b_s39b_b160k"].hf_hub == "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"


def test_open_clip_names():
    metaclip = openclip.OPEN_CLIP_PRETRAINED["open_clip:ViT-B-32/metaclip_400m"]
    for spelling in ("open_clip:ViT-B-32/metaclip_400m", "open_clip:ViT-B-32-quickgelu/metaclip_400m",
                     "open_clip:ViT-B-32:metaclip-400m"):
        assert openclip.lookup(spelling) is metaclip
    with pytest.raises(WeightsError, match="trained with GELU, not QuickGELU"):
        openclip.lookup("open_clip:ViT-B-16-quickgelu/laion2b_s34b_b88k")
    with pytest.raises(WeightsError, match="Did you mean open_clip:ViT-B-16/laion2b_s34b_b88k"):
        openclip.lookup("open_clip:ViT-B-16/laion2b_s34b_b8k")
    with pytest.raises(WeightsError, match="open_clip:<model>/<pretrained tag>"):
        openclip.lookup("open_clip:ViT-B-16")
    with pytest.raises(WeightsError, match="As an open_clip name, ViT-H-14 has the weights open_clip:ViT-H-14/"):
        W.load_model("ViT-H-14")


def test_list_backbones_shows_the_open_clip_weights(capsys):
    assert main(["list", "backbones"]) == 0
    out = capsys.readouterr().out
    assert "open_clip:ViT-H-14/laion2b_s32b_b79k" in out and "image heads 16 x 80" in out
    assert "hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K" in out and "ViT-B/16" in out


def test_without_huggingface_hub_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(WeightsError, match=r'pip install "promptclip\[hf\]"') as info:
        W.load_model("open_clip:ViT-B-16/laion2b_s34b_b88k")
    assert "--backbone /path/to/folder" in str(info.value)


# -------------------------------------------------------------------------------------------- Hub downloads

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """The part of the Hub API ``hf_hub_download`` uses: HEAD/GET ``/<org>/<repo>/resolve/<revision>/<file>``,
    answering with the commit and the file's sha256 as ETag (as the Hub does for LFS files), or a Hub 404."""

    def __init__(self, repos: dict[str, dict[str, bytes]], lie_about: tuple[tuple[str, str], ...] = ()):
        self.repos, self.requests = repos, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, with_body: bool):
                hub.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                repo = "/".join(parts[:2])
                if len(parts) < 5 or parts[2] != "resolve" or repo not in hub.repos:
                    return self._missing("RepoNotFound")
                filename = "/".join(parts[4:])
                data = hub.repos[repo].get(filename)
                if data is None:
                    return self._missing("EntryNotFound")
                sha = hashlib.sha256(b"other bytes" if (repo, filename) in lie_about else data).hexdigest()
                self.send_response(200)
                for header, value in (("X-Repo-Commit", COMMIT), ("ETag", f'"{sha}"'),
                                      ("Content-Length", str(len(data)))):
                    self.send_header(header, value)
                self.end_headers()
                if with_body:
                    self.wfile.write(data)

            def _missing(self, code: str):
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()

            def do_HEAD(self):
                self._reply(False)

            def do_GET(self):
                self._reply(True)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


# Runs in a fresh interpreter (huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE at import): loads
# each backbone of argv through the CLI's loading helper and writes its features, or the error, to a JSON file.
LOADER = textwrap.dedent("""
    import json, sys, torch
    from promptclip.cli import _load_backbone, build_parser, main
    from promptclip.clip import openclip
    from promptclip.clip.architectures import ARCHITECTURES
    from promptclip.errors import PromptClipError

    out, arch_file, images, tokens, *names = sys.argv[1:]
    # A registry entry for the test's tiny model, on a repository that has only the .bin (like many open_clip repos).
    ARCHITECTURES["Tiny-ViT"] = openclip.read_config_file(arch_file)
    entry = openclip.OpenClipWeights("Tiny-ViT", "test", "test-org/tiny-bin-only")
    openclip.OPEN_CLIP_PRETRAINED[entry.name] = entry
    images, tokens = torch.load(images), torch.load(tokens)
    results = {}
    for name in names:
        args = build_parser().parse_args(["predict", "x.png", "--quiet", "--backbone", name])
        try:
            model = _load_backbone(name, args).model
        except PromptClipError as e:
            results[name] = {"error": str(e)}
            continue
        with torch.no_grad():
            results[name] = {"image": model.encode_image(images).tolist(), "text": model.encode_text(tokens).tolist(),
                             "quick_gelu": model.config.quick_gelu}
    main(["list", "backbones"])
    json.dump(results, open(out, "w"))
""")


def run_loader(tmp_path: Path, env: dict, cfg: dict, names: list[str]) -> tuple[dict, str]:
    images, tokens = inputs(cfg)
    torch.save(images, tmp_path / "images.pt")
    torch.save(tokens, tmp_path / "tokens.pt")
    (tmp_path / "arch.json").write_text(json.dumps(cfg))
    out = tmp_path / "results.json"
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1",
           **env}
    done = subprocess.run([sys.executable, "-c", LOADER, str(out), str(tmp_path / "arch.json"),
                           str(tmp_path / "images.pt"), str(tmp_path / "tokens.pt"), *names],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def assert_loaded_right(result: dict, cfg: dict, state: dict):
    assert "error" not in result, result.get("error")
    images, tokens = inputs(cfg)
    ref = reference_features(cfg, state, images, tokens)
    for key, expected in zip(("image", "text"), ref, strict=True):
        error = (torch.tensor(result[key], dtype=torch.float64) - expected).abs().max().item()
        assert error <= 1e-5 * expected.abs().max().item(), (key, error)


def test_download_from_a_hub_endpoint(tmp_path):
    cfg = GELU_VIT
    state = open_clip_state_dict(cfg, seed=11)
    files = save_open_clip_folder(tmp_path / "files", cfg, state, formats=("bin", "safetensors"))
    read = {n: (files / n).read_bytes() for n in ("open_clip_config.json", "open_clip_pytorch_model.bin",
                                                  "open_clip_model.safetensors")}
    hub = FakeHub({
        "test-org/tiny-gelu": dict(read),
        "test-org/tiny-bin-only": {"open_clip_pytorch_model.bin": read["open_clip_pytorch_model.bin"]},
        "test-org/not-open-clip": {"config.json": b"{}"},
        "test-org/corrupt": dict(read),  # the Hub lists another sha256 for its safetensors file than it serves
    }, lie_about=(("test-org/corrupt", "open_clip_model.safetensors"),))
    try:
        names = ["hf-hub:test-org/tiny-gelu", "open_clip:Tiny-ViT/test", "hf-hub:test-org/not-open-clip",
                 "hf-hub:test-org/absent", "hf-hub:test-org/corrupt"]
        results, _ = run_loader(tmp_path, {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache")}, cfg,
                                names)
    finally:
        hub.close()
    # Any open_clip repository by hf-hub: name, its open_clip_config.json read first; safetensors preferred.
    assert_loaded_right(results["hf-hub:test-org/tiny-gelu"], cfg, state)
    assert results["hf-hub:test-org/tiny-gelu"]["quick_gelu"] is False
    gets = [path for method, path in hub.requests if method == "GET"]
    assert "/test-org/tiny-gelu/resolve/main/open_clip_model.safetensors" in gets
    assert "/test-org/tiny-gelu/resolve/main/open_clip_pytorch_model.bin" not in gets
    # A registry name: the entry's architecture, the .bin when the repository has no safetensors file.
    assert_loaded_right(results["open_clip:Tiny-ViT/test"], cfg, state)
    assert "/test-org/tiny-bin-only/resolve/main/open_clip_pytorch_model.bin" in gets
    assert "has none of open_clip_config.json" in results["hf-hub:test-org/not-open-clip"]["error"]
    assert "no repository test-org/absent" in results["hf-hub:test-org/absent"]["error"]
    # A file whose content is not the one the Hub lists is refused.
    assert "corrupt" in results["hf-hub:test-org/corrupt"]["error"]
    assert "sha256" in results["hf-hub:test-org/corrupt"]["error"]


def _populate_hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """The Hub cache layout huggingface_hub reads (models--org--repo/{blobs,snapshots,refs})."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_offline_with_a_populated_cache_and_without(tmp_path):
    cfg = GELU_VIT
    state = open_clip_state_dict(cfg, seed=12)
    files = save_open_clip_folder(tmp_path / "files", cfg, state)
    cache = tmp_path / "hub-cache"
    _populate_hub_cache(cache, "test-org/tiny-bin-only",
                        {"open_clip_pytorch_model.bin": (files / "open_clip_pytorch_model.bin").read_bytes()})
    names = ["open_clip:Tiny-ViT/test", "open_clip:ViT-B-16/laion2b_s34b_b88k"]
    results, listing = run_loader(tmp_path, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
                                             "HF_ENDPOINT": "http://127.0.0.1:9"}, cfg, names)
    assert_loaded_right(results["open_clip:Tiny-ViT/test"], cfg, state)
    error = results["open_clip:ViT-B-16/laion2b_s34b_b88k"]["error"]
    assert "looks offline" in error and "laion/CLIP-ViT-B-16-laion2B-s34B-b88K" in error
    assert "--backbone /path/to/folder" in error and "open_clip_pytorch_model.bin --gelu" in error
    line = next(line for line in listing.splitlines() if line.strip().startswith("open_clip:Tiny-ViT/test "))
    assert "cached" in line and "downloads on first use" not in line
