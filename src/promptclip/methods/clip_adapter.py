"""CLIP-Adapter (Gao et al., IJCV 2024 / arXiv 2021): a residual bottleneck MLP on the frozen image feature.

Behaviour follows the reference trainer ``CLIP_Adapter`` (gaopengcuhk/CLIP-Adapter, a Dassl trainer run inside
CoOp's tree, as its README says; tests/golden/methods/clip_adapter.md):

- the adapter is ``Linear(D -> D/reduction, no bias) -> ReLU -> Linear(D/reduction -> D, no bias) -> ReLU`` (both
  linears are followed by a ReLU, so its output is non-negative);
- the image feature ``f`` (the frozen tower's, not normalised) is mixed as ``ratio * adapter(f) + (1 - ratio) * f``
  (the reference hard-codes ratio 0.2 and reduction 4; the paper's per-dataset ratios are not in its code);
- the class features are the frozen text tower's on one prompt per class, the dataset's hand-crafted template with
  ``_`` in class names replaced by spaces; logits are ``exp(logit_scale) * cos``; the loss is cross-entropy;
- only the adapter is trained (Dassl SGD, CoOp's schedule: the repository ships no config of its own).

The reference hard-codes the width 1024 (RN50's embedding); here it is the backbone's embedding width, which is the
same for RN50 and lets the method run on any backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import PromptMethod, cosine_logits, reference_options, register
from .prompts import encode_texts

#: CoOp's trainer options, present in every config of the CoOp tree the reference runs in (its ``extend_cfg``); the
#: CLIP-Adapter trainer reads none of them.
_COOP_OPTIONS = {"N_CTX", "CSC", "CTX_INIT", "CLASS_TOKEN_POSITION"}


@dataclass
class ClipAdapterConfig:
    #: The adapter's hidden width is the feature width divided by this (reference: 4, hard-coded).
    reduction: int = 4
    #: Weight of the adapter output in the mix with the frozen feature (the paper's residual ratio; reference: 0.2,
    #: hard-coded).
    ratio: float = 0.2
    #: Seed of the adapter's initial weights (torch's default ``nn.Linear`` init, drawn from this seed).
    init_seed: int = 0

    def __post_init__(self):
        if self.reduction < 1:
            raise ConfigError(f"clip_adapter: reduction must be >= 1, got {self.reduction}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"clip_adapter: ratio must be in [0, 1], got {self.ratio}")


class Adapter(nn.Module):
    """``fc = Linear -> ReLU -> Linear -> ReLU``, both linears without bias (the reference's module layout, so that
    parameter names read ``adapter.fc.0.weight`` / ``adapter.fc.2.weight`` as in its checkpoints)."""

    def __init__(self, width: int, reduction: int, seed: int):
        super().__init__()
        hidden = max(1, width // reduction)
        self.fc = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.ReLU(),
                                nn.Linear(hidden, width, bias=False), nn.ReLU())
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # nn.Linear's default (kaiming-uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            for layer in (self.fc[0], self.fc[2]):
                bound = layer.in_features ** -0.5
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) * 2 * bound - bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@register
class ClipAdapter(PromptMethod):
    """CLIP-Adapter: a residual MLP adapter on the frozen image features."""

    name = "clip_adapter"
    config_class = ClipAdapterConfig
    image_independent_text = True
    frozen_image_features = True
    reference_trainers = ("CLIP_Adapter",)

    def __init__(self, backbone, config: ClipAdapterConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        self.adapter = Adapter(backbone.config.embed_dim, config.reduction, config.init_seed)
        self.register_buffer("text_features", torch.empty(0), persistent=False)
        self.set_classnames(classnames, template)

    def rebuild_class_buffers(self) -> None:
        template = self.template or "a photo of a {}."
        prompts = [template.format(name.replace("_", " ")) for name in self.classnames]
        self.text_features = encode_texts(self.clip, prompts)

    def encode_classes(self) -> torch.Tensor:
        return self.text_features

    def adapted_features(self, features: torch.Tensor) -> torch.Tensor:
        """``ratio * adapter(f) + (1 - ratio) * f`` of frozen image features ``f`` ``[B, D]``."""
        adapted = self.adapter(features.to(self.adapter.fc[0].weight.dtype))
        return self.config.ratio * adapted + (1 - self.config.ratio) * features

    def forward(self, batch) -> torch.Tensor:
        return cosine_logits(self.clip, self.adapted_features(self.image_features_of(batch)), self.class_features())

    @classmethod
    def config_from_reference(cls, trainer) -> ClipAdapterConfig:
        # The reference has no options of its own (ratio and reduction are constants in its code); CoOp's options
        # are in its config because it runs in CoOp's tree, and it ignores them.
        reference_options(trainer, _COOP_OPTIONS, cls.name)
        return ClipAdapterConfig()

    def reference_name_map(self) -> dict[str, str]:
        return {f"adapter.{name}": f"adapter.{name}" for name, _ in self.adapter.named_parameters()}
