"""Zero-shot CLIP: hand-written templates, nothing learned (CoOp's ``ZeroshotCLIP`` and ``ZeroshotCLIP2``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..data.templates import check_template
from .base import PromptMethod, cosine_logits, register
from .prompts import check_prompts_fit, template_features

#: CoOp's ``IMAGENET_TEMPLATES_SELECT``: the 7-template ensemble of ``ZeroshotCLIP2``.
IMAGENET_TEMPLATES_SELECT = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


@dataclass
class ZeroShotConfig:
    #: ``dataset``: the dataset's own template (CoOp's CUSTOM_TEMPLATES); ``imagenet_select``: the 7-template
    #: ensemble; ``imagenet_80``: CLIP's full ImageNet list; ``custom``: ``templates`` below.
    templates: Literal["dataset", "imagenet_select", "imagenet_80", "custom"] = "dataset"
    custom_templates: list[str] | None = None


@register
class ZeroShotCLIP(PromptMethod):
    name = "zeroshot"
    config_class = ZeroShotConfig
    image_independent_text = True
    frozen_image_features = True

    def __init__(self, backbone, config: ZeroShotConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        if config.templates == "custom" and not config.custom_templates:
            from ..errors import ConfigError

            raise ConfigError("zeroshot: templates='custom' needs custom_templates, e.g. ['a photo of a {}.']")
        for template_text in config.custom_templates or []:
            check_template(template_text, "zeroshot: custom template")
        self.set_classnames(classnames, template)

    def rebuild_class_buffers(self) -> None:
        check_prompts_fit(self.clip, self.templates(), self.classnames)  # encoded lazily, by class_features

    def templates(self) -> list[str]:
        choice = self.config.templates
        if choice == "dataset":
            return [self.template or "a photo of a {}."]
        if choice == "imagenet_select":
            return list(IMAGENET_TEMPLATES_SELECT)
        if choice == "imagenet_80":
            from ..data.templates import IMAGENET_TEMPLATES

            return list(IMAGENET_TEMPLATES)
        return list(self.config.custom_templates)

    def encode_classes(self) -> torch.Tensor:
        templates = self.templates()
        if len(templates) == 1:
            return template_features(self.clip, templates, self.classnames, normalize_each=False)
        return template_features(self.clip, templates, self.classnames, normalize_each=True)

    def forward(self, batch) -> torch.Tensor:
        return cosine_logits(self.clip, self.image_features_of(batch), self.class_features())
