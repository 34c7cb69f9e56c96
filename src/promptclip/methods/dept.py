"""DePT (Zhang et al., CVPR 2024): a FiLM-mapped linear head beside a host's prompts (dept_coop, dept_maple).

Decoupled Prompt Tuning adds a channel-wise re-weighted linear head to a host prompt learner (``dept_coop``: CoOp,
``dept_maple``: MaPLe). The reference's CoCoOp and KgCoOp hosts are not offered (docs/methods/dept.md).

Written from the paper and the method card (tests/golden/methods/dept.md); the reference implementation
(Koorye/DePT) is GPL-2.0 and was only run as an oracle to produce the parity goldens: nothing of it is used here.

The host method is unchanged: same prompts, same encoders, same similarity logits ``S = s * cos(I, T)`` over its
un-normalised image features ``I`` ``[B, D]`` and text features ``T`` ``[C, D]``. DePT adds

- two channel-wise affine maps (``film_text``, ``film_img``: ``x * scale + bias``, ``[D]`` each, init ones/zeros),
  applied to the **un-normalised** features;
- a linear head (``head``: ``[C_train, D]`` + ``[C_train]``) over the mapped features, one row per training class.

Training: ``loss = (1 - w) * CE(S, y) + w * CE(H, [y; y])`` with ``H = head([film_text(T)[y]; film_img(I)])`` (the
label's text feature, then the image features: ``2B`` rows), ``w = lp_weight`` (0.7).

Evaluation follows :class:`~promptclip.methods.base.EvalContext`: on classes the head was trained for (base classes,
the training dataset's classes, or a domain-generalisation target whose classes are among them, e.g. ImageNet-A/R:
the head's rows are picked by class name) the output is the fused ``(1 - w) * S + w * head(film_img(I))`` (no
rescaling: ``S`` is scaled by ``exp(logit_scale)``, the head's output is raw); on novel classes
(``subsample == "new"``) and on transfer targets with other classes it is ``S`` alone (FiLM and head unused).

Optimisation (DePT's staged learning rates): two parameter groups, the host's prompts at
``(lr * lr_exp) * (base_lr_mult / lr_exp)`` and FiLM + head at ``lr * lr_exp``; the constant warm-up gives both the
same warm-up rate, then each follows its own cosine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import PromptMethod, cosine_logits, register
from .coop import CoOp, CoOpConfig
from .deep import linear_init
from .maple import MaPLe, MaPLeConfig

#: Reference names of DePT's own tensors -> ours (the same for every host).
_DEPT_NAMES = {
    "film_lp_text.scale": "film_text.scale", "film_lp_text.bias": "film_text.bias",
    "film_lp_img.scale": "film_img.scale", "film_lp_img.bias": "film_img.bias",
    "linear_probe_proj.weight": "head.weight", "linear_probe_proj.bias": "head.bias",
}
#: The reference's only supported values of the options that have no field here (anything else is refused).
_REFERENCE_FIXED = {"NAMES_TO_UPDATE": ["prompt_learner", "linear_probe", "film"],
                    "NEW_LAYERS": ["linear_probe", "film"]}


@dataclass
class DePTOptions:
    """DePT's own options (the fields every ``dept_*`` config adds to its host's)."""

    #: Weight ``w`` of the head's loss and of the head's logits in the fused evaluation (TRAINER.LINEAR_PROBE.WEIGHT).
    lp_weight: float = 0.7
    #: Fuse ``(1 - w) * S + w * H`` on the training classes (TEST_TIME_FUSION); False: the head's logits alone there.
    test_time_fusion: bool = True
    #: FiLM + head learn at ``lr * lr_exp`` (OPTIM.LR_EXP).
    lr_exp: float = 6.5
    #: The host's prompts learn at ``(lr * lr_exp) * (base_lr_mult / lr_exp)`` (OPTIM.BASE_LR_MULT).
    base_lr_mult: float = 1.0
    #: Seed of the head's random init (``nn.Linear``'s default rule); FiLM starts at ones / zeros.
    head_seed: int = 1


def _check_options(config: Any) -> None:
    if not 0.0 <= config.lp_weight <= 1.0:
        raise ConfigError(f"lp_weight must be in [0, 1], got {config.lp_weight!r}")
    if not config.lr_exp > 0:
        raise ConfigError(f"lr_exp must be greater than 0, got {config.lr_exp!r}")
    if not config.base_lr_mult > 0:
        raise ConfigError(f"base_lr_mult must be greater than 0, got {config.base_lr_mult!r}")


@dataclass
class DePTCoOpConfig(CoOpConfig, DePTOptions):
    """CoOp's fields (DePT's defaults for it are CoOp's: 16 random context vectors, class token at the end) and
    DePT's."""

    def __post_init__(self):
        _check_options(self)


@dataclass
class DePTMaPLeConfig(MaPLeConfig, DePTOptions):
    """MaPLe's fields (2 context tokens from "a photo of a", depth 9) and DePT's."""

    def __post_init__(self):
        _check_options(self)


class FiLM(nn.Module):
    """Channel-wise affine map ``x * scale + bias`` (``[D]`` each, init ones / zeros), cast to the input's dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.bias.to(x.dtype)


class DePT(PromptMethod):
    """DePT over a host method (a ``PromptMethod`` with image-independent text features), mixed in before it:
    ``class DePTCoOp(DePT, CoOp)``. The host's ``__init__`` builds its prompts; :meth:`_setup_dept` adds FiLM and the
    head for the class names the method is built with (its training classes)."""

    image_independent_text = True
    reference_optim_options = ("STAGED_LR", "NEW_LAYERS", "BASE_LR_MULT", "LR_EXP")
    #: The host's config ``dataclass`` and the host method class (for its reference mapping).
    host: type[PromptMethod]

    def _setup_dept(self) -> None:
        dim = self.clip.text_projection.shape[1]
        self.film_text = FiLM(dim)
        self.film_img = FiLM(dim)
        generator = torch.Generator().manual_seed(self.config.head_seed)
        self.head = linear_init(generator, dim, len(self.classnames)).to(self.device)
        self.film_text.to(self.device)
        self.film_img.to(self.device)
        #: The classes of the head's rows: those the method was built (and trained) for.
        self.head_classnames = list(self.classnames)
        self._head_rows = {name: i for i, name in enumerate(self.head_classnames)}
        self._train_head: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- features and logits -----------------------------------------------------------------------------------------

    def host_image_features(self, batch) -> torch.Tensor:
        """The host's image features ``[B, D]`` before normalisation."""
        if self.frozen_image_features:
            return self.image_features_of(batch)
        return self.encode_image(batch["image"])

    def uses_head(self) -> bool:
        """Whether evaluation fuses the head: not on novel classes, and only for class names the head has rows for
        (the training classes, or a subset of them such as ImageNet-A/R under domain generalisation)."""
        if self.eval_context.subsample == "new":
            return False
        return all(name in self._head_rows for name in self.classnames)

    def head_logits(self, image: torch.Tensor) -> torch.Tensor:
        """The head on FiLM-ed image features, the current classes' rows ``[B, C]``."""
        logits = self.head(self.film_img(image))
        if self.classnames != self.head_classnames:
            rows = torch.tensor([self._head_rows[name] for name in self.classnames], device=logits.device)
            logits = logits.index_select(1, rows)
        return logits

    def forward(self, batch) -> torch.Tensor:
        image = self.host_image_features(batch)
        text = self.class_features()
        similarity = cosine_logits(self.clip, image, text)
        if self.training:
            # The head's training rows need the labels; loss() takes them (the similarity logits give the accuracy).
            self._train_head = None
            if "label" in batch:
                if self.classnames != self.head_classnames:
                    raise ConfigError(f"{self.name} trains its head on the classes it was built for; it is set to "
                                      "other class names")
                labels = batch["label"].to(similarity.device)
                rows = torch.cat([self.film_text(text)[labels], self.film_img(image)])
                self._train_head = (self.head(rows), torch.cat([labels, labels]))
            return similarity
        if not self.uses_head():
            return similarity
        head = self.head_logits(image)
        if not self.config.test_time_fusion:
            return head
        w = self.config.lp_weight
        return (1 - w) * similarity + w * head

    def loss(self, batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._train_head is None:
            raise RuntimeError(f"{self.name}.loss needs the training forward of the same batch (with labels) first")
        head_logits, head_labels = self._train_head
        self._train_head = None
        w = self.config.lp_weight
        loss_cls = F.cross_entropy(logits, batch["label"].to(logits.device))
        loss_cls_lp = F.cross_entropy(head_logits, head_labels)
        return {"loss": (1 - w) * loss_cls + w * loss_cls_lp, "loss_cls": loss_cls, "loss_cls_lp": loss_cls_lp}

    # -- optimisation ------------------------------------------------------------------------------------------------

    def dept_parameters(self) -> list[nn.Parameter]:
        """FiLM maps and head: the second learning-rate group."""
        return [*self.film_img.parameters(), *self.film_text.parameters(), *self.head.parameters()]

    def param_groups(self) -> list[dict[str, Any]]:
        new = self.dept_parameters()
        ids = {id(p) for p in new}
        host = [p for _, p in self.named_trainable() if id(p) not in ids]
        exp, mult = self.config.lr_exp, self.config.base_lr_mult
        # The reference's float order: (LR * LR_EXP) * (BASE_LR_MULT / LR_EXP) for the host, LR * LR_EXP for DePT's.
        return [{"params": host, "lr": lambda lr: (lr * exp) * (mult / exp)},
                {"params": [p for p in new if p.requires_grad], "lr": lambda lr: lr * exp}]

    # -- reference ---------------------------------------------------------------------------------------------------

    @classmethod
    def config_from_reference(cls, trainer):
        """The host's options (its ``TRAINER.<HOST>`` node), DePT's at their official values."""
        host = cls.host.config_from_reference(cls._host_options(trainer))
        return cls.config_class(**dataclasses.asdict(host))

    @classmethod
    def _host_options(cls, trainer) -> dict[str, Any]:
        return dict(trainer)

    @classmethod
    def config_from_reference_cfg(cls, cfg):
        """Host options from ``trainer``; ``LINEAR_PROBE``, ``FILM`` and ``NAMES_TO_UPDATE`` from ``trainer_full``;
        ``STAGED_LR``, ``LR_EXP``, ``BASE_LR_MULT``, ``NEW_LAYERS`` from ``optim``. Values the reference allows but
        promptclip does not implement (a cosine head, no FiLM before the head, other trained or new-layer names, a
        single learning rate) are refused."""
        full, optim = cfg.get("trainer_full", {}), cfg.get("optim", {})
        probe, film = full.get("LINEAR_PROBE", {}), full.get("FILM", {})
        unknown = sorted(set(probe) - {"TYPE", "WEIGHT", "TEST_TIME_FUSION"}) + sorted(set(film) - {"LINEAR_PROBE"})
        if unknown:
            raise ConfigError(f"{cls.name}: reference option(s) {', '.join(unknown)} have no mapping in promptclip")
        refused = []
        if probe.get("TYPE", "linear") != "linear":
            refused.append(f"LINEAR_PROBE.TYPE={probe['TYPE']!r} (only 'linear' is implemented)")
        if film.get("LINEAR_PROBE", True) is not True:
            refused.append("FILM.LINEAR_PROBE=False (the head always reads FiLM-ed features here)")
        if optim.get("STAGED_LR", True) is not True:
            refused.append("OPTIM.STAGED_LR=False (DePT's two learning-rate groups are always used)")
        for key, where in (("NAMES_TO_UPDATE", full), ("NEW_LAYERS", optim)):
            if key in where and list(where[key]) != _REFERENCE_FIXED[key]:
                refused.append(f"{key}={where[key]!r} (only {_REFERENCE_FIXED[key]!r})")
        if refused:
            raise ConfigError(f"{cls.name}: reference option(s) not supported: {'; '.join(refused)}")
        config = cls.config_from_reference(cfg["trainer"])
        return dataclasses.replace(config, lp_weight=float(probe.get("WEIGHT", 0.7)),
                                   test_time_fusion=bool(probe.get("TEST_TIME_FUSION", True)),
                                   lr_exp=float(optim.get("LR_EXP", 6.5)),
                                   base_lr_mult=float(optim.get("BASE_LR_MULT", 1.0)))

    def reference_name_map(self) -> dict[str, str]:
        return {**self.host.reference_name_map(self), **_DEPT_NAMES}

    def reference_loss_terms(self, terms) -> dict[str, float]:
        return {"loss_cls": terms["loss_cls"], "loss_cls_lp": terms["loss_cls_lp"], "lp_weight": self.config.lp_weight}


@register
class DePTCoOp(DePT, CoOp):
    """DePT over CoOp (the reference's ``ExtrasLinearProbeCoOp``)."""

    name = "dept_coop"
    config_class = DePTCoOpConfig
    frozen_image_features = True
    reference_trainers = ("ExtrasLinearProbeCoOp",)
    host = CoOp

    def __init__(self, backbone, config: DePTCoOpConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        self._setup_dept()

    @classmethod
    def _host_options(cls, trainer) -> dict[str, Any]:
        # DePT's train.py adds ALPHA and W (its KgCoOp host's loss weights) to the COOP node; CoOp+DePT never reads
        # them.
        return {k: v for k, v in trainer.items() if k not in ("ALPHA", "W")}


@register
class DePTMaPLe(DePT, MaPLe):
    """DePT over MaPLe (the reference's ``ExtrasLinearProbeMaPLe``)."""

    name = "dept_maple"
    config_class = DePTMaPLeConfig
    reference_trainers = ("ExtrasLinearProbeMaPLe",)
    host = MaPLe

    def __init__(self, backbone, config: DePTMaPLeConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        self._setup_dept()
