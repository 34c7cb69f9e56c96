"""MuGCP (Yang et al., arXiv 2507.08410, 2025): MLLM-guided conditional prompts -- an INFERRED design.

No public code exists and only the abstract was available (SPEC 3.8). The paper STATES three parts: Semantic
Conditional Prompts (SCP) from MLLM captions of each image; an Attention Mutual-Guidance (AMG) module in which visual
and semantic information guide each other across layers and produce Visual Conditional Prompts (VCP); and
Multi-Prompt Fusion (MPF) of SCP and VCP with contextual prompts. EVERYTHING BELOW IS INFERRED (SPEC 3.8.3) and
every choice is a config switch, so it can be corrected when the paper's method section is known
(``mode: inferred`` names this design in configs and reports; docs/mugcp.md has the stated-vs-inferred table):

- SCP [INFERRED]: the image's caption (``batch["caption"]``, from ``promptclip captions build``) goes through the
  FROZEN CLIP text tower (CLIP BPE, truncated to the context, EOT kept); ``scp_source: eot`` maps the L2-normalised
  EOT feature with one Linear(D -> n_scp * text width) to ``n_scp`` tokens in the word-embedding space;
  ``scp_source: tokens`` lets ``n_scp`` learned queries attend over the caption's token states instead.
- AMG [INFERRED]: before vision blocks ``0 .. depth-1``, learned queries ``q_i`` (``n_vcp`` x vision width) attend
  over the layer's CLS + patch tokens and the SCP (projected to the vision width), both layer-normalised:
  ``VCP_i = q_i + CrossAttn(q_i, [tokens_i ; W SCP])``. ``VCP_0`` is appended after the patch tokens (through
  ``ln_pre``, like every deep visual prompt here); ``VCP_i`` replaces the previous prompt tokens before block i.
  With ``amg_mutual`` the SCP is refined by the same layer's visual tokens, ``SCP <- SCP + CrossAttn(SCP,
  tokens_i)``, so the two modalities guide each other layer by layer; the refined SCP enters the text prompts.
  Everything is per image (attention within one image's tokens), never pooled over the batch. The output
  projections of both attentions start at zero: at initialisation VCP are static learned prompts and SCP the
  caption projection. ``amg_shared``: one attention module for all layers (per-layer queries).
- MPF [INFERRED]: ``fusion: concat`` (default) builds ``[SOS][ctx][SCP(x)][class][.][EOS]`` for every image and
  class; ``add``: ``[SOS][ctx + g SCP(x)][class]..`` (CoCoOp-like gated sum, ``n_scp == n_ctx``); ``deep``: the
  concat prompt plus deep text prompts before text blocks ``1 .. depth-1``, ``ctx_i + Linear(mean of the image's
  VCP_i tokens)``; ``late``: cheap mode, context-only text prompts (cached, C text passes) and the caption feature
  fused into the image feature, ``f = f_img/|f_img| + w * P(f_cap)/|P(f_cap)|``.
- Loss [INFERRED]: cross-entropy, plus optional PromptSRC-style consistency to frozen CLIP (L1 on normalised text and
  image features, KL on logits), all weights 0 by default.

Ablation switches (each changes the computation; tests/test_method_mugcp.py): ``use_scp: false`` ignores captions
(no SCP anywhere); ``use_amg: false`` leaves the image tower unprompted (no VCP, no refinement); ``use_mpf: false``
uses context-only text prompts ``[SOS][ctx][class][.][EOS]`` (no fusion of SCP / VCP into the text side).

Cost: with instance-conditioned text (concat / add / deep) every image has its own C prompts: the B x C sequences
go through the text tower in one batched pass, cut after the last EOT, chunked and checkpointed by the engine's
text-memory policy (``promptclip.memory``; ``text_chunk_size`` fixes the sequences per chunk; deep fusion chunks by
whole images). Missing captions raise a :class:`DataError` naming the image, or with
``missing_caption: fallback`` use ``fallback_caption`` and are counted (``caption_stats``, the training log's
``missing_captions``, warnings).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..clip.model import eot_positions, truncate_after_eot
from ..clip.tokenizer import get_tokenizer
from ..config import from_dict
from ..errors import ConfigError, DataError
from ..memory import plan_text_pass, run_in_chunks
from .base import PromptMethod, cosine_logits, register
from .deep import text_context
from .prompts import (
    build_class_prompts,
    check_prompts_fit,
    encode_text_embeddings,
    placeholder_prefix,
    prompt_texts,
    replace_positions,
    template_features,
)

FUSIONS = ("concat", "add", "deep", "late")


@dataclass
class MuGCPConfig:
    """Every default is INFERRED (SPEC 3.8.3): the paper's hyper-parameters were not available."""

    #: Design version: "inferred" = the SPEC 3.8.3 hypothesis (shown in reports as "mugcp (inferred)").
    mode: Literal["inferred"] = "inferred"
    #: Learnable context tokens, initialised from ``ctx_init`` (first n_ctx tokens; n_ctx <= 4) else N(0, init_std).
    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    #: SCP tokens per image (n_s).
    n_scp: int = 4
    #: VCP tokens per image and layer (n_v).
    n_vcp: int = 4
    #: AMG layers J: VCP before vision blocks 0 .. depth-1 (and deep text prompts for fusion "deep").
    depth: int = 9
    #: Ablation switches: each removes one of the paper's three parts.
    use_scp: bool = True
    use_amg: bool = True
    use_mpf: bool = True
    #: SCP from the caption's EOT feature (Linear) or from its token states (learned queries, cross-attention).
    scp_source: Literal["eot", "tokens"] = "eot"
    #: AMG in both directions (SCP refined by visual tokens at every AMG layer); false: semantic -> visual only.
    amg_mutual: bool = True
    #: One AMG attention module for all layers (per-layer queries); false: one per layer.
    amg_shared: bool = True
    #: How MPF puts SCP / VCP into the text prompts (see the module docstring).
    fusion: Literal["concat", "add", "deep", "late"] = "concat"
    #: PromptSRC-style consistency to frozen CLIP (0 = off): L1 text, L1 image, KL logits.
    text_consistency_weight: float = 0.0
    image_consistency_weight: float = 0.0
    logits_consistency_weight: float = 0.0
    #: Text teacher: PromptSRC's 60 templates, or the dataset's own template.
    consistency_templates: Literal["promptsrc", "dataset"] = "promptsrc"
    #: An image without a caption: "error" (naming the image) or "fallback" (``fallback_caption``, counted).
    missing_caption: Literal["error", "fallback"] = "error"
    fallback_caption: str = ""
    init_std: float = 0.02
    #: Seed of every random init (explicit generator; the global RNG is never used).
    init_seed: int = 0
    #: Text sequences per text-tower pass; None: the engine's text-memory policy (promptclip.memory) decides.
    text_chunk_size: int | None = None


def _linear(generator: torch.Generator, in_features: int, out_features: int, zero: bool = False) -> nn.Linear:
    """A Linear with ``nn.Linear``'s default distribution drawn from ``generator`` (or zeros), no global RNG."""
    layer = nn.utils.skip_init(nn.Linear, in_features, out_features)
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        for param in (layer.weight, layer.bias):
            if zero:
                param.zero_()
            else:
                param.copy_(torch.rand(param.shape, generator=generator) * 2 * bound - bound)
    return layer


class CrossAttention(nn.Module):
    """Multi-head attention from ``query`` tokens to ``context`` tokens, per sample (batch rows never mix)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, generator: torch.Generator,
                 zero_output: bool = False):
        super().__init__()
        if query_dim % heads:
            raise ConfigError(f"mugcp: attention width {query_dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = _linear(generator, query_dim, query_dim)
        self.k = _linear(generator, context_dim, query_dim)
        self.v = _linear(generator, context_dim, query_dim)
        self.out = _linear(generator, query_dim, query_dim, zero=zero_output)

    def forward(self, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, n, width = query.shape
        length = context.shape[1]

        def split(t: torch.Tensor, tokens: int) -> torch.Tensor:
            return t.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

        q = split(self.q(query), n)
        k, v = split(self.k(context), length), split(self.v(context), length)
        attn_mask = mask[:, None, None, :] if mask is not None else None
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask)
        return self.out(out.transpose(1, 2).reshape(batch, n, width))


@functools.lru_cache(maxsize=65536)
def _caption_ids(caption: str, context_length: int) -> tuple[int, ...]:
    """CLIP BPE ids ``[SOT] ids [EOT]`` of a caption, cut to the context with EOT kept last."""
    tokenizer = get_tokenizer()
    ids = [tokenizer.sot_id, *tokenizer.encode(caption), tokenizer.eot_id]
    if len(ids) > context_length:
        ids = [*ids[: context_length - 1], tokenizer.eot_id]
    return tuple(ids)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:])


@register
class MuGCP(PromptMethod):
    name = "mugcp"
    config_class = MuGCPConfig
    supports_resnet = False
    image_independent_text = False

    def __init__(self, backbone, config: MuGCPConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        clip = self.clip
        self._check_config(config)
        text_width, vision_width, embed_dim = clip.text.width, clip.visual.width, clip.visual.output_dim
        text_heads, vision_heads = clip.transformer.heads, clip.visual.transformer.heads
        generator = torch.Generator().manual_seed(config.init_seed)
        std = config.init_std

        ctx, self.prefix_text = text_context(clip, config.n_ctx, config.ctx_init, std, generator)
        self.ctx = nn.Parameter(ctx)
        if self.needs_scp_tokens:
            if config.scp_source == "eot":
                self.scp_proj = _linear(generator, embed_dim, config.n_scp * text_width)
            else:
                self.scp_queries = nn.Parameter(torch.randn((config.n_scp, text_width), generator=generator) * std)
                self.scp_attn = CrossAttention(text_width, text_width, text_heads, generator)
        if config.use_amg:
            modules = 1 if config.amg_shared else config.depth
            self.vcp_queries = nn.Parameter(
                torch.randn((config.depth, config.n_vcp, vision_width), generator=generator) * std)
            self.vcp_attn = nn.ModuleList(
                CrossAttention(vision_width, vision_width, vision_heads, generator, zero_output=True)
                for _ in range(modules))
            if config.use_scp:
                self.scp_to_visual = _linear(generator, text_width, vision_width)
                if config.amg_mutual:
                    self.scp_refine = nn.ModuleList(
                        CrossAttention(text_width, vision_width, text_heads, generator, zero_output=True)
                        for _ in range(modules))
        if config.use_mpf:
            if config.fusion == "add" and config.use_scp:
                self.scp_gate = nn.Parameter(torch.tensor(1.0))
            if config.fusion == "deep" and config.depth > 1:
                self.deep_ctx = nn.Parameter(
                    torch.randn((config.depth - 1, config.n_ctx, text_width), generator=generator) * std)
                if config.use_amg:
                    self.vcp_to_text = _linear(generator, vision_width, text_width)
            if config.fusion == "late" and config.use_scp:
                self.late_proj = _linear(generator, embed_dim, embed_dim)
                self.late_weight = nn.Parameter(torch.tensor(0.5))
        self.caption_stats = {"images": 0, "missing": 0}
        self._epoch_missing = 0
        self._warned_missing = False
        self._train_outputs: dict[str, torch.Tensor] | None = None
        self._batch_missing = 0
        self.set_classnames(classnames, template)

    def _check_config(self, config: MuGCPConfig) -> None:
        clip = self.clip
        for key in ("n_ctx", "n_scp", "n_vcp", "depth"):
            if getattr(config, key) < 1:
                raise ConfigError(f"mugcp: {key} must be at least 1, got {getattr(config, key)}")
        layers = len(clip.visual.blocks)
        if config.use_mpf and config.fusion == "deep":
            layers = min(layers, len(clip.text.blocks))
        if config.depth > layers:
            raise ConfigError(f"mugcp: depth {config.depth} exceeds the towers' {layers} layers")
        if config.use_mpf and config.use_scp and config.fusion == "add" and config.n_scp != config.n_ctx:
            raise ConfigError(f"mugcp: fusion 'add' adds SCP to the context token by token and needs n_scp == n_ctx "
                              f"(got n_scp={config.n_scp}, n_ctx={config.n_ctx}); use fusion 'concat' otherwise")
        if config.use_scp and not (config.use_amg or config.use_mpf):
            raise ConfigError("mugcp: use_scp has no effect with use_amg and use_mpf both false (the captions would "
                              "reach neither tower); set use_scp: false for that ablation")
        if config.text_chunk_size is not None and config.text_chunk_size < 1:
            raise ConfigError(f"mugcp: text_chunk_size must be at least 1 (or null), got {config.text_chunk_size}")
        weights = (config.text_consistency_weight, config.image_consistency_weight, config.logits_consistency_weight)
        if any(w < 0 for w in weights):
            raise ConfigError("mugcp: consistency weights must be >= 0")

    @classmethod
    def caption_requirement(cls, config: Mapping[str, Any] | MuGCPConfig | None) -> str | None:
        """"required" (captions for every image), "optional" (a fallback is configured) or None (unused)."""
        if not isinstance(config, MuGCPConfig):
            config = from_dict(MuGCPConfig, config or {}, where="mugcp")
        if not config.use_scp:
            return None
        return "required" if config.missing_caption == "error" else "optional"

    # -- layout ----------------------------------------------------------------------------------------------------

    @property
    def needs_scp_tokens(self) -> bool:
        """SCP tokens are used: by AMG, or by MPF's text prompts (not by late fusion, which uses the caption
        feature)."""
        c = self.config
        return c.use_scp and (c.use_amg or (c.use_mpf and c.fusion != "late"))

    @property
    def scp_in_prompt(self) -> bool:
        """SCP tokens occupy their own positions of the text prompt (fusion concat / deep)."""
        c = self.config
        return c.use_scp and c.use_mpf and c.fusion in ("concat", "deep")

    @property
    def instance_text(self) -> bool:
        """Each image has its own C text prompts (B x C text sequences)."""
        c = self.config
        if not c.use_mpf:
            return False
        if c.fusion in ("concat", "add"):
            return c.use_scp
        if c.fusion == "deep":
            return c.use_scp or c.use_amg
        return False

    @property
    def deep_text(self) -> bool:
        return self.config.use_mpf and self.config.fusion == "deep" and self.config.depth > 1

    def rebuild_class_buffers(self) -> None:
        prefix = self.prefix_text
        if self.scp_in_prompt:
            prefix = f"{prefix} {placeholder_prefix(self.config.n_scp)}"
        prompts = build_class_prompts(self.clip, prompt_texts(prefix, self.classnames), self.classnames)
        self.scp_start = 1 + len(get_tokenizer().encode(self.prefix_text))
        self.register_buffer("prompt_embeds", prompts.embeddings, persistent=False)
        self.register_buffer("eot", prompts.eot, persistent=False)
        if self.config.text_consistency_weight or self.config.logits_consistency_weight:
            check_prompts_fit(self.clip, self.teacher_templates(), self.classnames)  # the teacher is encoded lazily
        self.register_buffer("teacher_text", None, persistent=False)

    # -- captions -> SCP -------------------------------------------------------------------------------------------

    def captions_of(self, batch: Mapping[str, Any], size: int) -> list[str]:
        """One caption per image, with the missing-caption policy applied."""
        captions = batch.get("caption")
        config = self.config
        if captions is None:
            captions = [None] * size
        elif isinstance(captions, str) or len(captions) != size:
            raise DataError(f"mugcp: batch['caption'] must hold one caption per image ({size}), got "
                            f"{type(captions).__name__} of length {len(captions)}")
        out, missing = [], 0
        for i, caption in enumerate(captions):
            if isinstance(caption, str):
                out.append(caption)
                continue
            name = self._image_name(batch, i)
            if config.missing_caption == "error":
                raise DataError(
                    f"mugcp: no caption for image {name}: its semantic prompts come from its caption (INFERRED "
                    "MuGCP design). Build captions with `promptclip captions build` and pass --captions FILE "
                    "(or put them in batch['caption']), or set method_config.missing_caption=fallback to use "
                    f"fallback_caption={config.fallback_caption!r} (counted and reported)"
                )
            missing += 1
            if not self._warned_missing:
                warnings.warn(f"mugcp: image {name} has no caption; using the fallback caption "
                              f"{config.fallback_caption!r}. Missing captions are counted (method.caption_stats, "
                              "'missing_captions' in the training log)", stacklevel=3)
                self._warned_missing = True
            out.append(config.fallback_caption)
        self.caption_stats["images"] += size
        self.caption_stats["missing"] += missing
        if self.training:
            self._epoch_missing += missing
        self._batch_missing = missing
        return out

    @staticmethod
    def _image_name(batch: Mapping[str, Any], i: int) -> str:
        paths = batch.get("path")
        if paths is not None and i < len(paths):
            return str(paths[i])
        index = batch.get("index")
        if index is not None:
            return f"#{int(index[i])} of the dataset"
        return f"#{i} of the batch"

    @torch.no_grad()
    def caption_features(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frozen CLIP text features of the captions: EOT feature ``[B, D]``, final token states ``[B, L, W]``
        (after ln_final) and their validity mask ``[B, L]`` (positions up to EOT)."""
        context = self.clip.text.context_length
        rows = [_caption_ids(c, context) for c in captions]
        tokens = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        tokens = tokens.to(self.device)
        eot = eot_positions(tokens)
        tokens = truncate_after_eot(tokens, eot)
        text = self.clip.text
        x = text.forward_blocks(text.embed(tokens))
        feature = text.pool(x, eot)
        states = self.clip.ln_final(x)
        mask = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) <= eot.unsqueeze(1)
        return feature, states, mask

    def semantic_prompts(self, captions: Sequence[str]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """SCP tokens ``[B, n_scp, text width]`` (None when nothing uses them) and the normalised caption feature
        ``[B, D]``."""
        feature, states, mask = self.caption_features(captions)
        feature = feature.float()
        feature = feature / feature.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        n, width = self.config.n_scp, self.clip.text.width
        if not self.needs_scp_tokens:
            return None, feature
        if self.config.scp_source == "eot":
            scp = self.scp_proj(feature).view(-1, n, width)
        else:
            queries = self.scp_queries.unsqueeze(0).expand(feature.shape[0], -1, -1)
            scp = self.scp_attn(queries, _layer_norm(states), mask)
        return scp, feature

    # -- image tower with AMG --------------------------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor, scp: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
        """Image features ``[B, D]``, the (refined) SCP and the per-layer VCP ``[B, n_vcp, vision width]``."""
        config = self.config
        visual = self.clip.visual
        if not config.use_amg:
            return visual(images), scp, None
        x = visual.embed(images)
        batch, n_tokens, n_vcp = x.shape[0], visual.num_tokens, config.n_vcp
        state = {"scp": scp}
        vcps: list[torch.Tensor] = []

        def hook(layer: int, x: torch.Tensor) -> torch.Tensor:
            if layer >= config.depth:
                return x
            module = 0 if config.amg_shared else layer
            tokens = _layer_norm(x[:, :n_tokens])
            semantic = state["scp"]
            context = tokens
            if semantic is not None:
                context = torch.cat([tokens, _layer_norm(self.scp_to_visual(semantic))], dim=1)
            queries = self.vcp_queries[layer].unsqueeze(0).expand(batch, -1, -1)
            vcp = queries + self.vcp_attn[module](queries, context)
            if semantic is not None and config.amg_mutual:
                state["scp"] = semantic + self.scp_refine[module](_layer_norm(semantic), tokens)
            vcps.append(vcp)
            if layer == 0:
                return torch.cat([x, visual.ln_pre(vcp.to(x.dtype))], dim=1)
            return replace_positions(x, x.shape[1] - n_vcp, vcp)

        x = visual.forward_blocks(x, hook)
        return visual.pool(x), state["scp"], vcps

    # -- text side (MPF) -------------------------------------------------------------------------------------------

    def _text_hook(self, vcps: list[torch.Tensor] | None, num_classes: int):
        """Deep text prompts before text blocks 1 .. depth-1: ``ctx_i`` (+ the image's pooled VCP_i)."""
        if not self.deep_text:
            return None
        depth = self.config.depth

        def hook(layer: int, x: torch.Tensor) -> torch.Tensor:
            if not 1 <= layer < depth:
                return x
            values = self.deep_ctx[layer - 1]
            if vcps is not None:
                pooled = self.vcp_to_text(vcps[layer].mean(dim=1))  # one image's own VCP tokens, [b, W]
                values = (values.unsqueeze(0) + pooled.unsqueeze(1)).repeat_interleave(num_classes, dim=0)
            return replace_positions(x, 1, values)

        return hook

    def _assemble(self, ctx: torch.Tensor, scp: torch.Tensor | None) -> torch.Tensor:
        """Prompt embeddings ``[b * C, L, W]`` (image-major) for per-image contexts ``ctx`` ``[b, n_ctx, W]`` and
        SCP ``[b, n_scp, W]`` (placed at their own positions when the layout has them)."""
        base = self.prompt_embeds
        b, num_classes, n_ctx = ctx.shape[0], base.shape[0], self.config.n_ctx

        def shared(t: torch.Tensor) -> torch.Tensor:
            return t.unsqueeze(0).expand(b, -1, -1, -1)

        def per_image(t: torch.Tensor) -> torch.Tensor:
            return t.to(base.dtype).unsqueeze(1).expand(-1, num_classes, -1, -1)

        parts = [shared(base[:, :1]), per_image(ctx)]
        if scp is not None and self.scp_in_prompt:
            start, end = self.scp_start, self.scp_start + self.config.n_scp
            parts += [shared(base[:, 1 + n_ctx : start]), per_image(scp), shared(base[:, end:])]
        else:
            parts.append(shared(base[:, 1 + n_ctx :]))
        return torch.cat(parts, dim=2).flatten(0, 1)

    def encode_classes(self) -> torch.Tensor:
        """Image-independent text features ``[C, D]`` (use_mpf false, fusion late, or nothing to condition on)."""
        embeds = replace_positions(self.prompt_embeds, 1, self.ctx)
        return encode_text_embeddings(self.clip, embeds, self.eot, hook=self._text_hook(None, len(self.classnames)),
                                      chunk_size=self.config.text_chunk_size)

    def instance_text_features(self, scp: torch.Tensor | None, vcps: list[torch.Tensor] | None,
                               batch: int) -> torch.Tensor:
        """Text features ``[B, C, D]``: every image's C prompts in one batched pass of B x C sequences."""
        config = self.config
        num_classes = self.prompt_embeds.shape[0]
        ctx = self.ctx.unsqueeze(0).expand(batch, -1, -1)
        if scp is not None and config.fusion == "add":
            ctx = ctx + self.scp_gate * scp
        if not (self.deep_text and config.use_amg and vcps is not None):
            # Rows are independent sequences: the shared encoder may chunk them freely (EOT truncation per chunk).
            embeds = self._assemble(ctx, scp)
            feats = encode_text_embeddings(self.clip, embeds, self.eot.repeat(batch),
                                           hook=self._text_hook(None, num_classes),
                                           chunk_size=config.text_chunk_size)
            return feats.view(batch, num_classes, -1)
        # Deep prompts carry per-image values: chunks hold whole images so that the hook's rows line up. The
        # engine's text-memory policy decides the chunk size and checkpointing, as in encode_text_embeddings.
        plan = plan_text_pass(batch * num_classes, int(self.eot.max()) + 1, config.text_chunk_size)
        per_chunk = batch if plan.chunk is None else max(1, plan.chunk // num_classes)
        text = self.clip.text

        def run(start: int, stop: int) -> torch.Tensor:
            embeds = self._assemble(ctx[start:stop], scp[start:stop] if scp is not None else None)
            eot = self.eot.repeat(stop - start)
            hook = self._text_hook([v[start:stop] for v in vcps], num_classes)
            x = text.embed(token_embeds=truncate_after_eot(embeds, eot))
            return text.pool(text.forward_blocks(x, hook), eot)

        return run_in_chunks(run, batch, per_chunk, plan.checkpoint).view(batch, num_classes, -1)

    # -- forward and loss ------------------------------------------------------------------------------------------

    def forward(self, batch) -> torch.Tensor:
        config = self.config
        images = batch["image"]
        size = images.shape[0]
        scp = caption_feature = None
        self._batch_missing = 0
        if config.use_scp:
            scp, caption_feature = self.semantic_prompts(self.captions_of(batch, size))
        image, scp, vcps = self.encode_image(images, scp)
        if self.instance_text:
            text = self.instance_text_features(scp, vcps, size)
        else:
            text = self.class_features()
        if config.use_mpf and config.fusion == "late" and caption_feature is not None:
            image = image / image.norm(dim=-1, keepdim=True)
            late = self.late_proj(caption_feature)
            image = image + self.late_weight * late / late.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        logits = cosine_logits(self.clip, image, text)
        wants_teacher = (config.text_consistency_weight or config.image_consistency_weight
                         or config.logits_consistency_weight)
        self._train_outputs = {"image": image, "text": text} if self.training and wants_teacher else None
        return logits

    def teacher_templates(self) -> list[str]:
        if self.config.consistency_templates == "promptsrc":
            from ..data.templates import PROMPTSRC_TEMPLATES

            return list(PROMPTSRC_TEMPLATES)
        return [self.template or "a photo of a {}."]

    def teacher_text_features(self) -> torch.Tensor:
        """Frozen CLIP class features ``[C, D]`` (normalised) for the text consistency term."""
        if self.teacher_text is None:
            with torch.no_grad():
                self.teacher_text = template_features(self.clip, self.teacher_templates(), self.classnames,
                                                      normalize_each=False).float()
        return self.teacher_text / self.teacher_text.norm(dim=-1, keepdim=True)

    def loss(self, batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        config = self.config
        labels = batch["label"].to(logits.device)
        loss_ce = F.cross_entropy(logits, labels)
        terms = {"loss_ce": loss_ce}
        outputs, self._train_outputs = self._train_outputs, None
        if outputs is not None:
            image = outputs["image"] / outputs["image"].norm(dim=-1, keepdim=True)
            text = outputs["text"] / outputs["text"].norm(dim=-1, keepdim=True)
            if config.text_consistency_weight:
                teacher = self.teacher_text_features().to(text.dtype)
                terms["loss_text"] = F.l1_loss(text, teacher.expand_as(text)) * config.text_consistency_weight
            if config.image_consistency_weight or config.logits_consistency_weight:
                with torch.no_grad():
                    frozen = self.clip.encode_image(batch["image"]).float()
                    frozen = frozen / frozen.norm(dim=-1, keepdim=True)
                if config.image_consistency_weight:
                    terms["loss_image"] = F.l1_loss(image, frozen.to(image.dtype)) * config.image_consistency_weight
                if config.logits_consistency_weight:
                    zs = self.clip.logit_scale.exp() * frozen @ self.teacher_text_features().t().to(frozen.dtype)
                    kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(zs.to(logits.dtype), dim=1),
                                  reduction="sum", log_target=True) / logits.numel()
                    terms["loss_logits"] = kl * config.logits_consistency_weight
        elif self.training and (config.text_consistency_weight or config.image_consistency_weight
                                or config.logits_consistency_weight):
            raise RuntimeError("mugcp: loss() needs the training forward of the same batch (consistency terms)")
        total = sum(terms.values())
        result = {"loss": total, **{k: v.detach() for k, v in terms.items()}}
        if config.use_scp:
            result["missing_captions"] = torch.tensor(float(self._batch_missing))
        return result

    # -- reporting -------------------------------------------------------------------------------------------------

    def on_epoch_end(self, epoch: int, max_epoch: int) -> None:
        if self._epoch_missing:
            warnings.warn(f"mugcp: {self._epoch_missing} images of epoch {epoch + 1} had no caption and used the "
                          f"fallback caption ({self.caption_stats['missing']} of {self.caption_stats['images']} "
                          "so far)", stacklevel=2)
        self._epoch_missing = 0

    def describe(self) -> dict[str, Any]:
        """What produced a number: the design version, switches and costs."""
        c = self.config
        return {"mode": c.mode, "use_scp": c.use_scp, "use_amg": c.use_amg, "use_mpf": c.use_mpf,
                "fusion": c.fusion if c.use_mpf else None, "instance_text": self.instance_text,
                "text_sequences_per_image": len(self.classnames) if self.instance_text else 0,
                "caption_stats": dict(self.caption_stats)}
