"""CLIP-Adapter (Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature Adapters", 2021) as a
promptclip plugin in one file: a small two-layer MLP on the frozen image features, mixed back into them with a
residual ratio; the class features are the frozen CLIP text features of the dataset's template.

A tutorial builds it step by step: docs/new-method.md. Use it with ``--plugin examples/clip_adapter.py``; it
registers as ``my_clip_adapter`` (the parity-checked built-in is ``clip_adapter``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from promptclip.methods import PromptMethod, register
from promptclip.methods.base import cosine_logits
from promptclip.methods.prompts import encode_texts


@dataclass
class ClipAdapterConfig:
    #: The adapter's hidden width is the feature width divided by this.
    reduction: int = 4
    #: Weight of the adapted features in the mix with the original ones (the paper's residual ratio alpha).
    ratio: float = 0.2
    #: Seed of the adapter's initial weights (explicit: the same config always gives the same method).
    init_seed: int = 0

    def __post_init__(self):
        if self.reduction < 1 or not 0.0 <= self.ratio <= 1.0:
            raise ValueError("clip_adapter: reduction must be >= 1 and ratio in [0, 1]")


@register
class ClipAdapter(PromptMethod):
    """CLIP-Adapter: a residual MLP adapter on the image features (examples/clip_adapter.py)."""

    name = "my_clip_adapter"
    config_class = ClipAdapterConfig
    # The class features do not depend on the image: evaluation computes them once per class set.
    image_independent_text = True
    # The image path starts from the frozen tower's features: evaluation may read them from the feature cache.
    frozen_image_features = True
    # The default recipe for every protocol: promptclip's SGD engine with a cosine schedule, our choice for this
    # example (the paper trains its adapter with its own optimiser and schedule).
    presets = {
        "default": {
            "backbone": "ViT-B/16",
            "train": {"batch_size": 32, "lr": 0.002, "max_epoch": 10, "warmup_epoch": 1, "warmup_lr": 1e-5},
            "source": "examples/clip_adapter.py (tutorial recipe, not the paper's)",
        },
    }

    def __init__(self, backbone, config: ClipAdapterConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        width = backbone.config.embed_dim
        hidden = max(1, width // config.reduction)
        g = torch.Generator().manual_seed(config.init_seed)
        # The learned tensors: whatever requires grad is trained and saved in the adapter, nothing else.
        self.down = nn.Parameter(torch.randn(hidden, width, generator=g) * width**-0.5)
        self.up = nn.Parameter(torch.randn(width, hidden, generator=g) * hidden**-0.5)
        self.register_buffer("text_features", torch.empty(0), persistent=False)
        self.set_classnames(classnames, template)

    def rebuild_class_buffers(self) -> None:
        # Called by set_classnames (base -> novel classes, another dataset): frozen features of the new class names.
        template = self.template or "a photo of a {}."
        self.text_features = encode_texts(self.clip, [template.format(name) for name in self.classnames])

    def encode_classes(self) -> torch.Tensor:
        return self.text_features

    def forward(self, batch) -> torch.Tensor:
        features = self.image_features_of(batch)
        adapted = torch.relu(torch.relu(features @ self.down.t()) @ self.up.t())
        mixed = self.config.ratio * adapted + (1 - self.config.ratio) * features
        return cosine_logits(self.clip, mixed, self.class_features())
