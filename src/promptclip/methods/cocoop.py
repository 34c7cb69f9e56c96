"""CoCoOp (Zhou et al., CVPR 2022): CoOp's context plus an image-conditioned bias from a small Meta-Net.

Follows the reference (KaiyangZhou/CoOp ``trainers/cocoop.py``):

- the context is initialised from ``ctx_init`` ("a photo of a"); its length is the number of init *words* and the
  vectors are the first that-many token embeddings of the init text (the reference's rule; for words that split into
  several BPE tokens the remaining tokens stay as frozen prompt tokens); without ``ctx_init``, ``n_ctx`` vectors
  from N(0, ``init_std``) behind the placeholder "X X ... X";
- the Meta-Net ``Linear(D -> D // 16) -> ReLU -> Linear(-> text width)`` maps the *L2-normalised* image feature to
  one bias that is added to every context token;
- every image gets its own C prompts ``[SOS][ctx + bias][class][.][EOS]``; its logits are the scaled cosines between
  its normalised feature and its own C text features.

Unlike the reference, which runs the text tower once per image in a Python loop, the B x C prompts are encoded in one
batched pass, chunked and checkpointed by the engine's text-memory policy (:mod:`promptclip.memory`;
``text_chunk_size`` fixes the sequences per pass); the result is the same per image.
The Meta-Net is initialised like ``nn.Linear``'s default (uniform in +-1/sqrt(fan_in)) but from an explicit seed.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import PromptMethod, cosine_logits, reference_options, register
from .prompts import (
    InstancePrompts,
    build_class_prompts,
    encode_text_embeddings,
    normal_init,
    placeholder_prefix,
    prompt_texts,
    words_context,
)


@dataclass
class CoCoOpConfig:
    #: Context length when ``ctx_init`` is empty (random init); otherwise the number of init words.
    n_ctx: int = 4
    #: Init words of the context; "" for random N(0, ``init_std``) context.
    ctx_init: str = "a photo of a"
    init_std: float = 0.02
    #: Seed of the random context (``init_seed``) and of the Meta-Net (``init_seed + 1``); no global RNG is used.
    init_seed: int = 0
    #: Prompt sequences (images x classes) per text-tower pass; None: the engine's automatic chunking.
    text_chunk_size: int | None = None


def _uniform_linear(linear: nn.Linear, generator: torch.Generator) -> None:
    """``nn.Linear``'s default distribution (U(+-1/sqrt(fan_in)) for weight and bias), from ``generator``."""
    bound = 1.0 / math.sqrt(linear.in_features)
    with torch.no_grad():
        for param in (linear.weight, linear.bias):
            param.copy_(torch.rand(param.shape, generator=generator) * 2 * bound - bound)


@register
class CoCoOp(PromptMethod):
    name = "cocoop"
    config_class = CoCoOpConfig
    image_independent_text = False
    #: The Meta-Net conditions the text on the frozen tower's features; the image features themselves are frozen.
    frozen_image_features = True
    reference_trainers = ("CoCoOp",)

    def __init__(self, backbone, config: CoCoOpConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        if config.text_chunk_size is not None and config.text_chunk_size < 1:
            raise ConfigError(f"cocoop: text_chunk_size must be at least 1 (or null), got {config.text_chunk_size}")
        width = backbone.text.width
        if config.ctx_init.strip():
            ctx, self.prefix_text = words_context(backbone, config.ctx_init)
        else:
            if config.n_ctx < 1:
                raise ConfigError(f"cocoop: n_ctx must be at least 1, got {config.n_ctx}")
            ctx = normal_init((config.n_ctx, width), config.init_std, config.init_seed)
            self.prefix_text = placeholder_prefix(config.n_ctx)
        self.ctx = nn.Parameter(ctx)

        vis_dim = backbone.visual.output_dim
        if vis_dim < 16:
            raise ConfigError(f"cocoop: the image feature ({vis_dim}) is too narrow for a Meta-Net of width dim // 16")
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.utils.skip_init(nn.Linear, vis_dim, vis_dim // 16)),
            ("relu", nn.ReLU()),
            ("linear2", nn.utils.skip_init(nn.Linear, vis_dim // 16, width)),
        ]))  # skip_init: no draw from the global RNG; filled from the seeded generator below
        generator = torch.Generator().manual_seed(config.init_seed + 1)
        _uniform_linear(self.meta_net.linear1, generator)
        _uniform_linear(self.meta_net.linear2, generator)
        self.set_classnames(classnames, template)

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[0]

    def rebuild_class_buffers(self) -> None:
        prompts = build_class_prompts(self.clip, prompt_texts(self.prefix_text, self.classnames), self.classnames)
        self.register_buffer("token_prefix", prompts.embeddings[:, :1], persistent=False)
        self.register_buffer("token_suffix", prompts.embeddings[:, 1 + self.n_ctx :], persistent=False)
        self.register_buffer("eot", prompts.eot, persistent=False)

    def image_bias(self, image_features: torch.Tensor) -> torch.Tensor:
        """Meta-Net output ``[B, W]`` for image features ``[B, D]`` (normalised here, as the reference does)."""
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        return self.meta_net(image_features)

    def instance_text_features(self, ctx: torch.Tensor) -> torch.Tensor:
        """Text features ``[B, C, D]`` for per-image contexts ``ctx`` ``[B, n_ctx, W]``, in one batched pass."""
        batch, num_classes = ctx.shape[0], self.token_prefix.shape[0]
        embeds = InstancePrompts(self.token_prefix, ctx, self.token_suffix)  # [B*C, L, W], image-major, built per chunk
        feats = encode_text_embeddings(self.clip, embeds, self.eot.repeat(batch),
                                       chunk_size=self.config.text_chunk_size)
        return feats.view(batch, num_classes, -1)

    def forward(self, batch) -> torch.Tensor:
        image_features = self.image_features_of(batch)
        ctx = self.ctx.unsqueeze(0) + self.image_bias(image_features).unsqueeze(1)  # [B, n_ctx, W]
        return cosine_logits(self.clip, image_features, self.instance_text_features(ctx))

    @classmethod
    def config_from_reference(cls, trainer) -> CoCoOpConfig:
        # Defaults are the reference's train.py defaults (cfg.TRAINER.COCOOP), not the official config's.
        opts = reference_options(trainer, {"N_CTX", "CTX_INIT"}, cls.name)
        return CoCoOpConfig(n_ctx=opts.get("N_CTX", 16), ctx_init=opts.get("CTX_INIT", "") or "")

    def reference_name_map(self) -> dict[str, str]:
        names = {"prompt_learner.ctx": "ctx"}
        for layer in ("linear1", "linear2"):
            for kind in ("weight", "bias"):
                names[f"prompt_learner.meta_net.{layer}.{kind}"] = f"meta_net.{layer}.{kind}"
        return names
