"""KgCoOp (Yao et al., CVPR 2023): CoOp plus a knowledge-guided penalty towards hand-crafted CLIP text features.

Reference: htyao89/KgCoOp ``KgCoOp/trainers/kgcoop.py``. The prompt is CoOp's (this class reuses :class:`CoOp`);
the loss is

    loss = CE(logits, y) + w * (1 - mean_c cos(t_c, t_c^clip))

with ``t_c`` the learned text feature of class c and ``t_c^clip`` the frozen CLIP feature of the hand-crafted
template filled with the class name (both L2-normalised). The frozen features are a non-persistent buffer computed
at the first training loss for the current class names (evaluation never needs them); they are never part of the
adapter.

Reference behaviour worth knowing:

- the template is the dataset's entry of KgCoOp's own ``CUSTOM_TEMPLATES``, which equals CoOp's except for
  DescribableTextures ("a photo of a {}, a type of texture." instead of "{} texture."; see
  ``KGCOOP_TEMPLATE_OVERRIDES``): given DTD's CoOp template, the method uses KgCoOp's. Set ``kg_template`` to use
  any other template;
- ``CTX_INIT`` is a switch there: when true the init words are always "a photo of a";
- ``CLASS_TOKEN_POSITION`` is read but never used (the class name always goes at the end) and ``ALPHA`` is unused;
- its ``amp`` precision path drops the KG term (and fails on the model's tuple output); the term is always applied
  here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.templates import CUSTOM_TEMPLATES, check_template
from .base import cosine_logits, reference_options, register
from .coop import CoOp, CoOpConfig
from .prompts import frozen_class_features

DEFAULT_TEMPLATE = "a photo of a {}."

#: Datasets whose KgCoOp template differs from CoOp's per-dataset zero-shot template.
KGCOOP_TEMPLATE_OVERRIDES = {"DescribableTextures": "a photo of a {}, a type of texture."}
#: The same, keyed by the CoOp template a dataset hands to the method (each is unique to its dataset).
_KG_TEMPLATE_FOR = {CUSTOM_TEMPLATES[name]: template for name, template in KGCOOP_TEMPLATE_OVERRIDES.items()}


@dataclass
class KgCoOpConfig(CoOpConfig):
    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    #: Weight of the knowledge-guided term (the reference's ``W``; 8.0 in the official scripts).
    w: float = 8.0
    #: Template of the frozen text features, e.g. "a photo of a {}."; "" uses the template given to the method
    #: (the dataset's), or "a photo of a {}." when none is given.
    kg_template: str = ""


@register
class KgCoOp(CoOp):
    name = "kgcoop"
    config_class = KgCoOpConfig
    reference_trainers = ("KgCoOp",)

    def __init__(self, backbone, config: KgCoOpConfig, classnames, template=None):
        if config.kg_template:
            check_template(config.kg_template, "kgcoop: kg_template")
        super().__init__(backbone, config, classnames, template)
        self._last_text_features: torch.Tensor | None = None

    @property
    def kg_template(self) -> str:
        """``kg_template`` if set, else KgCoOp's template for the dataset whose CoOp template the method was given."""
        if self.config.kg_template:
            return self.config.kg_template
        return _KG_TEMPLATE_FOR.get(self.template, self.template) if self.template else DEFAULT_TEMPLATE

    def rebuild_class_buffers(self) -> None:
        super().rebuild_class_buffers()
        # Only the training loss needs the frozen features: computed at first use, so evaluation and class swaps
        # (base -> novel, cross-dataset targets) never run the text tower for them.
        self.register_buffer("_kg_text_features", None, persistent=False)

    @property
    def kg_text_features(self) -> torch.Tensor:
        """L2-normalised frozen CLIP features ``[C, D]`` of ``kg_template`` for the current classes (fp32)."""
        if self._kg_text_features is None:
            self._kg_text_features = frozen_class_features(self.clip, self.kg_template, self.classnames)
        return self._kg_text_features

    def forward(self, batch) -> torch.Tensor:
        text_features = self.class_features()
        self._last_text_features = text_features  # the KG term of ``loss`` uses the same forward's features
        return cosine_logits(self.clip, self.image_features_of(batch), text_features)

    def knowledge_gap(self, text_features: torch.Tensor) -> torch.Tensor:
        """``1 - mean_c cos(t_c, t_c^clip)`` for learned text features ``[C, D]``."""
        text_features = text_features.float()
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        frozen = self.kg_text_features.float()
        return 1.0 - F.cosine_similarity(text_features, frozen, dim=-1, eps=1e-7).mean()

    def loss(self, batch, logits) -> dict[str, torch.Tensor]:
        text_features, self._last_text_features = self._last_text_features, None
        if text_features is None:
            raise RuntimeError("kgcoop: call the method on the batch before loss() (the KG term needs its features)")
        ce = F.cross_entropy(logits, batch["label"].to(logits.device))
        kg = self.knowledge_gap(text_features)
        return {"loss": ce + self.config.w * kg, "loss_ce": ce, "loss_kg": kg}

    def reference_loss_terms(self, terms) -> dict[str, float]:
        return {"loss_ce": terms["loss_ce"], "score": terms["loss_kg"], "w": self.config.w}

    @classmethod
    def config_from_reference(cls, trainer) -> KgCoOpConfig:
        # ALPHA exists in the reference config but no code reads it; CLASS_TOKEN_POSITION is read but not applied.
        known = {"N_CTX", "CSC", "CTX_INIT", "W", "CLASS_TOKEN_POSITION", "ALPHA"}
        opts = reference_options(trainer, known, cls.name)
        if opts.get("CTX_INIT", False):
            return KgCoOpConfig(ctx_init="a photo of a", csc=False, w=float(opts.get("W", 1.0)))
        return KgCoOpConfig(n_ctx=opts.get("N_CTX", 16), ctx_init="", csc=bool(opts.get("CSC", False)),
                            w=float(opts.get("W", 1.0)))
