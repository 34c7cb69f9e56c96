"""DCP (Liu et al., Findings of ACL 2023): Deeply Coupled Cross-modal Prompt learning with Cross-Modal Prompt Attention.

Learned: ``n_ctx`` text context vectors (input of the text tower, ``[SOS][ctx][class][.][EOS]``) and ``n_ctx``
visual prompt tokens (appended after the patch tokens, before ``ln_pre``), plus one Cross-Modal Prompt Attention
(CMPA) block (or one per layer when not shared). The two towers run in lock-step; before blocks ``1 .. depth`` the
CMPA block takes the current prompt-token states of both towers and computes new ones, each tower's prompts being
updated by attending from the *other* tower's prompts (query) to its own (key/value), followed by an MLP.

Two modes (``docs/dcp.md`` has the equations and what is inferred):

- ``reference``: what GingL/CMPA (``trainers/cmpa.py``, ``clip/model.py`` at 407a743) computes. Prompt states are
  pooled over the batch (visual) and over the classes (text) with ``fusing``; the visual update is written back to
  every image; the text update is computed and thrown away (the released code assigns it to a temporary), so the
  text half of the CMPA block gets no gradient. Predictions depend on which images share a batch.
- ``paper`` (default): both updates are written back into their towers (the "mutual exchange" of the paper), and
  each image's own visual prompt states interact with the text prompt states (per-sample pooling), so the text
  tower runs one sequence per (image, class) pair after the first exchange and an image's logits do not depend on
  the rest of its batch. The per-sample design is INFERRED (the paper's text does not specify it).

``pooling`` overrides the mode's pooling (``batch`` / ``per_sample``); ``batch_independent`` and ``describe()``
record which variant produced a number.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import skip_init

from ..clip.model import LayerNorm, QuickGELU
from ..errors import ConfigError
from .base import PromptMethod, cosine_logits, reference_options, register
from .prompts import (
    build_class_prompts,
    init_words_embedding,
    placeholder_prefix,
    prompt_texts,
    replace_positions,
)

#: ``recorder(key, tensor)``: receives intermediate values of a forward pass (see ``DCP.forward``).
Recorder = Callable[[str, torch.Tensor], None]

#: The reference uses init words only for short contexts (``if ctx_init and n_ctx <= 4``).
MAX_CTX_FOR_INIT_WORDS = 4


@dataclass
class DCPConfig:
    """Defaults are the official config (``CMPA:configs/trainers/CMPA/vit_b16_c2_ep20_batch4_16ctx.yaml`` with the
    options of ``scripts/cmpa/main.sh``); its ``CTX_INIT`` is not used by the reference with 16 tokens, hence ""."""

    #: Context tokens per tower (text and visual prompts have the same count).
    n_ctx: int = 16
    #: Init words of the text context; used only when ``n_ctx <= 4`` (as the reference), the first ``n_ctx`` word
    #: embeddings become the context and the prompt string keeps all the words.
    ctx_init: str = ""
    #: CMPA runs before blocks ``1 .. depth`` (0-based; block 0 sees the input prompts). ``depth`` up to the number
    #: of blocks is accepted; every block after the first gets CMPA from ``depth = blocks - 1`` on.
    depth: int = 9
    #: How prompt states are reduced over the batch (``pooling: batch``) and over the classes.
    fusing: Literal["mean", "first", "max"] = "mean"
    #: One CMPA block shared by all layers (the reference's ``PS``).
    shared: bool = True
    #: ``paper``: bidirectional write-back; ``reference``: the released code (text update discarded).
    mode: Literal["paper", "reference"] = "paper"
    #: None: the mode's own (paper: per_sample, reference: batch). ``batch`` pools visual prompt states over the
    #: images of a batch (predictions depend on the batch); ``per_sample`` keeps each image's own.
    pooling: Literal["per_sample", "batch"] | None = None
    init_std: float = 0.02
    #: Seed of every random init of the method (prompts and CMPA weights; never the global RNG).
    init_seed: int = 0
    #: Paper mode with per-sample pooling only: max text sequences (images x classes) per lock-step pass; the batch
    #: is split into groups of ``max(1, text_chunk_size // classes)`` images. None: the whole batch at once.
    text_chunk_size: int | None = None

    def __post_init__(self):
        if self.n_ctx < 1:
            raise ConfigError(f"dcp: n_ctx must be at least 1, got {self.n_ctx}")
        if self.depth < 1:
            raise ConfigError(f"dcp: depth must be at least 1 (CMPA before block 1), got {self.depth}")
        if self.ctx_init.strip() and self.n_ctx > MAX_CTX_FOR_INIT_WORDS:
            raise ConfigError(
                f"dcp: ctx_init is used only with n_ctx <= {MAX_CTX_FOR_INIT_WORDS} (as in the reference); with "
                f"n_ctx={self.n_ctx} the context is random N(0, {self.init_std}), so leave ctx_init empty"
            )
        if self.effective_pooling == "per_sample" and self.fusing != "mean":
            raise ConfigError(
                f"dcp: fusing={self.fusing!r} selects how prompt states are reduced over the batch, which only "
                "pooling='batch' does (the text prompt states are the same for every class, so reducing them "
                "over classes changes nothing); use fusing='mean' with per-sample pooling"
            )
        if self.text_chunk_size is not None:
            if self.text_chunk_size < 1:
                raise ConfigError(f"dcp: text_chunk_size must be at least 1, got {self.text_chunk_size}")
            if not (self.mode == "paper" and self.effective_pooling == "per_sample"):
                raise ConfigError(
                    "dcp: text_chunk_size applies to mode='paper' with per-sample pooling, where the text tower "
                    "runs one sequence per (image, class); here it runs one per class, in lock-step with the whole "
                    "batch, and cannot be split. Remove text_chunk_size"
                )

    @property
    def effective_pooling(self) -> str:
        if self.pooling is not None:
            return self.pooling
        return "batch" if self.mode == "reference" else "per_sample"


def _fuse(x: torch.Tensor, dim: int, how: str) -> torch.Tensor:
    """Reduce ``x`` over ``dim`` (kept, size 1) as the reference's ``FUSING``."""
    if how == "mean":
        return x.mean(dim=dim, keepdim=True)
    if how == "first":
        return x.narrow(dim, 0, 1)
    return x.max(dim=dim, keepdim=True).values


class PromptUpdate(nn.Module):
    """One half of a CMPA block: new prompt states of one tower (``target``), queried by the other's (``source``).

    ``out = t + MHA(q = LN1(W s), k = v = LN1(t))``; ``out = out + MLP(LN2(out))``, where ``W`` maps the source
    width to the target width, ``LN1`` is one LayerNorm used for both the query and the key/value input, and the
    MLP is 4x wide with QuickGELU. Batch-first: ``[N, n_ctx, width]``, attention over the ``n_ctx`` tokens.
    """

    def __init__(self, width: int, source_width: int, heads: int, device: torch.device):
        super().__init__()
        self.query_proj = skip_init(nn.Linear, source_width, width, device=device)
        self.attn = skip_init(nn.MultiheadAttention, width, heads, batch_first=True, device=device)
        self.ln_1 = LayerNorm(width, device=device)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", skip_init(nn.Linear, width, width * 4, device=device)),
                    ("gelu", QuickGELU()),
                    ("c_proj", skip_init(nn.Linear, width * 4, width, device=device)),
                ]
            )
        )
        self.ln_2 = LayerNorm(width, device=device)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default inits of these layers, drawn from ``generator``."""
        for linear in (self.query_proj, self.mlp.c_fc, self.mlp.c_proj, self.attn.out_proj):
            bound = 1 / math.sqrt(linear.weight.shape[1])
            _fill_uniform(linear.weight, bound, generator)
            if linear is self.attn.out_proj:
                _fill(linear.bias, 0.0)
            else:
                _fill_uniform(linear.bias, bound, generator)
        fan_out, fan_in = self.attn.in_proj_weight.shape
        _fill_uniform(self.attn.in_proj_weight, math.sqrt(6 / (fan_in + fan_out)), generator)
        _fill(self.attn.in_proj_bias, 0.0)
        for norm in (self.ln_1, self.ln_2):
            _fill(norm.weight, 1.0)
            _fill(norm.bias, 0.0)

    def forward(self, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        query = self.ln_1(self.query_proj(source))
        key_value = self.ln_1(target)
        out = target + self.attn(query, key_value, key_value, need_weights=False)[0]
        return out + self.mlp(self.ln_2(out))


def _fill_uniform(param: torch.Tensor, bound: float, generator: torch.Generator) -> None:
    """U(-bound, bound) drawn on the CPU from ``generator``; meta tensors (shape-only models) are left alone."""
    if param.is_meta:
        return
    with torch.no_grad():
        param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=generator))


def _fill(param: torch.Tensor, value: float) -> None:
    if not param.is_meta:
        with torch.no_grad():
            param.fill_(value)


class CrossModalPromptAttention(nn.Module):
    """A CMPA block: ``visual`` updates the visual prompt states (queried by the text ones), ``text`` the text
    prompt states (queried by the visual ones)."""

    def __init__(self, visual_width: int, visual_heads: int, text_width: int, text_heads: int,
                 device: torch.device, generator: torch.Generator):
        super().__init__()
        self.visual = PromptUpdate(visual_width, text_width, visual_heads, device)
        self.text = PromptUpdate(text_width, visual_width, text_heads, device)
        self.visual.reset_parameters(generator)
        self.text.reset_parameters(generator)


#: Our submodule names → the reference's (``clip/model.py: PromptAttention``).
_REFERENCE_PARTS = {
    "visual": {"query_proj": "proj_t2v", "attn": "promt_attention_visual", "ln_1": "ln_pa_1_visual",
               "mlp": "mlp_pa_visual", "ln_2": "ln_pa_2_visual"},
    "text": {"query_proj": "proj_v2t", "attn": "promt_attention_text", "ln_1": "ln_pa_1_text",
             "mlp": "mlp_pa_text", "ln_2": "ln_pa_2_text"},
}


@register
class DCP(PromptMethod):
    name = "dcp"
    config_class = DCPConfig
    supports_resnet = False
    #: Paper mode: text features depend on the image; reference mode: image features depend on the batch.
    image_independent_text = False
    #: The text tower runs in lockstep with the image tower (cross-modal attention at every CMPA layer), so the
    #: text-memory policy cannot chunk it; ``text_chunk_size`` splits per-sample paper-mode batches instead.
    follows_text_memory = False
    reference_trainers = ("CMPA",)

    def __init__(self, backbone, config: DCPConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        device = self.device
        visual, text = backbone.visual, backbone.text
        n_blocks = min(len(visual.blocks), len(text.blocks))
        if n_blocks < 2:
            raise ConfigError(f"dcp needs towers of at least 2 blocks (CMPA runs before block 1), got {n_blocks}")
        if config.depth > n_blocks:
            raise ConfigError(
                f"dcp: depth={config.depth} but the towers have {n_blocks} blocks; CMPA runs before blocks "
                f"1..depth, so depth can be at most {n_blocks}"
            )
        #: 0-based indices of the blocks that CMPA runs before (the reference's counter: 1 .. depth).
        self.cmpa_layers = tuple(range(1, min(config.depth, n_blocks - 1) + 1))
        self.pooling = config.effective_pooling

        # One generator for every random init, in a fixed order: text context, visual prompts, CMPA blocks.
        generator = torch.Generator().manual_seed(config.init_seed)
        ctx, self.prefix_text = self._initial_context(config, generator)
        self.text_prompts = nn.Parameter(ctx.to(device))
        visual_ctx = torch.randn((config.n_ctx, visual.width), generator=generator) * config.init_std
        self.visual_prompts = nn.Parameter(visual_ctx.to(device))

        if config.shared:
            keys = ["shared"]
        elif config.mode == "reference":
            # The reference builds one block per layer, including those that never run it (block 0 and the
            # blocks after depth): same trainable tensors, hence the same parameter count.
            keys = [f"layer{i}" for i in range(n_blocks)]
        else:
            keys = [f"layer{i}" for i in self.cmpa_layers]
        dims = (visual.width, visual.transformer.heads, text.width, backbone.transformer.heads)
        self.cmpa = nn.ModuleDict(
            {key: CrossModalPromptAttention(*dims, device=device, generator=generator) for key in keys}
        )
        self.set_classnames(classnames, template)

    def _initial_context(self, config: DCPConfig, generator: torch.Generator) -> tuple[torch.Tensor, str]:
        words = config.ctx_init.strip().replace("_", " ")
        if words:
            vectors = init_words_embedding(self.clip, words)
            if vectors.shape[0] < config.n_ctx:
                raise ConfigError(
                    f"dcp: ctx_init {config.ctx_init!r} has {vectors.shape[0]} tokens, fewer than n_ctx="
                    f"{config.n_ctx} (the reference would then learn EOT/padding embeddings); use more words or a "
                    "smaller n_ctx"
                )
            return vectors[: config.n_ctx].float().cpu(), words
        ctx = torch.randn((config.n_ctx, self.clip.text.width), generator=generator) * config.init_std
        return ctx, placeholder_prefix(config.n_ctx)

    # -- description ---------------------------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.text_prompts.shape[0]

    @property
    def writes_text(self) -> bool:
        """Whether the text update is written back into the text tower (paper mode)."""
        return self.config.mode == "paper"

    @property
    def batch_independent(self) -> bool:
        return self.pooling == "per_sample"

    def describe(self) -> dict[str, Any]:
        """Which variant this is, to be stored with every number it produces."""
        variant = f"dcp/{self.config.mode}/{self.pooling}"
        return {
            "method": self.name,
            "variant": variant,
            "mode": self.config.mode,
            "pooling": self.pooling,
            "fusing": self.config.fusing,
            "shared": self.config.shared,
            "text_update": "written back" if self.writes_text else "discarded (as the released code)",
            "cmpa_layers": list(self.cmpa_layers),
            "batch_independent": self.batch_independent,
        }

    # -- class prompts -------------------------------------------------------------------------------------------

    def rebuild_class_buffers(self) -> None:
        prompts = build_class_prompts(self.clip, prompt_texts(self.prefix_text, self.classnames), self.classnames)
        self.register_buffer("token_prefix", prompts.embeddings[:, :1], persistent=False)
        self.register_buffer("token_suffix", prompts.embeddings[:, 1 + self.n_ctx :], persistent=False)
        self.register_buffer("eot", prompts.eot, persistent=False)

    def prompt_embeddings(self) -> torch.Tensor:
        """Text-tower input ``[C, L, W]`` (word embeddings, no positions; cut after the class set's last EOT)."""
        ctx = self.text_prompts.to(self.token_prefix.dtype).unsqueeze(0).expand(self.token_prefix.shape[0], -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(self, batch, recorder: Recorder | None = None) -> torch.Tensor:
        """Logits ``[B, C]``. ``recorder(key, tensor)``, when given, receives ``prompts_head``, per CMPA call
        ``cmpa_call<k>.visual_prompts`` and ``cmpa_call<k>.text_prompts`` (``.text_prompts_discarded`` in
        reference mode), each ``[1 or B, n_ctx, width]``, and ``image_features`` / ``text_features`` (before
        normalisation). With ``text_chunk_size`` it is called once per group of images."""
        images = batch["image"]
        chunk = self.config.text_chunk_size
        if chunk is None or images.shape[0] * self.num_classes <= chunk:
            return self._logits(images, recorder)
        per_pass = max(1, chunk // self.num_classes)
        return torch.cat([self._logits(part, recorder) for part in images.split(per_pass)])

    def _logits(self, images: torch.Tensor, recorder: Recorder | None) -> torch.Tensor:
        clip, n, num_classes = self.clip, self.n_ctx, self.num_classes
        batch_size = images.shape[0]
        embeds = self.prompt_embeddings()
        if recorder is not None:
            recorder("prompts_head", embeds)
        x_img = clip.visual.embed(images, self.visual_prompts)
        x_txt = clip.text.embed(token_embeds=embeds)
        calls = iter(range(len(self.cmpa_layers)))

        def couple(layer: int, x_img: torch.Tensor, x_txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if layer not in self.cmpa_layers:
                return x_img, x_txt
            call = next(calls)
            block = self.cmpa["shared" if self.config.shared else f"layer{layer}"]
            visual = x_img[:, -n:]  # [B, n, Wv]
            if self.pooling == "batch":
                visual = _fuse(visual, 0, self.config.fusing)  # [1, n, Wv]
            # Text states [C or B*C, n, Wt] -> [1 or B, C, n, Wt] -> pooled over the classes.
            text = x_txt[:, 1 : 1 + n]
            text = text.view(-1, num_classes, n, text.shape[-1])
            text = _fuse(text, 1, self.config.fusing).squeeze(1)  # [1 or B, n, Wt]
            text = text.expand(visual.shape[0], -1, -1)
            new_visual = block.visual(visual, text)
            x_img = replace_positions(x_img, x_img.shape[1] - n, new_visual.expand(batch_size, -1, -1))
            if recorder is not None:
                recorder(f"cmpa_call{call}.visual_prompts", new_visual)
            if self.writes_text or recorder is not None:
                new_text = block.text(text, visual)  # [1 or B, n, Wt]
                if self.writes_text:
                    x_txt = self._write_text(x_txt, new_text, batch_size)
                if recorder is not None:
                    suffix = "text_prompts" if self.writes_text else "text_prompts_discarded"
                    recorder(f"cmpa_call{call}.{suffix}", new_text)
            return x_img, x_txt

        x_img, x_txt = clip.forward_lockstep(x_img, x_txt, couple)
        image_features = clip.visual.pool(x_img)
        if x_txt.shape[0] == num_classes:
            text_features = clip.text.pool(x_txt, self.eot)  # [C, D]
        else:
            text_features = clip.text.pool(x_txt, self.eot.repeat(batch_size)).view(batch_size, num_classes, -1)
        if recorder is not None:
            recorder("image_features", image_features)
            recorder("text_features", text_features)
        return cosine_logits(clip, image_features, text_features)

    def _write_text(self, x_txt: torch.Tensor, new_text: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Put the new text prompt states at positions ``1 .. n`` of every class sequence: one set for all
        (``new_text`` ``[1, n, W]``) or one per image (``[B, n, W]``, the text tower then holds ``B * C``
        sequences, image-major)."""
        num_classes = self.num_classes
        if new_text.shape[0] == 1:
            return replace_positions(x_txt, 1, new_text.expand(x_txt.shape[0], -1, -1))
        if x_txt.shape[0] == num_classes:  # first exchange: the class sequences become per-image sequences
            x_txt = x_txt.unsqueeze(0).expand(batch_size, -1, -1, -1).reshape(batch_size * num_classes,
                                                                              *x_txt.shape[1:])
        per_sequence = new_text.unsqueeze(1).expand(-1, num_classes, -1, -1).reshape(-1, *new_text.shape[1:])
        return replace_positions(x_txt, 1, per_sequence)

    # -- reference implementation --------------------------------------------------------------------------------

    @classmethod
    def config_from_reference(cls, trainer) -> DCPConfig:
        opts = reference_options(trainer, {"N_CTX", "CTX_INIT", "PROMPT_DEPTH", "FUSING", "PS"}, cls.name)
        n_ctx = opts.get("N_CTX", 2)
        ctx_init = opts.get("CTX_INIT", "") or ""
        return DCPConfig(
            n_ctx=n_ctx,
            # The reference uses the init words only for n_ctx <= 4 and otherwise ignores them.
            ctx_init=ctx_init if n_ctx <= MAX_CTX_FOR_INIT_WORDS else "",
            depth=opts.get("PROMPT_DEPTH", 9),
            fusing=opts.get("FUSING", "mean"),
            shared=bool(opts.get("PS", True)),
            mode="reference",
        )

    def reference_name_map(self) -> dict[str, str]:
        mapping = {"prompt_learner.prompts_text": "text_prompts", "prompt_learner.prompts_visual": "visual_prompts"}
        for key, block in self.cmpa.items():
            layer = 0 if key == "shared" else int(key.removeprefix("layer"))
            for name, _ in block.named_parameters():
                half, part, rest = name.split(".", 2)
                reference = f"encoder.resblocks.{layer}.prompt_attn.{_REFERENCE_PARTS[half][part]}.{rest}"
                mapping[reference] = f"cmpa.{key}.{name}"
        return mapping
