"""Reading the reference-parity goldens (tests/golden/README.md): metadata, tensors, initial values, tolerances."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from promptclip.clip.architectures import ARCHITECTURES, build_random
from promptclip.clip.model import CLIP
from promptclip.methods import create_method, get_method_class, list_methods

GOLDEN_DIR = Path(__file__).parent / "golden"


def method_golden_names() -> list[str]:
    """Every one-step golden: ``<method>.json`` with a ``provenance`` and a ``trainable_params`` list.

    ``<method>.<kind>.json`` files (layers, trajectory, dassl) are companions of it, not one-step goldens."""
    names = []
    for path in sorted(GOLDEN_DIR.glob("*.json")):
        if "." in path.stem:
            continue
        meta = json.loads(path.read_text())
        if isinstance(meta, dict) and "provenance" in meta and "trainable_params" in meta:
            names.append(path.stem)
    return names


@dataclass
class Golden:
    name: str
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def trainer_class(self) -> str:
        return self.meta["provenance"]["trainer_class"]

    @property
    def trainer_cfg(self) -> dict:
        return self.meta["cfg"]["trainer"]

    @property
    def classnames(self) -> list[str]:
        return self.meta["inputs"]["classnames"]

    def images(self) -> torch.Tensor:
        if "input.images" in self.tensors:
            return self.tensors["input.images"]
        seed = self.meta["inputs"]["image_seed"]
        size = self.meta["backbone"]["config"]["image_size"]
        return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def labels(self) -> torch.Tensor:
        if "input.labels" in self.tensors:
            return self.tensors["input.labels"]
        return torch.tensor(self.meta["inputs"]["labels"])

    def init_value(self, entry: dict) -> torch.Tensor:
        """The initial value of a reference parameter: stored, or regenerated with the README's recipe."""
        key = f"init.{entry['name']}"
        if key in self.tensors:
            return self.tensors[key]
        match = re.search(r"seed=(\d+)", entry["init"])
        if match is None:
            raise AssertionError(f"{self.name}: {entry['name']} is neither stored nor made by the recipe")
        value = recipe_value(entry["name"], tuple(entry["shape"]), int(match.group(1)))
        assert value.double().sum().item() == _approx(entry["sum"]), f"{entry['name']}: regenerated sum differs"
        assert value.double().abs().sum().item() == _approx(entry["abs_sum"]), f"{entry['name']}: abs_sum differs"
        return value


def _approx(value: float):
    import pytest

    return pytest.approx(value, rel=1e-6, abs=1e-6)


def recipe_value(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The golden README's init rule for overwritten trainable parameters."""
    r = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    if name.endswith("bias"):
        return 0.02 * r
    if name.endswith("weight") and len(shape) == 1:
        return 1 + 0.1 * r
    if name.endswith("weight") and len(shape) == 2:
        return r * shape[1] ** -0.5
    return 0.02 * r


@functools.cache
def load_golden(name: str) -> Golden:
    meta = json.loads((GOLDEN_DIR / f"{name}.json").read_text())
    return Golden(name, meta, load_file(GOLDEN_DIR / f"{name}.safetensors"))


@functools.lru_cache(maxsize=1)
def golden_mini_state() -> dict[str, torch.Tensor]:
    return build_random("golden-mini").state_dict()


def golden_backbone(golden: Golden):
    config = golden.meta["backbone"]["config"]
    assert golden.meta["backbone"]["name"] == "golden-mini", "only golden-mini goldens are known"
    model = CLIP(ARCHITECTURES["golden-mini"])
    model.load_state_dict(golden_mini_state(), strict=True)
    model.requires_grad_(False)
    assert model.config.image_size == config["image_size"] and model.config.vision_layers == config["vision_layers"]
    return model


def method_for(golden: Golden) -> str:
    for name in list_methods():
        if golden.trainer_class in get_method_class(name).reference_trainers:
            return name
    raise LookupError(f"no method reproduces the reference trainer {golden.trainer_class!r}")


def build_method(golden: Golden):
    """Our method for a golden: config from the reference's trainer options, the reference's initial values."""
    name = method_for(golden)
    cls = get_method_class(name)
    config = cls.config_from_reference(golden.trainer_cfg)
    template = golden.meta.get("extra", {}).get("template_used")
    method = create_method(name, golden_backbone(golden), golden.classnames, config, template=template)
    name_map = method.reference_name_map()
    ours = dict(method.named_trainable())
    with torch.no_grad():
        for entry in golden.meta["trainable_params"]:
            target = ours[name_map[entry["name"]]]
            value = golden.init_value(entry)
            assert tuple(target.shape) == tuple(value.shape), entry["name"]
            target.copy_(value)
    return method, name_map


def assert_close_values(ours: torch.Tensor, golden: torch.Tensor, what: str) -> None:
    """Logits, features, losses: max|ours - golden| <= 1e-4 * max(1, max|golden|)."""
    ours, golden = ours.detach().float(), golden.float()
    assert ours.shape == golden.shape, f"{what}: shape {tuple(ours.shape)} vs golden {tuple(golden.shape)}"
    bound = 1e-4 * max(1.0, golden.abs().max().item())
    err = (ours - golden).abs().max().item()
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def assert_close_grad(ours: torch.Tensor | None, golden: torch.Tensor, what: str) -> None:
    """Gradients: per tensor, max|ours - golden| <= 1e-4 * max|golden|."""
    assert ours is not None, f"{what}: no gradient, the reference has one"
    ours = ours.detach().float()[: golden.shape[0]] if ours.shape != golden.shape else ours.detach().float()
    assert ours.shape == golden.shape, f"{what}: shape {tuple(ours.shape)} vs golden {tuple(golden.shape)}"
    bound = 1e-4 * golden.abs().max().item()
    err = (ours - golden).abs().max().item()
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"
