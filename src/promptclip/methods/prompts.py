"""Prompt pieces shared by the methods: tokenized class prompts, their frozen embeddings, and text encoding of
prompt embeddings (EOT truncation, optional chunking)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..clip.model import CLIP, Hook, eot_positions, truncate_after_eot
from ..clip.tokenizer import get_tokenizer, tokenize


@dataclass
class ClassPrompts:
    """Tokenized prompts ``"{prefix} {class}."`` for every class, and their word embeddings (no positions).

    ``embeddings`` is cut after the last EOT position of the class set; methods splice learned vectors into it.
    """

    texts: list[str]
    tokens: torch.Tensor  # [C, context_length]
    eot: torch.Tensor  # [C]
    name_lengths: list[int]  # BPE tokens of each class name
    embeddings: torch.Tensor  # [C, L, width], L = max(eot) + 1


def prompt_texts(prefix: str, classnames: list[str]) -> list[str]:
    """The reference prompt strings: prefix, space, class name, full stop (no space before the stop)."""
    prefix = prefix.strip()
    return [f"{prefix} {name}." if prefix else f"{name}." for name in classnames]


def build_class_prompts(clip: CLIP, texts: list[str], classnames: list[str] | None = None) -> ClassPrompts:
    tokens = tokenize(texts, context_length=clip.text.context_length).to(clip.token_embedding.weight.device)
    eot = eot_positions(tokens)
    with torch.no_grad():
        embeddings = clip.text.embed_tokens(truncate_after_eot(tokens, eot))
    tokenizer = get_tokenizer()
    lengths = [len(tokenizer.encode(name)) for name in (classnames or [])]
    return ClassPrompts(texts=texts, tokens=tokens, eot=eot, name_lengths=lengths, embeddings=embeddings)


def placeholder_prefix(n_ctx: int) -> str:
    """The reference's stand-in words for randomly initialised context: "X X ... X"."""
    return " ".join(["X"] * n_ctx)


def init_words_embedding(clip: CLIP, words: str) -> torch.Tensor:
    """Word embeddings ``[n, width]`` of ``words`` (no SOT/EOT): context vectors initialised from text."""
    ids = get_tokenizer().encode(words)
    with torch.no_grad():
        return clip.token_embedding.weight[ids].detach().clone()


def words_context(clip: CLIP, words: str) -> tuple[torch.Tensor, str]:
    """The reference's context init from words (CoOp, CoCoOp): as many vectors as *words*, taken from the leading
    token embeddings; the prompt string keeps every word, so BPE tokens beyond them stay frozen prompt tokens."""
    words = words.strip().replace("_", " ")
    return init_words_embedding(clip, words)[: len(words.split())], words


def normal_init(shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


def encode_text_embeddings(clip: CLIP, token_embeds: torch.Tensor, eot: torch.Tensor, hook: Hook | None = None,
                           chunk_size: int | None = None) -> torch.Tensor:
    """Text features of prompt embeddings ``[N, L, width]`` with EOT positions ``[N]``.

    Sequences are cut after the last EOT (exact under the causal mask). With ``chunk_size`` the N sequences go
    through the tower in chunks (each chunk cut after its own last EOT).
    """
    if chunk_size is None or token_embeds.shape[0] <= chunk_size:
        return _encode_chunk(clip, token_embeds, eot, hook)
    parts = [
        _encode_chunk(clip, token_embeds[i : i + chunk_size], eot[i : i + chunk_size], hook)
        for i in range(0, token_embeds.shape[0], chunk_size)
    ]
    return torch.cat(parts)


def _encode_chunk(clip: CLIP, token_embeds: torch.Tensor, eot: torch.Tensor, hook: Hook | None) -> torch.Tensor:
    x = clip.text.embed(token_embeds=truncate_after_eot(token_embeds, eot))
    return clip.text.pool(clip.text.forward_blocks(x, hook), eot)


def encode_texts(clip: CLIP, texts: list[str]) -> torch.Tensor:
    """Frozen text features of plain strings (zero-shot templates, teachers)."""
    tokens = tokenize(texts, context_length=clip.text.context_length).to(clip.token_embedding.weight.device)
    return clip.encode_text(tokens)


def template_features(clip: CLIP, templates: list[str], classnames: list[str],
                      normalize_each: bool = True) -> torch.Tensor:
    """Per-class text features averaged over ``templates`` (each L2-normalised first), ``[C, D]``, not normalised."""
    feats = []
    for template in templates:
        f = encode_texts(clip, [template.format(name) for name in classnames])
        feats.append(f / f.norm(dim=-1, keepdim=True) if normalize_each else f)
    return torch.stack(feats).mean(dim=0)


ReplaceFn = Callable[[int, torch.Tensor], torch.Tensor]


def replace_positions(x: torch.Tensor, start: int, values: torch.Tensor) -> torch.Tensor:
    """``x`` with positions ``start .. start + n`` of every sequence replaced by ``values`` (``[n, W]`` or
    ``[N, n, W]``), out of place so autograd sees the replacement."""
    n = values.shape[-2]
    values = values.to(x.dtype)
    if values.dim() == 2:
        values = values.expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :start], values, x[:, start + n :]], dim=1)
