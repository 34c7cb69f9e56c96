"""Check promptclip's loading of open_clip checkpoints against open_clip's own model code (an oracle, not CI).

open_clip needs a torch that the CPU constraints of the default install exclude, so this runs in two virtualenvs:

    # 1. in a venv with open_clip (pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch):
    python tools/open_clip_oracle.py make /tmp/oracle
    # 2. in promptclip's venv:
    python tools/open_clip_oracle.py check /tmp/oracle

``make`` builds open_clip models from its own model configs (random weights, every parameter perturbed), saves each
the way open_clip's ``push_to_hf_hub.save_for_hf`` does (``open_clip_model.safetensors``,
``open_clip_pytorch_model.bin``, ``open_clip_config.json`` with ``model_cfg`` and ``preprocess_cfg``) and records
open_clip's image and text features on fixed inputs. ``check`` loads every folder with promptclip (the folder; the
bare ``.bin`` with the right hint; and the old way, the bare ``.bin`` with the wrong activation) and prints the
largest feature difference relative to the largest feature value.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

# open_clip model name, or (a name for the record, a model config in open_clip's format): ViT-H-14's head width and
# ViT-g-14's MLP ratio at a size that builds in seconds.
MODELS = [
    "ViT-B-16", "ViT-B-16-quickgelu", "ViT-B-32", "RN50-quickgelu",
    ("tiny-H-14-like", {"embed_dim": 64,
                        "vision_cfg": {"image_size": 56, "layers": 3, "width": 320, "head_width": 80,
                                       "patch_size": 14},
                        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2,
                                     "layers": 3}}),
    ("tiny-g-14-like", {"embed_dim": 64,
                        "vision_cfg": {"image_size": 56, "layers": 3, "width": 352, "head_width": 88,
                                       "mlp_ratio": 4.3637, "patch_size": 14},
                        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2,
                                     "layers": 3}}),
]
EOT, SOT = 49407, 49406


def inputs(image_size: int):
    images = torch.randn(4, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    tokens = torch.zeros(4, 77, dtype=torch.long)
    for row, eot in enumerate((3, 9, 30, 76)):
        tokens[row, 0], tokens[row, eot] = SOT, EOT
        tokens[row, 1:eot] = torch.randint(1, SOT - 1, (eot - 1,), generator=g)
    return images, tokens


def make(out: Path) -> None:
    import open_clip
    import safetensors.torch
    from open_clip.factory import get_model_config
    from open_clip.push_to_hf_hub import save_config_for_hf

    configs = out / "model_configs"
    configs.mkdir(parents=True, exist_ok=True)
    for item in MODELS:
        if not isinstance(item, str):
            (configs / f"{item[0]}.json").write_text(json.dumps(item[1]))
    open_clip.add_model_config(configs)
    for item in MODELS:
        name = item if isinstance(item, str) else item[0]
        cfg = get_model_config(name)
        model = open_clip.create_model(name).eval()
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():  # open_clip initialises biases and LayerNorms to constants: perturb everything
            for key, p in model.named_parameters():
                if key != "logit_scale":
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        tensors = model.state_dict()
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()},
                                    str(folder / "open_clip_model.safetensors"))
        torch.save(tensors, folder / "open_clip_pytorch_model.bin")
        save_config_for_hf(model, folder / "open_clip_config.json", model_config=cfg)
        size = cfg["vision_cfg"]["image_size"]
        images, tokens = inputs(size)
        with torch.no_grad():
            torch.save({"image": model.encode_image(images), "text": model.encode_text(tokens),
                        "quick_gelu": bool(cfg.get("quick_gelu", False)), "image_size": size},
                       folder / "open_clip_features.pt")
        print(f"{name}: saved to {folder}")
    (out / "versions.json").write_text(json.dumps({"open_clip": open_clip.__version__, "torch": torch.__version__}))


def check(out: Path) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from promptclip.clip.weights import load_model
    from promptclip.errors import WeightsError

    versions = json.loads((out / "versions.json").read_text())
    print(f"open_clip {versions['open_clip']} (torch {versions['torch']}) vs promptclip (torch {torch.__version__})")
    print(f"{'model':22s} {'loaded as':38s} {'image rel. err':>14s} {'text rel. err':>14s}")
    worst = 0.0
    for item in MODELS:
        name = item if isinstance(item, str) else item[0]
        folder = out / name
        expected = torch.load(folder / "open_clip_features.pt")
        images, tokens = inputs(expected["image_size"])
        qg = expected["quick_gelu"]
        bare = folder / "open_clip_pytorch_model.bin"
        hidden = out / "bare" / name / "weights.bin"  # the same file without its open_clip_config.json beside it
        hidden.parent.mkdir(parents=True, exist_ok=True)
        hidden.write_bytes(bare.read_bytes())
        known_shapes = not name.startswith("tiny")  # else 64-wide heads are assumed: wrong for the H/g-like ones
        cases = [("folder", dict(name_or_path=folder), True),
                 ("bare .bin, arch=open_clip_config.json",
                  dict(name_or_path=hidden, arch=folder / "open_clip_config.json"), True),
                 (f"bare .bin, quick_gelu={qg}", dict(name_or_path=hidden, quick_gelu=qg), known_shapes),
                 (f"bare .bin, quick_gelu={not qg} (wrong)", dict(name_or_path=hidden, quick_gelu=not qg), False)]
        for label, kwargs, counts in cases:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = load_model(**kwargs)
            except WeightsError as e:
                print(f"{name:22s} {label:38s} refused: {str(e).split(': ', 1)[1][:60]}...")
                if counts:
                    worst = float("inf")
                continue
            with torch.no_grad():
                image, text = model.encode_image(images), model.encode_text(tokens)
            errors = [((a - b).abs().max() / b.abs().max()).item()
                      for a, b in ((image, expected["image"]), (text, expected["text"]))]
            if counts:
                worst = max(worst, *errors)
            print(f"{name:22s} {label:38s} {errors[0]:14.2e} {errors[1]:14.2e}")
    print(f"largest relative error where promptclip is told (or finds) the architecture: {worst:.2e}")
    return 0 if worst < 1e-4 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["make", "check"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.action == "make":
        make(args.folder)
        return 0
    return check(args.folder)


if __name__ == "__main__":
    sys.exit(main())
