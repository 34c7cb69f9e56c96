"""VPT-deep, the vision-only baseline of MaPLe's repository (muzairkhattak/multimodal-prompt-learning
``trainers/vpt.py`` with ``clip/model.py``'s ``ResidualAttentionBlock_IVLP``).

Learned: ``n_ctx_vision`` vision prompt tokens per layer for blocks ``0 .. depth_vision - 1`` (appended at the end
of the image sequence, replaced before blocks 1 .. depth-1, carried forward after; see ``deep.py``), N(0, 0.02).
Text: fixed hand-written prompts ``"a photo of a {class}."`` encoded once by the frozen text tower (a buffer rebuilt
on ``set_classnames``). The reference hard-codes the prefix "a photo of a" and ignores ``CTX_INIT``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import reference_options, register
from .deep import DeepPromptMethod, check_depth, check_n_ctx, layer_name_map, normal_prompts
from .prompts import encode_texts, prompt_texts

#: The prompt prefix ``trainers/vpt.py`` uses whatever ``CTX_INIT`` says.
REFERENCE_TEXT_PREFIX = "a photo of a"


@dataclass
class VPTConfig:
    n_ctx_vision: int = 8
    #: Vision prompts for blocks 0 .. depth_vision-1 (at most the number of vision layers).
    depth_vision: int = 12
    #: Prefix of the fixed text prompts "{ctx_init} {class}.".
    ctx_init: str = REFERENCE_TEXT_PREFIX
    init_std: float = 0.02
    #: Seed of the random prompt init (explicit; independent of any global RNG).
    init_seed: int = 0


@register
class VPT(DeepPromptMethod):
    name = "vpt"
    config_class = VPTConfig
    reference_trainers = ("VPT",)
    has_text_prompts = False

    def __init__(self, backbone, config: VPTConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        visual = backbone.visual
        check_n_ctx(config.n_ctx_vision, "vpt: n_ctx_vision")
        check_depth(config.depth_vision, len(visual.blocks), "vpt: depth_vision")
        generator = torch.Generator().manual_seed(config.init_seed)
        self.vision_prompts = nn.ParameterList(
            nn.Parameter(p)
            for p in normal_prompts(generator, config.depth_vision, config.n_ctx_vision, visual.width,
                                    config.init_std)
        )
        self.set_classnames(classnames, template)

    def rebuild_class_buffers(self) -> None:
        texts = prompt_texts(self.config.ctx_init.replace("_", " "), self.classnames)
        self.register_buffer("fixed_text_features", encode_texts(self.clip, texts).float(), persistent=False)

    def encode_classes(self) -> torch.Tensor:
        return self.fixed_text_features

    def vision_layer_prompts(self) -> list[torch.Tensor]:
        return list(self.vision_prompts)

    @classmethod
    def config_from_reference(cls, trainer) -> VPTConfig:
        opts = reference_options(trainer, {"N_CTX_VISION", "CTX_INIT", "PROMPT_DEPTH_VISION"}, cls.name)
        # CTX_INIT is accepted but, as in the reference, not used: its text prefix is hard-coded.
        # Missing options take the reference's train.py defaults (N_CTX_VISION 2, PROMPT_DEPTH_VISION 1).
        return VPTConfig(n_ctx_vision=opts.get("N_CTX_VISION", 2), depth_vision=opts.get("PROMPT_DEPTH_VISION", 1),
                         ctx_init=REFERENCE_TEXT_PREFIX)

    def reference_name_map(self) -> dict[str, str]:
        return layer_name_map("vision_prompts", "image_encoder.VPT",
                              "image_encoder.transformer.resblocks.{}.VPT_shallow", len(self.vision_prompts))
