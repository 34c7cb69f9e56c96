"""CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024): low-rank updates of the attention projections of both towers.

Behaviour follows the reference (MaxZanella/CLIP-LoRA @ 358f0d7; tests/golden/methods/clip_lora.md), implemented
from its card (the repository has no licence):

- LoRA (rank ``r``, scaling **alpha / sqrt(r)**, dropout on the branch input) on the ``params`` projections (q, k,
  v, o) of the attention of the blocks selected by ``position`` in the towers selected by ``encoder``; ``A`` starts
  kaiming-uniform, ``B`` at zero; only the LoRA tensors train. The adapters live on a method-owned view of the
  backbone (:mod:`promptclip.methods.lora`): the shared backbone is never changed;
- class features: the (LoRA) text tower on ``template.format(name)`` (``_`` → space), one template (the reference
  reduces every dataset's list to ``a photo of a {}.``); with ``encoder: vision`` the frozen zero-shot classifier;
- training logits ``100 · cos`` (a constant, not the model's ``logit_scale``), cross-entropy; evaluation logits are
  the plain cosine (``eval_logit_scale`` 1: only the argmax is used by the reference), computed with merged weights;
- AdamW (betas 0.9/0.999, weight decay 1e-2, eps 1e-8: the preset's ``train`` section) and a cosine schedule **per
  iteration** from ``lr`` to ``eta_min`` 1e-6 over the run's steps (:meth:`lr_schedule`, which replaces the engine's
  per-epoch warm-up and cosine).

Block selection: the reference's index lists (for 12-block towers, and 24-block ViT-L/14 vision towers) by
``position``; blocks a smaller tower lacks are skipped, as in the reference.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..clip.tokenizer import tokenize
from ..errors import ConfigError
from .base import PromptMethod, reference_options, register
from .lora import PROJECTIONS, lora_view
from .prompts import encode_texts

_TWELVE = {"bottom": [0, 1, 2, 3], "mid": [4, 5, 6, 7], "up": [8, 9, 10, 11], "half-up": [6, 7, 8, 9, 10, 11],
           "half-bottom": [0, 1, 2, 3, 4, 5], "all": list(range(12)), "top3": [9, 10, 11]}
#: The reference's text block lists by ``position``.
TEXT_POSITIONS = {**_TWELVE, "top1": [11], "top2": [10, 11]}
#: The reference's image block lists by its ``backbone`` argument and ``position``.
VISION_POSITIONS = {
    "ViT-B/16": {**_TWELVE, "top": [11]},
    "ViT-B/32": {k: v for k, v in _TWELVE.items() if k != "top3"},
    "ViT-L/14": {"half-up": list(range(12, 24)), "half-bottom": list(range(12)), "all": list(range(24))},
}

#: Reference arguments that are the run's, not the method's (data, schedule, output): accepted, used elsewhere.
_RUN_ARGS = {"seed", "root_path", "dataset", "shots", "lr", "n_iters", "batch_size", "save_path", "filename",
             "eval_only"}


@dataclass
class ClipLoRAConfig:
    #: Rank of every low-rank update.
    r: int = 2
    #: The update is scaled by ``alpha / sqrt(r)`` (the reference's rule, not LoRA's usual ``alpha / r``).
    alpha: float = 1.0
    #: Dropout on the input of the low-rank branch, in training.
    dropout_rate: float = 0.25
    #: Adapted projections: any of q, k, v, o (o: the attention's output projection).
    params: list[str] = field(default_factory=lambda: ["q", "k", "v"])
    #: Towers: both, text (images through the frozen tower) or vision (text: the frozen zero-shot classifier).
    encoder: Literal["both", "text", "vision"] = "both"
    #: Which blocks (the reference's index lists): all, bottom, mid, up, half-up, half-bottom, top3, top1/top2
    #: (text), top (ViT-B/16 vision).
    position: str = "all"
    #: The image tower's index table (the reference's ``backbone`` argument): ViT-B/16, ViT-B/32, ViT-L/14.
    vision_index_table: str = "ViT-B/16"
    #: Training logits are this times the cosine (the reference's constant 100; not the model's logit_scale).
    logit_scale: float = 100.0
    #: Evaluation logits are this times the cosine (the reference evaluates the plain cosine).
    eval_logit_scale: float = 1.0
    #: The per-iteration cosine ends at this learning rate.
    eta_min: float = 1e-6
    #: Evaluate with merged weights ``W + s·BA`` (the reference); False runs the branches (same function).
    merge_on_eval: bool = True
    #: Seed of the initial A matrices (B starts at zero).
    init_seed: int = 0

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"clip_lora: r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(f"clip_lora: dropout_rate must be in [0, 1), got {self.dropout_rate}")
        bad = sorted(set(self.params) - set(PROJECTIONS))
        if bad or not self.params:
            raise ConfigError(f"clip_lora: params must be among {', '.join(PROJECTIONS)}, got {self.params}")
        if self.encoder not in ("both", "text", "vision"):
            raise ConfigError(f"clip_lora: encoder must be both, text or vision, got {self.encoder!r}")
        if self.vision_index_table not in VISION_POSITIONS:
            raise ConfigError(f"clip_lora: vision_index_table must be one of {', '.join(VISION_POSITIONS)}")
        towers = {"text": TEXT_POSITIONS, "vision": VISION_POSITIONS[self.vision_index_table]}
        for tower in self.towers:
            if self.position not in towers[tower]:
                raise ConfigError(f"clip_lora: position {self.position!r} has no {tower} block list; use one of "
                                  f"{', '.join(towers[tower])}")

    @property
    def towers(self) -> tuple[str, ...]:
        return ("text", "vision") if self.encoder == "both" else (self.encoder,)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r)


@register
class ClipLoRA(PromptMethod):
    """CLIP-LoRA: low-rank updates of the attention projections of both towers, on a view of the backbone."""

    name = "clip_lora"
    config_class = ClipLoRAConfig
    image_independent_text = True
    # The LoRA text tower runs in one pass over the class prompts, as in the reference: chunking it would change
    # which dropout mask falls on which sequence (masks are drawn per pass), so the text-memory policy is not followed.
    follows_text_memory = False

    def __init__(self, backbone, config: ClipLoRAConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        blocks = {"text": TEXT_POSITIONS[config.position] if "text" in config.towers else [],
                  "vision": VISION_POSITIONS[config.vision_index_table][config.position]
                  if "vision" in config.towers else []}
        if blocks["vision"] and not backbone.is_vit:
            raise ConfigError("clip_lora with encoder 'both' or 'vision' needs a ViT backbone; use encoder: text")
        self.view, modules = lora_view(backbone, blocks, config.params, config.r, config.scaling,
                                       config.dropout_rate, config.init_seed, config.merge_on_eval)
        #: The adapted attention modules, by backbone path ('.' -> '/').
        self.lora = nn.ModuleDict({path.replace(".", "/"): module for path, module in modules.items()})
        if not modules:
            raise ConfigError(f"clip_lora: position {config.position!r} selects no block of this backbone")
        self.register_buffer("tokens", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("zs_text_features", torch.empty(0), persistent=False)
        self.set_classnames(classnames, template)

    def __setattr__(self, name, value):
        if name == "view":  # the backbone view shares every frozen module: held, never registered twice
            self.__dict__[name] = value
            return
        super().__setattr__(name, value)

    def rebuild_class_buffers(self) -> None:
        template = self.template or "a photo of a {}."
        prompts = [template.format(name.replace("_", " ")) for name in self.classnames]
        self.tokens = tokenize(prompts, context_length=self.clip.text.context_length).to(self.device)
        if "text" not in self.config.towers:
            self.zs_text_features = F.normalize(encode_texts(self.clip, prompts), dim=-1)

    def encode_classes(self) -> torch.Tensor:
        if "text" not in self.config.towers:
            return self.zs_text_features
        return self.view.encode_text(self.tokens)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if "vision" in self.config.towers:
            return self.view.encode_image(images)
        with torch.no_grad():
            return self.clip.encode_image(images)

    def _seed_dropout(self) -> None:
        """LoRA dropout masks of a training forward come from a generator seeded from ``train_rng``'s state (read,
        not advanced: :meth:`training_step` advances it), so a step's masks are reproducible (resumed runs, the
        text-memory policies, checkpoint recomputation) and differ from step to step."""
        if not self.training or self.config.dropout_rate == 0:
            return
        peek = random.Random()
        peek.setstate(self.train_rng.getstate())
        generator = torch.Generator(device=self.device).manual_seed(peek.getrandbits(63))
        for module in self.lora.values():
            module.mask_generator = generator

    def training_step(self, batch):
        out = super().training_step(batch)
        self.train_rng.getrandbits(63)  # the next step draws other masks
        return out

    def forward(self, batch) -> torch.Tensor:
        self._seed_dropout()
        image = F.normalize(self.image_features(batch["image"]), dim=-1)
        text = F.normalize(self.class_features(), dim=-1)
        scale = self.config.logit_scale if self.training else self.config.eval_logit_scale
        return scale * image @ text.t()

    # -- training: a cosine per iteration (AdamW with weight decay 1e-2 is the preset's train.optimizer) -------------

    def lr_schedule(self, base_lr: float, step: int, total_steps: int, epoch: int, config) -> float:
        return self.config.eta_min + (base_lr - self.config.eta_min) * (1 + math.cos(math.pi * step / total_steps)) / 2

    # -- reference -----------------------------------------------------------------------------------------------

    @classmethod
    def config_from_reference(cls, trainer) -> ClipLoRAConfig:
        """Our config from the reference's arguments (``run_utils.get_arguments``; run arguments are accepted and
        used by the run, not the method)."""
        opts = reference_options(trainer, {"position", "encoder", "params", "r", "alpha", "dropout_rate",
                                           "backbone"} | _RUN_ARGS, cls.name)
        return ClipLoRAConfig(r=int(opts.get("r", 2)), alpha=float(opts.get("alpha", 1)),
                              dropout_rate=float(opts.get("dropout_rate", 0.25)),
                              params=list(opts.get("params", ["q", "k", "v"])), encoder=opts.get("encoder", "both"),
                              position=opts.get("position", "all"),
                              vision_index_table=opts.get("backbone", "ViT-B/16"))

    def reference_name_map(self) -> dict[str, str]:
        names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}
        mapping = {}
        for key, module in self.lora.items():
            path = key.replace("/", ".")
            for p in module.projections:
                mapping[f"{path}.{names[p]}.w_lora_A"] = f"lora.{key}.{p}_A"
                mapping[f"{path}.{names[p]}.w_lora_B"] = f"lora.{key}.{p}_B"
        return mapping
