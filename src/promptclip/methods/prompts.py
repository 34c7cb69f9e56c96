"""Prompt pieces shared by the methods: tokenized class prompts, their frozen embeddings, and text encoding of
prompt embeddings (EOT truncation; chunking and checkpointing by the policy of :mod:`promptclip.memory`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..clip.model import CLIP, AfterHook, Hook, eot_positions, truncate_after_eot
from ..clip.tokenizer import get_tokenizer, tokenize
from ..memory import plan_text_pass, run_in_chunks


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


def encode_text_embeddings(clip: CLIP, token_embeds: torch.Tensor | InstancePrompts, eot: torch.Tensor,
                           hook: Hook | None = None, chunk_size: int | None = None,
                           after: AfterHook | None = None) -> torch.Tensor:
    """Text features of prompt embeddings ``[N, L, width]`` with EOT positions ``[N]``; ``hook`` / ``after`` run
    before / after each block (:meth:`promptclip.clip.model.Transformer.forward`).

    Sequences are cut after the last EOT (exact under the causal mask). How the tower runs follows the text-memory
    policy in effect (:mod:`promptclip.memory`): one pass, or chunks of sequences (each cut after its own last EOT),
    checkpointed while training. ``chunk_size`` (a method's ``text_chunk_size``) fixes the sequences per chunk.
    ``token_embeds`` may be an :class:`InstancePrompts`, whose rows are built chunk by chunk.
    """
    num = token_embeds.shape[0]
    plan = plan_text_pass(num, int(eot.max()) + 1 if num else 1, chunk_size)
    if plan.chunk is None and not plan.checkpoint:
        return _encode_chunk(clip, token_embeds[0:num], eot, hook, after)
    step = plan.chunk or num

    def run(start: int, stop: int) -> torch.Tensor:
        # Rows are sliced (or built) inside the pass, so a checkpoint keeps neither them nor any activation.
        return _encode_chunk(clip, token_embeds[start:stop], eot[start:stop], hook, after)

    return run_in_chunks(run, num, step, plan.checkpoint)


def _encode_chunk(clip: CLIP, token_embeds: torch.Tensor, eot: torch.Tensor, hook: Hook | None,
                  after: AfterHook | None = None) -> torch.Tensor:
    x = clip.text.embed(token_embeds=truncate_after_eot(token_embeds, eot))
    return clip.text.pool(clip.text.forward_blocks(x, hook, after), eot)


class InstancePrompts:
    """B x C prompt embeddings ``[SOS][ctx_b][rest of class c]``, image-major (sequence ``b * C + c``).

    Stands in for the ``[B * C, L, W]`` tensor of instance-conditioned methods (CoCoOp): slicing it builds only the
    rows asked for, so :func:`encode_text_embeddings` builds each chunk inside its own (checkpointed) pass and the
    B x C tensor never exists at once.
    """

    def __init__(self, prefix: torch.Tensor, ctx: torch.Tensor, suffix: torch.Tensor):
        self.prefix = prefix  # [C, 1, W]
        self.ctx = ctx.to(prefix.dtype)  # [B, n, W]
        self.suffix = suffix  # [C, S, W]
        self.num_classes = prefix.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        length = self.prefix.shape[1] + self.ctx.shape[1] + self.suffix.shape[1]
        return self.ctx.shape[0] * self.num_classes, length, self.prefix.shape[2]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        index = torch.arange(start, stop, device=self.prefix.device)
        image, cls = index // self.num_classes, index % self.num_classes
        return torch.cat([self.prefix[cls], self.ctx[image], self.suffix[cls]], dim=1)


def encode_texts(clip: CLIP, texts: list[str]) -> torch.Tensor:
    """Frozen text features of plain strings (zero-shot templates, teachers)."""
    tokens = tokenize(texts, context_length=clip.text.context_length).to(clip.token_embedding.weight.device)
    return clip.encode_text(tokens)


def frozen_class_features(clip: CLIP, template: str, classnames: list[str]) -> torch.Tensor:
    """L2-normalised frozen CLIP features ``[C, D]`` of ``template`` filled with each class name, in fp32 and without
    gradients (the hand-crafted targets and teachers of KgCoOp, ProGrad, TCP)."""
    with torch.no_grad(), torch.autocast(clip.token_embedding.weight.device.type, enabled=False):
        frozen = encode_texts(clip, [template.format(name) for name in classnames])
    return frozen / frozen.norm(dim=-1, keepdim=True)


def check_prompts_fit(clip: CLIP, templates: list[str], classnames: list[str]) -> None:
    """Raise :class:`ContextLengthError` if a class name does not fit the longest of ``templates`` (tokenizing only
    that one: the cheap upfront check of prompts that are built later, e.g. teachers' template ensembles)."""
    tokenizer = get_tokenizer()
    longest = max(templates, key=lambda template: len(tokenizer.encode(template.format(""))))
    tokenize([longest.format(name) for name in classnames], context_length=clip.text.context_length)


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
