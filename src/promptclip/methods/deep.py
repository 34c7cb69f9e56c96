"""Deep prompts shared by VPT-deep, IVLP, MaPLe and PromptSRC (muzairkhattak/multimodal-prompt-learning
``clip/model.py``: ``ResidualAttentionBlock_IVLP`` / ``ResidualAttentionBlock_MaPLe``; the same file in
muzairkhattak/PromptSRC).

Semantics, for a prompt depth ``J`` and prompts ``P_0 .. P_{J-1}`` of a tower:

- ``P_0`` enters with the input: text positions ``1 .. n`` (right after SOS) hold it in the token embeddings; vision
  prompt tokens are appended at the END of the sequence after the positional embedding, before ``ln_pre``.
- Before block ``i`` for ``1 <= i < J``, the outputs of block ``i - 1`` at the prompt positions are dropped and
  ``P_i`` takes their place.
- Blocks ``J .. L-1`` carry the prompt tokens forward (their states are simply what the previous block produced).
- Pooling ignores prompt tokens (vision: CLS; text: EOT).

``DeepPromptMethod`` holds what the four methods share: learned text context at the input with frozen
prefix/suffix buffers rebuilt from the class names, a text tower hook for deeper text prompts, and a vision encoder
with deep vision prompts. Subclasses say which tensors are the per-layer prompts (``text_layer_prompts`` /
``vision_layer_prompts``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ..clip.model import CLIP, Hook
from ..errors import ConfigError
from .base import PromptMethod, cosine_logits
from .prompts import (
    build_class_prompts,
    encode_text_embeddings,
    init_words_embedding,
    placeholder_prefix,
    prompt_texts,
    replace_positions,
)

#: The reference initialises text context from ``CTX_INIT`` only up to this many context tokens (else random).
MAX_INIT_CTX = 4


def check_depth(depth: int, layers: int, what: str, minimum: int = 1) -> None:
    """A prompt depth must lie in ``minimum .. layers`` (prompts exist for blocks ``0 .. depth - 1``)."""
    if not minimum <= depth <= layers:
        raise ConfigError(
            f"{what} must be between {minimum} and the tower's {layers} layers (prompts are inserted before blocks "
            f"0 .. depth-1), got {depth}"
        )


def check_n_ctx(n_ctx: int, what: str) -> None:
    if n_ctx < 1:
        raise ConfigError(f"{what} must be at least 1, got {n_ctx}")


def normal_prompts(generator: torch.Generator, count: int, n_ctx: int, width: int,
                   std: float) -> list[torch.Tensor]:
    """``count`` prompt tensors ``[n_ctx, width]`` from N(0, std²), drawn in order from ``generator``."""
    return [torch.randn((n_ctx, width), generator=generator) * std for _ in range(count)]


def linear_init(generator: torch.Generator, in_features: int, out_features: int) -> nn.Linear:
    """A Linear with ``nn.Linear``'s default init (weight and bias ~ U(±1/sqrt(in))), from ``generator``."""
    layer = nn.Linear(in_features, out_features)
    bound = in_features**-0.5
    with torch.no_grad():
        layer.weight.copy_(torch.rand((out_features, in_features), generator=generator) * 2 * bound - bound)
        layer.bias.copy_(torch.rand((out_features,), generator=generator) * 2 * bound - bound)
    return layer


def text_context(clip: CLIP, n_ctx: int, ctx_init: str, std: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """Input text context ``[n_ctx, W]`` and the prompt prefix string of MaPLe / IVLP / PromptSRC.

    With ``ctx_init`` and ``n_ctx <= 4``: the FIRST ``n_ctx`` token embeddings of the init words, while the prompt
    string keeps ALL init words (so e.g. "of a" of "a photo of a" with ``n_ctx = 2`` stay frozen tokens behind the
    learned ones). Otherwise N(0, std²) behind the placeholder "X X ... X".
    """
    check_n_ctx(n_ctx, "n_ctx (text)")
    words = ctx_init.strip().replace("_", " ")
    if words and n_ctx <= MAX_INIT_CTX:
        embedding = init_words_embedding(clip, words)
        if embedding.shape[0] < n_ctx:
            raise ConfigError(
                f"ctx_init {ctx_init!r} has {embedding.shape[0]} tokens, fewer than n_ctx={n_ctx}: the learned "
                "context would overwrite the class name; use longer init words or a smaller n_ctx"
            )
        return embedding[:n_ctx].clone(), words
    width = clip.text.width
    return torch.randn((n_ctx, width), generator=generator) * std, placeholder_prefix(n_ctx)


def deep_hook(layer_prompts: Sequence[torch.Tensor], where: Literal["text", "vision"]) -> Hook:
    """Block hook replacing the prompt positions with ``layer_prompts[i]`` before block ``i``, 1 <= i < depth.

    Text prompts sit at positions ``1 .. n`` (after SOS); vision prompts are the last ``n`` tokens. Before blocks
    at or after ``len(layer_prompts)`` nothing is replaced: the prompt tokens are carried forward.
    """
    depth = len(layer_prompts)

    def hook(layer: int, x: torch.Tensor) -> torch.Tensor:
        if not 1 <= layer < depth:
            return x
        prompts = layer_prompts[layer]
        start = 1 if where == "text" else x.shape[1] - prompts.shape[-2]
        return replace_positions(x, start, prompts)

    return hook


def encode_image_deep(clip: CLIP, images: torch.Tensor, layer_prompts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Image features with deep vision prompts (``layer_prompts[0]`` appended at the input); none: plain CLIP."""
    if not layer_prompts:
        return clip.encode_image(images)
    visual = clip.visual
    x = visual.embed(images, layer_prompts[0])
    return visual.pool(visual.forward_blocks(x, deep_hook(layer_prompts, "vision")))


class DeepPromptMethod(PromptMethod):
    """Shared machinery: learned input text context + deeper text prompts, deep vision prompts, cosine logits.

    Subclasses build ``self.text_prompts`` (or leave ``has_text_prompts`` False) and implement
    ``text_layer_prompts()`` / ``vision_layer_prompts()``: the per-layer prompt tensors ``[n, width]``, index = block.
    """

    supports_resnet = False
    image_independent_text = True
    #: False: fixed hand-written text prompts (VPT), True: a learned context at text positions 1..n.
    has_text_prompts = True

    def _setup_text(self, n_ctx: int, ctx_init: str, std: float, generator: torch.Generator) -> torch.Tensor:
        ctx, self.prefix_text = text_context(self.clip, n_ctx, ctx_init, std, generator)
        self.n_ctx_text = n_ctx
        return ctx

    def rebuild_class_buffers(self) -> None:
        if not self.has_text_prompts:
            return
        prompts = build_class_prompts(self.clip, prompt_texts(self.prefix_text, self.classnames), self.classnames)
        self.register_buffer("token_prefix", prompts.embeddings[:, :1], persistent=False)
        self.register_buffer("token_suffix", prompts.embeddings[:, 1 + self.n_ctx_text :], persistent=False)
        self.register_buffer("eot", prompts.eot, persistent=False)

    def text_layer_prompts(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def vision_layer_prompts(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def prompt_embeddings(self, ctx: torch.Tensor) -> torch.Tensor:
        """Text-tower input ``[C, L, W]``: SOS, the context ``ctx`` ``[n, W]``, then the frozen rest."""
        ctx = ctx.to(self.token_prefix.dtype).unsqueeze(0).expand(self.token_prefix.shape[0], -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)

    def encode_text_deep(self, layer_prompts: Sequence[torch.Tensor],
                         chunk_size: int | None = None) -> torch.Tensor:
        return encode_text_embeddings(self.clip, self.prompt_embeddings(layer_prompts[0]), self.eot,
                                      hook=deep_hook(layer_prompts, "text"), chunk_size=chunk_size)

    def encode_classes(self) -> torch.Tensor:
        return self.encode_text_deep(self.text_layer_prompts(), getattr(self.config, "text_chunk_size", None))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return encode_image_deep(self.clip, images, self.vision_layer_prompts())

    def forward(self, batch) -> torch.Tensor:
        return cosine_logits(self.clip, self.encode_image(batch["image"]), self.class_features())


def layer_name_map(prefix_ours: str, first: str | None, deeper: str, depth: int, offset: int = 0) -> dict[str, str]:
    """Reference name → ours for per-layer prompts: ``first`` is layer 0, ``deeper.format(i - offset)`` layer i."""
    names = {first: f"{prefix_ours}.0"} if first is not None else {}
    names.update({deeper.format(i - offset): f"{prefix_ours}.{i}" for i in range(1, depth)})
    return names
