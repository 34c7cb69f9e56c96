"""MMRL, Multi-Modal Representation Learning (Guo & Gu, CVPR 2025; yunncheng/MMRL ``trainers/mmrl.py`` with
``clip/model_mmrl.py``).

Learned (everything else frozen):

- ``rep_tokens`` ``[N, rep_dim]``: representation tokens in a space of their own (neither tower's);
- per representation layer ``k`` a Linear ``rep_dim -> text width`` (``r2t.k``) and one ``rep_dim -> vision width``
  (``r2v.k``), giving that layer's tokens ``t_k = r2t_k(R)``, ``v_k = r2v_k(R)``, shared by every class and image.
  As in the reference, all layers start as copies of one initial Linear;
- ``proj_rep`` ``[vision width, embed dim]``: a second visual output projection for the representation feature.

The class prompts are the dataset's fixed template (no learned context). ``rep_layers`` holds 1-based block numbers.
Before the first of them both towers get the tokens inserted right after position 0 (SOS / CLS), the sequences grow
by ``N``; before each later one positions ``1..N`` are replaced by that layer's tokens; blocks in between carry them
forward. The text tower stays causal at the longer length (the tokens see SOS and each other, every text token sees
all of them) and pools at ``EOT + N``. The image tower gives the class feature ``ln_post(x[:, 0]) @ proj`` and the
representation feature ``mean_n ln_post(x[:, 1..N]) @ proj_rep``.

Logits use a hard-coded scale of 100 (CLIP's ``logit_scale`` is unused): ``logits`` (class token),
``logits_rep`` (representation feature) and ``fusion = alpha * logits + (1 - alpha) * logits_rep``.

Loss (``MMRL_Loss``)::

    alpha * CE(logits) + (1 - alpha) * CE(logits_rep)
      + reg_weight * (1 - mean_i cos(img_i, img_clip_i)) + reg_weight * (1 - mean_c cos(txt_c, txt_clip_c))

with the frozen zero-shot image features of the batch and the frozen template text features of the classes.

Evaluation has two rules (the reference's ``test()``): on the classes it was trained on (base-to-novel base,
few-shot, the cross-dataset source) the fused logits; on novel classes and transfer targets the class-token logits
alone. The method reads the rule from :attr:`eval_context` (set by protocols and ``eval``/``predict``).

``MMRL++`` (:mod:`.mmrlpp`) subclasses this class: it changes the projections (:meth:`layer_tokens`), the token
update at later layers (:meth:`merge_tokens`) and the representation projection (:meth:`rep_projection`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..clip.model import Hook
from ..data.templates import DEFAULT_TEMPLATE
from ..errors import ConfigError
from .base import PromptMethod, reference_options, register
from .deep import linear_init
from .prompts import build_class_prompts, encode_text_embeddings, encode_texts

#: The reference multiplies cosine similarities by 100, not by CLIP's learned ``logit_scale.exp()``.
LOGIT_SCALE = 100.0


def _official_layers() -> list[int]:
    return [6, 7, 8, 9, 10, 11, 12]


@dataclass
class MMRLConfig:
    #: Representation tokens N (N_REP_TOKENS).
    n_rep_tokens: int = 5
    #: Width of the representation space (REP_DIM; the reference uses 2048 for EuroSAT).
    rep_dim: int = 512
    #: 1-based block numbers before which the tokens enter (REP_LAYERS), strictly increasing.
    rep_layers: list[int] = field(default_factory=_official_layers)
    #: Weight of the class-token logits in the fused logits and the loss (ALPHA).
    alpha: float = 0.7
    #: Weight of each of the two cosine regularisers (REG_WEIGHT; per dataset in the reference, see the presets).
    reg_weight: float = 1.0
    init_std: float = 0.02
    #: Seed of the random init (explicit; independent of any global RNG).
    init_seed: int = 0
    #: Classes per text-encoder chunk (None: the engine's automatic chunking, promptclip.memory).
    text_chunk_size: int | None = None


def check_rep_config(config, layers: int, what: str) -> None:
    if config.n_rep_tokens < 1:
        raise ConfigError(f"{what}: n_rep_tokens must be at least 1, got {config.n_rep_tokens}")
    if config.rep_dim < 1:
        raise ConfigError(f"{what}: rep_dim must be at least 1, got {config.rep_dim}")
    rep_layers = list(config.rep_layers)
    if not rep_layers:
        raise ConfigError(f"{what}: rep_layers is empty; give the 1-based blocks the tokens enter, e.g. [6, ..., 12]")
    increasing = all(a < b for a, b in zip(rep_layers, rep_layers[1:], strict=False))
    if not increasing or rep_layers[0] < 1 or rep_layers[-1] > layers:
        raise ConfigError(f"{what}: rep_layers must be strictly increasing 1-based block numbers within 1..{layers} "
                          f"(the towers' blocks), got {rep_layers}")
    if not 0.0 <= config.alpha <= 1.0:
        raise ConfigError(f"{what}: alpha must lie in [0, 1], got {config.alpha}")


@register
class MMRL(PromptMethod):
    name = "mmrl"
    config_class = MMRLConfig
    reference_trainers = ("MMRL",)
    supports_resnet = False
    image_independent_text = True

    def __init__(self, backbone, config: MMRLConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        clip = self.clip
        layers = min(len(clip.text.blocks), len(clip.visual.blocks))
        check_rep_config(config, layers, self.name)
        self.rep_layers = [int(b) for b in config.rep_layers]
        generator = torch.Generator().manual_seed(config.init_seed)
        self.rep_tokens = nn.Parameter(torch.randn((config.n_rep_tokens, config.rep_dim), generator=generator)
                                       * config.init_std)
        self.build_projections(generator)
        self._train_outputs: dict[str, torch.Tensor] | None = None
        self.set_classnames(classnames, template)

    # -- learned tensors (MMRL++ overrides these three) -----------------------------------------------------------

    def build_projections(self, generator: torch.Generator) -> None:
        """Per-layer Linears to both towers (copies of one initial Linear each, as the reference's ``_get_clones``)
        and ``proj_rep`` (the reference's ``768 ** -0.5 * randn`` rule)."""
        clip, count, rep_dim = self.clip, len(self.rep_layers), self.config.rep_dim
        to_vision = linear_init(generator, rep_dim, clip.visual.width)
        to_text = linear_init(generator, rep_dim, clip.text.width)
        self.r2v = nn.ModuleList(copy.deepcopy(to_vision) for _ in range(count))
        self.r2t = nn.ModuleList(copy.deepcopy(to_text) for _ in range(count))
        width, dim = clip.visual.width, clip.visual.output_dim
        self.proj_rep = nn.Parameter(torch.randn((width, dim), generator=generator) * width**-0.5)

    def layer_tokens(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The tokens of every representation layer: text ``[N, text width]`` and vision ``[N, vision width]``."""
        return [proj(self.rep_tokens) for proj in self.r2t], [proj(self.rep_tokens) for proj in self.r2v]

    def merge_tokens(self, new: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Positions ``1..N`` before a representation layer after the first: MMRL replaces them."""
        return new

    def rep_projection(self) -> torch.Tensor:
        """The projection of the representation feature ``[vision width, embed dim]``."""
        return self.proj_rep

    # -- class prompts and frozen targets ---------------------------------------------------------------------------

    def prompt_template(self) -> str:
        return self.template or DEFAULT_TEMPLATE

    def rebuild_class_buffers(self) -> None:
        texts = [self.prompt_template().format(name) for name in self.classnames]
        prompts = build_class_prompts(self.clip, texts, self.classnames)
        self.register_buffer("prompt_embeddings", prompts.embeddings, persistent=False)
        self.register_buffer("eot", prompts.eot, persistent=False)
        self.register_buffer("zero_shot_text", None, persistent=False)  # encoded lazily (training only)

    def zero_shot_text_features(self) -> torch.Tensor:
        """The frozen CLIP's L2-normalised text features of the same template prompts ``[C, D]``."""
        if self.zero_shot_text is None:
            with torch.no_grad():
                texts = [self.prompt_template().format(name) for name in self.classnames]
                features = encode_texts(self.clip, texts).float()
                self.zero_shot_text = features / features.norm(dim=-1, keepdim=True)
        return self.zero_shot_text

    # -- towers ---------------------------------------------------------------------------------------------------

    def rep_hook(self, tokens: list[torch.Tensor]) -> Hook:
        """Before block ``l`` (0-based ``layer = l - 1``) of a representation layer: insert the tokens after position
        0 (the first one) or update positions ``1..N`` (:meth:`merge_tokens`)."""
        index = {block - 1: k for k, block in enumerate(self.rep_layers)}
        n = self.config.n_rep_tokens

        def hook(layer: int, x: torch.Tensor) -> torch.Tensor:
            k = index.get(layer)
            if k is None:
                return x
            values = tokens[k].to(x.dtype).expand(x.shape[0], -1, -1)
            if k == 0:
                return torch.cat([x[:, :1], values, x[:, 1:]], dim=1)
            return torch.cat([x[:, :1], self.merge_tokens(values, x[:, 1 : 1 + n]), x[:, 1 + n :]], dim=1)

        return hook

    def encode_text_rep(self, text_tokens: list[torch.Tensor]) -> torch.Tensor:
        # Pooled at EOT + N: the inserted tokens shift it. Cutting at max(EOT) + N + 1 keeps N padding positions
        # more than needed, which the causal mask makes harmless.
        n = self.config.n_rep_tokens
        return encode_text_embeddings(self.clip, self.prompt_embeddings, self.eot + n, hook=self.rep_hook(text_tokens),
                                      chunk_size=self.config.text_chunk_size)

    def encode_classes(self) -> torch.Tensor:
        return self.encode_text_rep(self.layer_tokens()[0])

    def encode_image_rep(self, images: torch.Tensor, visual_tokens: list[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class-token feature and representation feature ``[B, D]`` each (not normalised)."""
        visual = self.clip.visual
        x = visual.forward_blocks(visual.embed(images), self.rep_hook(visual_tokens))
        n = self.config.n_rep_tokens
        cls = visual.ln_post(x[:, 0]) @ visual.proj
        rep = visual.ln_post(x[:, 1 : 1 + n]).mean(dim=1) @ self.rep_projection().to(x.dtype)
        return cls, rep

    def outputs(self, batch) -> dict[str, torch.Tensor]:
        """Every output of the reference model: normalised features and the three logits."""
        _, visual_tokens = self.layer_tokens()
        image, image_rep = self.encode_image_rep(batch["image"], visual_tokens)
        text = self.class_features()
        image = image / image.norm(dim=-1, keepdim=True)
        image_rep = image_rep / image_rep.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        logits = LOGIT_SCALE * image @ text.t().to(image.dtype)
        logits_rep = LOGIT_SCALE * image_rep @ text.t().to(image_rep.dtype)
        alpha = self.config.alpha
        fusion = alpha * logits + (1 - alpha) * logits_rep
        return {"image": image, "image_rep": image_rep, "text": text, "logits": logits, "logits_rep": logits_rep,
                "fusion": fusion}

    @property
    def uses_fusion(self) -> bool:
        """Training, and evaluation on the training classes: fused logits; novel classes, transfer targets:
        class-token logits (the reference ``test()``'s B2N / FS / CD rules)."""
        return self.training or self.eval_context.training_classes

    def forward(self, batch) -> torch.Tensor:
        out = self.outputs(batch)
        self._train_outputs = out if self.training else None  # ``loss`` needs the features of this forward
        return out["fusion"] if self.uses_fusion else out["logits"]

    def loss(self, batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._train_outputs is None:
            raise RuntimeError(f"{self.name}: loss() needs the training forward of the same batch (in train mode)")
        out, self._train_outputs = self._train_outputs, None
        labels = batch["label"].to(logits.device)
        with torch.no_grad():
            image_clip = self.clip.encode_image(batch["image"])
            image_clip = image_clip / image_clip.norm(dim=-1, keepdim=True)
        text_clip = self.zero_shot_text_features()
        loss_ce = F.cross_entropy(out["logits"], labels)
        loss_ce_rep = F.cross_entropy(out["logits_rep"], labels)
        reg_img = 1 - F.cosine_similarity(out["image"], image_clip.to(out["image"].dtype), dim=1).mean()
        reg_text = 1 - F.cosine_similarity(out["text"], text_clip.to(out["text"].dtype), dim=1).mean()
        alpha, weight = self.config.alpha, self.config.reg_weight
        total = alpha * loss_ce + (1 - alpha) * loss_ce_rep + weight * reg_img + weight * reg_text
        return {"loss": total, "loss_ce": loss_ce.detach(), "loss_ce_rep": loss_ce_rep.detach(),
                "cossim_reg_img": reg_img.detach(), "cossim_reg_text": reg_text.detach()}

    # -- reference ------------------------------------------------------------------------------------------------

    #: The reference's trainer options (``cfg.TRAINER.MMRL``) and their ``train.py:extend_cfg`` defaults.
    REFERENCE_DEFAULTS = {"ALPHA": 0.7, "REG_WEIGHT": 1.0, "REP_LAYERS": [], "REP_DIM": 512, "N_REP_TOKENS": 5}

    @classmethod
    def _common_from_reference(cls, opts) -> dict:
        values = {**cls.REFERENCE_DEFAULTS, **opts}
        return {"n_rep_tokens": int(values["N_REP_TOKENS"]), "rep_dim": int(values["REP_DIM"]),
                "rep_layers": [int(b) for b in values["REP_LAYERS"]], "alpha": float(values["ALPHA"]),
                "reg_weight": float(values["REG_WEIGHT"])}

    @classmethod
    def config_from_reference(cls, trainer) -> MMRLConfig:
        opts = reference_options(trainer, set(cls.REFERENCE_DEFAULTS), cls.name)
        return MMRLConfig(**cls._common_from_reference(opts))

    def reference_name_map(self) -> dict[str, str]:
        names = {"representation_learner.compound_rep_tokens": "rep_tokens", "image_encoder.proj_rep": "proj_rep"}
        for k in range(len(self.rep_layers)):
            for part in ("weight", "bias"):
                names[f"representation_learner.compound_rep_tokens_r2tproj.{k}.{part}"] = f"r2t.{k}.{part}"
                names[f"representation_learner.compound_rep_tokens_r2vproj.{k}.{part}"] = f"r2v.{k}.{part}"
        return names

    def reference_loss_terms(self, terms) -> dict[str, float]:
        return {"xe_loss1": terms["loss_ce"], "xe_loss2": terms["loss_ce_rep"],
                "cossim_reg_img": terms["cossim_reg_img"], "cossim_reg_text": terms["cossim_reg_text"]}
