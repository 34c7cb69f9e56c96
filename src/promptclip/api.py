"""The Python API, mirroring the CLI.

    import promptclip
    backbone = promptclip.load_backbone("ViT-B/16")                # or a weights path, or "tiny"
    method = promptclip.create_method("maple", backbone.model, classnames, template="a photo of a {}.")
    promptclip.fit(method, train_dataset, promptclip.load_preset("maple/vit_b16_c2_ep5_batch4_2ctx").train)
    grid = promptclip.run_protocol("base2novel", ["eurosat-sample"], ["maple"], backbone, "out/")
    predictor = promptclip.load_adapter("out/runs/.../seed1_shots16", backbone)
    predictor.predict(["img.jpg"], top_k=3)                          # [[("forest", 0.91), ...]]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .precision import autocast
from .protocols import Backbone


@dataclass(frozen=True)
class BackboneSpec:
    """Which backbone to load: ``source`` (a registry or open_clip name, a path, ``tiny``) plus what a plain weights
    file cannot say about itself: ``arch`` (an architecture name or open_clip config file) and ``quick_gelu``."""

    source: str
    arch: str | None = None
    quick_gelu: bool | None = None


def load_backbone(name_or_path: str | os.PathLike | BackboneSpec = "ViT-B/16", device: str = "cpu",
                  progress: bool = True, quick_gelu: bool | None = None, arch: str | os.PathLike | None = None
                  ) -> Backbone:
    """A frozen CLIP by registry name (downloaded and verified: OpenAI's ``ViT-B/16``, open_clip's
    ``open_clip:ViT-B-16/laion2b_s34b_b88k``), ``tiny`` (random weights) or local path.

    A plain state dict does not say its activation: give ``quick_gelu`` (or ``arch``, an architecture name such as
    ``ViT-H-14`` or an open_clip config file), or it is an error that says so. A :class:`BackboneSpec` carries the
    three together.
    """
    from .clip.architectures import RANDOM_ONLY
    from .clip.weights import backbone_fingerprint
    from .clip.weights import load_backbone as load_weights
    from .device import check_device

    check_device(device)
    if isinstance(name_or_path, BackboneSpec):
        name_or_path, arch, quick_gelu = name_or_path.source, name_or_path.arch, name_or_path.quick_gelu
    model, _ = load_weights(name_or_path, device=device, progress=progress, quick_gelu=quick_gelu, arch=arch)
    name = os.fspath(name_or_path)
    label = Path(name).name if Path(name).exists() else name
    return Backbone(model, label, backbone_fingerprint(model), random_weights=name in RANDOM_ONLY)


class Predictor:
    """A trained (or zero-shot) method with its eval transform: images in, top-k labels out."""

    def __init__(self, method, backbone: Backbone, device: str = "cpu", precision: str = "auto"):
        from .clip.transforms import EvalTransform

        self.method = method.to(device).eval()
        self.backbone = backbone
        self.device = device
        self.precision = precision
        config = backbone.model.config
        self.transform = EvalTransform(backbone.model.visual.input_resolution, config.image_mean, config.image_std)

    @property
    def classnames(self) -> list[str]:
        return list(self.method.classnames)

    def set_classnames(self, classnames: list[str], template: str | None = None) -> Predictor:
        self.method.set_classnames(classnames, template)
        return self

    def _images(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        from .data.loader import open_image

        if isinstance(images, torch.Tensor):
            return images
        tensors = []
        for image in images:
            if isinstance(image, (str, os.PathLike)):
                image = open_image(os.fspath(image))
            if not isinstance(image, Image.Image):
                raise TypeError(f"predict takes image paths, PIL images or a tensor batch, got {type(image).__name__}")
            tensors.append(self.transform(image))
        return torch.stack(tensors)

    @torch.no_grad()
    def probabilities(self, images: Sequence[Any] | torch.Tensor, batch: dict[str, Any] | None = None
                      ) -> torch.Tensor:
        """Class probabilities ``[N, C]``; ``batch`` adds per-image extras (e.g. ``caption``)."""
        pixels = self._images(images).to(self.device)
        with autocast(self.precision, self.device):
            logits = self.method({"image": pixels, **(batch or {})})
        return logits.float().softmax(dim=-1).cpu()

    def predict(self, images: Sequence[Any] | torch.Tensor, top_k: int = 5,
                batch: dict[str, Any] | None = None) -> list[list[tuple[str, float]]]:
        probs = self.probabilities(images, batch)
        top = probs.topk(min(top_k, probs.shape[1]), dim=-1)
        return [[(self.method.classnames[i], float(v)) for v, i in zip(values, indices, strict=True)]
                for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def load_adapter(path: str | os.PathLike, backbone: Backbone | str | None = None, classnames: list[str] | None = None,
                 template: str | None = None, device: str = "cpu", precision: str = "auto") -> Predictor:
    """A trained adapter (file or run directory) on its backbone; ``backbone`` defaults to the one it names."""
    from .checkpoint import read_adapter
    from .protocols import load_trained

    adapter = Path(path)
    if adapter.is_dir():
        adapter = adapter / "adapter.safetensors"
    if backbone is None or isinstance(backbone, str):
        backbone = load_backbone(backbone or read_adapter(adapter)[0]["backbone"]["name"], device=device)
    return Predictor(load_trained(adapter, backbone, classnames, template), backbone, device, precision)


def zero_shot(classnames: list[str], backbone: Backbone, template: str = "a photo of a {}.", device: str = "cpu",
              precision: str = "auto") -> Predictor:
    from .methods import create_method

    return Predictor(create_method("zeroshot", backbone.model, classnames, template=template), backbone, device,
                     precision)
