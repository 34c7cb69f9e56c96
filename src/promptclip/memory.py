"""Bounded text-tower memory: chunked prompt encoding with activation checkpointing.

Every method that learns text prompts encodes them through :func:`promptclip.methods.prompts.encode_text_embeddings`
(CoOp and KgCoOp: C class prompts; CoCoOp and other instance-conditioned methods: B x C prompts; VPT-deep, IVLP,
MaPLe and PromptSRC with their deep text prompts). That one function asks this module how to run the text tower:

- **chunks**: the N sequences go through the tower in chunks of ``chunk`` sequences, each chunk cut after its own
  last EOT (exact under the causal mask);
- **checkpointing**: with gradients enabled, each chunk's whole pass through the text tower runs under
  ``torch.utils.checkpoint`` (``use_reentrant=False``): the forward keeps only what the chunk is built from, and the
  backward re-runs one chunk at a time. Gradients are exact (the same operations run again); the cost is one more
  forward pass of the text tower per training step.

Memory held for the backward then grows by about one prompt embedding (tokens x width) per sequence instead of all
the activations of every block (tens of times more), and the peak adds one chunk's activations.

The policy (:class:`TextMemory`):

``auto`` (default)
    one plain pass while ``sequences x tokens <= chunk_tokens``; above that, chunks of
    ``max(1, chunk_tokens // tokens)`` sequences, checkpointed when gradients are enabled. Small class sets pay
    nothing; ImageNet-size ones (and CoCoOp's B x C) stay bounded.
``always``
    chunk and checkpoint whatever the size (what the exactness tests use).
``off``
    one plain pass with all activations kept (the reference implementations' behaviour).

A method config's ``text_chunk_size`` (sequences per chunk), when set, replaces the automatic chunk size in every
mode. Evaluation runs without gradients, so nothing is checkpointed there and image-independent text features are
still computed once and cached (:meth:`PromptMethod.class_features`); chunking only bounds the temporaries.

The policy in effect is scoped like ``torch.no_grad``: :func:`text_memory` sets it for the current thread (or
asyncio task) and restores the previous one on exit; :func:`promptclip.train.fit` sets it from
``TrainConfig.text_memory`` / ``TrainConfig.text_chunk_tokens`` for the run. Outside any scope the default
(``auto``, 1024 tokens) applies. Nothing here is global state shared between threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import torch
import torch.utils.checkpoint

MODES = ("auto", "always", "off")
#: Default token budget of one chunk: with ViT-B/16's text tower (width 512, 12 blocks) one chunk's activations
#: take about 0.5 GB of CPU RSS in fp32 while one chunk is re-run (docs/performance.md, "Memory").
DEFAULT_CHUNK_TOKENS = 1024


@dataclass(frozen=True)
class TextMemory:
    mode: Literal["auto", "always", "off"] = "auto"
    #: Sequences x tokens per chunk (auto and always modes).
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"text memory mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.chunk_tokens < 1:
            raise ValueError(f"text_chunk_tokens must be at least 1, got {self.chunk_tokens}")


@dataclass(frozen=True)
class TextPlan:
    """How one call runs the text tower: ``chunk`` sequences per pass (None: all at once), checkpointed or not."""

    chunk: int | None
    checkpoint: bool


_DEFAULT = TextMemory()
_CURRENT: ContextVar[TextMemory | None] = ContextVar("promptclip_text_memory", default=None)


def current_text_memory() -> TextMemory:
    """The policy in effect in this thread / task."""
    return _CURRENT.get() or _DEFAULT


@contextlib.contextmanager
def text_memory(mode: TextMemory | str = "auto", chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Iterator[TextMemory]:
    """Use a text-memory policy inside the ``with`` block (this thread / task only)::

        with text_memory("off"):
            loss = method.loss(batch, method(batch))["loss"]
    """
    policy = mode if isinstance(mode, TextMemory) else TextMemory(mode, chunk_tokens)
    token = _CURRENT.set(policy)
    try:
        yield policy
    finally:
        _CURRENT.reset(token)


def plan_text_pass(num_sequences: int, tokens: int, chunk_size: int | None = None, needs_grad: bool | None = None,
                   policy: TextMemory | None = None) -> TextPlan:
    """The plan for ``num_sequences`` sequences of ``tokens`` tokens (after EOT truncation).

    ``chunk_size`` is a method's explicit ``text_chunk_size``; ``needs_grad`` defaults to ``torch.is_grad_enabled()``.
    """
    policy = policy or current_text_memory()
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled()
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"text_chunk_size must be at least 1, got {chunk_size}")
    tokens = max(1, int(tokens))
    if policy.mode == "off":
        return TextPlan(chunk_size if chunk_size is not None and chunk_size < num_sequences else None, False)
    automatic = max(1, policy.chunk_tokens // tokens)
    if policy.mode == "always":
        return TextPlan(chunk_size or automatic, needs_grad)
    chunk = chunk_size if chunk_size is not None else (
        None if num_sequences * tokens <= policy.chunk_tokens else automatic)
    if chunk is not None and chunk >= num_sequences:
        chunk = None
    return TextPlan(chunk, needs_grad and chunk is not None)


__all__ = ["TextMemory", "TextPlan", "text_memory", "current_text_memory", "plan_text_pass", "DEFAULT_CHUNK_TOKENS"]


def run_in_chunks(run: Callable[[int, int], torch.Tensor], total: int, step: int, checkpoint: bool) -> torch.Tensor:
    """``run(start, stop)`` over ``0..total`` in steps of ``step``, each call checkpointed when asked (so the forward
    keeps nothing of a chunk but its inputs), results concatenated along dim 0."""
    parts = []
    for start in range(0, total, step):
        stop = min(start + step, total)
        if checkpoint:
            parts.append(torch.utils.checkpoint.checkpoint(run, start, stop, use_reentrant=False))
        else:
            parts.append(run(start, stop))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
