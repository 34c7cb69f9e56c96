"""CoOp (Zhou et al., IJCV 2022): learned context vectors in the text prompt, ``[SOS][ctx][class][.][EOS]``.

Prompt construction follows the reference (KaiyangZhou/CoOp ``trainers/coop.py``): with ``ctx_init`` the context
length is the number of init words and the vectors are the leading token embeddings; without it, ``n_ctx`` vectors drawn
from N(0, 0.02) behind the placeholder words "X X ... X". The class name goes at the end, in the middle (context
split at ``n_ctx // 2``) or at the front.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from .base import PromptMethod, cosine_logits, reference_options, register
from .prompts import (
    build_class_prompts,
    encode_text_embeddings,
    normal_init,
    placeholder_prefix,
    prompt_texts,
    words_context,
)


@dataclass
class CoOpConfig:
    n_ctx: int = 16
    #: Init words, e.g. "a photo of a"; overrides ``n_ctx`` with their word count (and ignores ``csc``, as the
    #: reference does).
    ctx_init: str = ""
    class_token_position: Literal["end", "middle", "front"] = "end"
    #: Class-specific context (one set of vectors per class); cannot be moved to other class names.
    csc: bool = False
    init_std: float = 0.02
    #: Seed of the random context init (explicit; independent of any global RNG).
    init_seed: int = 0
    #: Classes per text-encoder chunk (None: the engine's automatic chunking, promptclip.memory).
    text_chunk_size: int | None = None


def context_vectors(clip, n_ctx: int, ctx_init: str, csc: bool, num_classes: int, std: float,
                    seed: int) -> tuple[torch.Tensor, str]:
    """Initial context ``[n, W]`` (``[C, n, W]`` for CSC) and the prompt prefix string that stands for it."""
    if ctx_init.strip():
        return words_context(clip, ctx_init)
    if n_ctx < 1:
        raise ConfigError(f"n_ctx must be at least 1, got {n_ctx}")
    width = clip.text.width
    shape = (num_classes, n_ctx, width) if csc else (n_ctx, width)
    return normal_init(shape, std, seed), placeholder_prefix(n_ctx)


def position_order(position: str, n_ctx: int, name_lengths: list[int], length: int) -> torch.Tensor:
    """Per-class gather indices ``[C, L]`` that move the class-name tokens from the "end" layout
    ``[SOS][ctx 1..n][name][rest]`` to ``position``."""
    orders = []
    for name_len in name_lengths:
        sos, ctx = [0], list(range(1, 1 + n_ctx))
        name = list(range(1 + n_ctx, 1 + n_ctx + name_len))
        rest = list(range(1 + n_ctx + name_len, length))
        if position == "end":
            order = sos + ctx + name + rest
        elif position == "middle":
            half = n_ctx // 2
            order = sos + ctx[:half] + name + ctx[half:] + rest
        else:
            order = sos + name + ctx + rest
        orders.append(order)
    return torch.tensor(orders, dtype=torch.long)


@register
class CoOp(PromptMethod):
    name = "coop"
    config_class = CoOpConfig
    image_independent_text = True
    frozen_image_features = True
    reference_trainers = ("CoOp",)

    def __init__(self, backbone, config: CoOpConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        ctx, self.prefix_text = context_vectors(backbone, config.n_ctx, config.ctx_init, config.csc,
                                                len(classnames), config.init_std, config.init_seed)
        self.ctx = nn.Parameter(ctx)
        self.set_classnames(classnames, template)

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[-2]

    def set_classnames(self, classnames, template=None) -> None:
        if self.ctx.dim() == 3 and len(classnames) != self.ctx.shape[0]:
            raise ConfigError(
                f"coop with class-specific context (csc) learned {self.ctx.shape[0]} classes and cannot be used "
                f"with {len(classnames)} other class names"
            )
        super().set_classnames(classnames, template)

    def rebuild_class_buffers(self) -> None:
        prompts = build_class_prompts(self.clip, prompt_texts(self.prefix_text, self.classnames), self.classnames)
        self.register_buffer("token_prefix", prompts.embeddings[:, :1], persistent=False)
        self.register_buffer("token_suffix", prompts.embeddings[:, 1 + self.n_ctx :], persistent=False)
        self.register_buffer("eot", prompts.eot, persistent=False)
        order = position_order(self.config.class_token_position, self.n_ctx, prompts.name_lengths,
                               prompts.embeddings.shape[1])
        self.register_buffer("order", order.to(self.eot.device), persistent=False)

    def prompt_embeddings(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Text-tower input ``[C, L, W]`` for context ``ctx`` (default: the learned one)."""
        ctx = self.ctx if ctx is None else ctx
        num_classes = self.token_prefix.shape[0]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(num_classes, -1, -1)
        embeds = torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype), self.token_suffix], dim=1)
        if self.config.class_token_position == "end":
            return embeds
        return embeds.gather(1, self.order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))

    def encode_classes(self) -> torch.Tensor:
        return encode_text_embeddings(self.clip, self.prompt_embeddings(), self.eot,
                                      chunk_size=self.config.text_chunk_size)

    def forward(self, batch) -> torch.Tensor:
        return cosine_logits(self.clip, self.image_features_of(batch), self.class_features())

    @classmethod
    def config_from_reference(cls, trainer) -> CoOpConfig:
        opts = reference_options(trainer, {"N_CTX", "CSC", "CTX_INIT", "CLASS_TOKEN_POSITION"}, cls.name)
        return CoOpConfig(
            n_ctx=opts.get("N_CTX", 16),
            ctx_init=opts.get("CTX_INIT", "") or "",
            class_token_position=opts.get("CLASS_TOKEN_POSITION", "end"),
            csc=opts.get("CSC", False),
        )

    def reference_name_map(self) -> dict[str, str]:
        return {"prompt_learner.ctx": "ctx"}
