"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): a key-value cache of few-shot image features added to
zero-shot CLIP, training-free or with its keys fine-tuned. Implemented from the method card
(tests/golden/methods/tip_adapter.md); the reference repository has no licence, so none of its code is used.

Both work on frozen image features only, so they are fitted by :meth:`PromptMethod.fit_features` (the engine hands
them the features of the augmented training views and of the evaluation splits, :mod:`promptclip.feature_fit`),
never by the epoch loop of :func:`promptclip.train.fit`.

- cache keys: ``normalise(mean over augment_epoch views of the raw features)`` ``[N·K, D]``; values: one-hot labels.
- logits of L2-normalised features ``f``: ``100·f Wᵀ + α·exp(-(β − β·f Kᵀ)) V`` (``W``: the template-averaged
  text features; the 100 is a constant, not CLIP's logit scale).
- α/β are searched on the validation features over the reference's grid (β outer, α inner, strictly better
  replaces, ties keep the earliest); the result is part of the adapter.
- Tip-Adapter-F trains the keys with AdamW (eps 1e-4) under a cosine stepped every iteration, with the initial α/β,
  keeps the epoch with the best selection accuracy (``selection``: ``val``, our default, or ``test``, the
  reference's), reloads it and searches α/β with the trained keys.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, PromptClipError
from .base import PromptMethod, reference_options, register
from .prompts import check_prompts_fit, template_features

#: The reference's ImageNet template ensemble (``datasets/imagenet.py``), used for ImageNet.
TIP_IMAGENET_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

#: Constant scale of the zero-shot logits in every path of the reference.
CLIP_LOGIT_SCALE = 100.0


@dataclass
class TipAdapterConfig:
    #: Augmented passes over the training images averaged into the cache keys (``augment_epoch``).
    augment_epoch: int = 10
    #: α/β used before the search (and, for Tip-Adapter-F, during training and per-epoch selection).
    init_beta: float = 1.0
    init_alpha: float = 2.0
    #: Search α/β on the validation split (``search_hp``).
    search: bool = True
    #: Grid ends ``[β, α]`` and sizes ``[n_β, n_α]`` (``search_scale``, ``search_step``).
    search_scale: list[float] = field(default_factory=lambda: [12.0, 10.0])
    search_step: list[int] = field(default_factory=lambda: [200, 20])
    #: Text templates (``{}`` = class name); None: the dataset's template.
    templates: list[str] | None = None
    #: Tip-Adapter-F only: the split whose accuracy picks the best epoch. ``val`` (default) or ``test`` (the
    #: reference's behaviour: selection on the test set; only for reproducing its numbers).
    selection: Literal["val", "test"] = "val"

    def __post_init__(self):
        if self.augment_epoch < 1:
            raise ConfigError(f"tip_adapter: augment_epoch must be at least 1, got {self.augment_epoch}")
        if len(self.search_scale) != 2 or len(self.search_step) != 2 or min(self.search_step) < 1:
            raise ConfigError("tip_adapter: search_scale and search_step are [beta, alpha] pairs, steps >= 1")
        if self.selection not in ("val", "test"):
            raise ConfigError(f"tip_adapter: selection must be 'val' or 'test', got {self.selection!r}")


def search_list(scale: float, steps: int) -> list[float]:
    """The reference's grid: ``i·(scale − 0.1)/steps + 0.1`` for ``i < steps`` (Python floats)."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """``100 · top-1 hits / n`` as a Python float."""
    hits = int((logits.topk(1, dim=1)[1].squeeze(1) == labels.to(logits.device)).sum())
    return 100 * hits / len(labels)


def cache_logits(affinity: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """``exp(-(β − β·A)) V`` in the reference's order of operations."""
    return ((-1) * (beta - beta * affinity)).exp() @ values


def search_alpha_beta(clip_logits: torch.Tensor, affinity: torch.Tensor, values: torch.Tensor, labels: torch.Tensor,
                      scale: list[float], steps: list[int]) -> dict[str, Any]:
    """The α/β grid search: β outer, α inner, a setting replaces the best only if strictly more accurate (the best
    starts at accuracy 0, β 0, α 0). Returns the best and every accuracy (``grid[i][j]`` for ``beta_list[i]``,
    ``alpha_list[j]``)."""
    betas, alphas = search_list(scale[0], steps[0]), search_list(scale[1], steps[1])
    best = {"beta": 0.0, "alpha": 0.0, "acc": 0.0}
    grid = []
    for beta in betas:
        cached = cache_logits(affinity, values, beta)
        row = []
        for alpha in alphas:
            acc = accuracy(clip_logits + cached * alpha, labels)
            row.append(acc)
            if acc > best["acc"]:
                best = {"beta": beta, "alpha": alpha, "acc": acc}
        grid.append(row)
    return {**best, "beta_list": betas, "alpha_list": alphas, "grid": grid}


def class_ids(classnames: list[str]) -> list[int]:
    """A 63-bit hash of each class name (the cache's columns are matched to classes by name)."""
    return [int.from_bytes(hashlib.blake2b(n.encode(), digest_size=8).digest(), "little") & 0x7FFFFFFFFFFFFFFF
            for n in classnames]


def normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@register
class TipAdapter(PromptMethod):
    """Training-free Tip-Adapter: the cache model and its α/β search."""

    name = "tip_adapter"
    config_class = TipAdapterConfig
    image_independent_text = True
    frozen_image_features = True
    #: The cache holds one value column per training class: meaningless for novel classes or other datasets.
    protocols: ClassVar[tuple[str, ...] | None] = ("fewshot",)
    not_applicable_reason: ClassVar[str] = (
        "its cache model is keyed by the training classes (a novel class or another dataset gets no cache term)")
    #: Whether the keys are trained (Tip-Adapter-F).
    trains_keys: ClassVar[bool] = False

    def __init__(self, backbone, config: TipAdapterConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        dim = backbone.config.embed_dim
        keys = torch.zeros(0, dim)
        if self.trains_keys:
            self.cache_keys = nn.Parameter(keys)
        else:
            self.register_buffer("cache_keys", keys)
        self.register_buffer("cache_values", torch.zeros(0, 0))
        #: 63-bit hashes of the cache's class names (one per value column): the cache term of a class is found by
        #: its name, so a class the cache never saw (novel classes, another dataset) gets the zero-shot logit only.
        self.register_buffer("cache_class_ids", torch.zeros(0, dtype=torch.long))
        self.register_buffer("alpha", torch.tensor(float(config.init_alpha), dtype=torch.float64))
        self.register_buffer("beta", torch.tensor(float(config.init_beta), dtype=torch.float64))
        self.fit_summary: dict[str, Any] = {}
        self.set_classnames(classnames, template)

    # -- text side ---------------------------------------------------------------------------------------------

    def templates(self) -> list[str]:
        return list(self.config.templates) if self.config.templates else [self.template or "a photo of a {}."]

    def class_prompt_names(self) -> list[str]:
        return [name.replace("_", " ") for name in self.classnames]

    def rebuild_class_buffers(self) -> None:
        check_prompts_fit(self.clip, self.templates(), self.class_prompt_names())

    def encode_classes(self) -> torch.Tensor:
        """The classifier ``W`` ``[C, D]``: per template normalised, averaged, normalised again."""
        return normalise(template_features(self.clip, self.templates(), self.class_prompt_names()))

    # -- logits ------------------------------------------------------------------------------------------------

    def affinity(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.cache_keys.to(features.dtype))

    def tip_logits(self, features: torch.Tensor, alpha: float, beta: float,
                   clip_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of L2-normalised ``features`` with the cache at ``alpha``/``beta``."""
        if clip_logits is None:
            clip_logits = CLIP_LOGIT_SCALE * features @ self.class_features().to(features.dtype).t()
        values = self.class_values().to(features.dtype)
        return clip_logits + cache_logits(self.affinity(features), values, beta) * alpha

    def class_values(self) -> torch.Tensor:
        """The cache values ``[N·K, C]`` for the current classes: the column of each class the cache was built
        with, zeros for a class it has not seen."""
        ids = class_ids(self.classnames)
        cached = self.cache_class_ids.tolist()
        if ids == cached:
            return self.cache_values
        values = self.cache_values.new_zeros(len(self.cache_values), len(ids))
        column = {c: i for i, c in enumerate(cached)}
        for j, c in enumerate(ids):
            if c in column:
                values[:, j] = self.cache_values[:, column[c]]
        return values

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        features = normalise(self.image_features_of(batch).float())
        return self.tip_logits(features, float(self.alpha), float(self.beta))

    # -- fitting on frozen features -------------------------------------------------------------------------------

    fits_on_features = True

    def fit_features(self, data) -> dict[str, Any]:
        """Build the cache from the training views, train the keys (Tip-Adapter-F), search α/β on val."""
        config = self.config
        views = data.views(0, config.augment_epoch)  # [A, N, D] raw features
        labels = data.labels.to(self.device)
        keys = normalise(views.float().mean(dim=0)).to(self.device)
        values = F.one_hot(labels, self.num_classes).float()
        self._set_cache(keys, values)
        self.alpha.fill_(float(config.init_alpha))
        self.beta.fill_(float(config.init_beta))
        summary: dict[str, Any] = {"cache_size": len(keys), "augment_epoch": config.augment_epoch}
        if self.trains_keys:
            summary.update(self._train_keys(data))
        if config.search:
            val_features, val_labels = data.split("val")
            val_features = normalise(val_features.float().to(self.device))
            with torch.no_grad():
                clip_logits = CLIP_LOGIT_SCALE * val_features @ self.class_features().t()
                found = search_alpha_beta(clip_logits, self.affinity(val_features), self.cache_values,
                                          val_labels.to(self.device), config.search_scale, config.search_step)
            self.alpha.fill_(found["alpha"])
            self.beta.fill_(found["beta"])
            summary["search"] = {"split": "val", "best_beta": found["beta"], "best_alpha": found["alpha"],
                                 "best_acc": found["acc"], "grid_size": [len(found["beta_list"]),
                                                                         len(found["alpha_list"])]}
            self.last_search = found
        summary["alpha"], summary["beta"] = float(self.alpha), float(self.beta)
        self.fit_summary = summary
        data.log_record({"event": "fit", **summary})
        return summary

    def _set_cache(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Install a cache (keys ``[N·K, D]``, values ``[N·K, C]``) built for the current classes."""
        if self.trains_keys:
            self.cache_keys = nn.Parameter(keys.clone())
        else:
            self.cache_keys = keys.clone()
        self.cache_values = values
        self.cache_class_ids = torch.tensor(class_ids(self.classnames), dtype=torch.long, device=values.device)

    def _train_keys(self, data) -> dict[str, Any]:
        """Tip-Adapter-F's training of the keys (card: AdamW, per-iteration cosine, init α/β, best-epoch reload)."""
        from ..train import make_optimizer

        config, train = self.config, data.config
        labels = data.labels.to(self.device)
        n = len(labels)
        orders = [data.batch_order(epoch, n) for epoch in range(train.max_epoch)]
        total = sum(len(order) for order in orders)
        optimizer = make_optimizer(self, train)
        select_features, select_labels = data.split(config.selection)
        select_features = normalise(select_features.float().to(self.device))
        alpha, beta = float(config.init_alpha), float(config.init_beta)
        best_acc, best_epoch, best_state = 0.0, None, None
        accs = []
        step = 0
        for epoch in range(train.max_epoch):
            self.train()
            features = normalise(data.views(config.augment_epoch + epoch, 1)[0].float().to(self.device))
            for batch_number, index in enumerate(orders[epoch], 1):
                lrs = []
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * (1 + math.cos(math.pi * step / total)) / 2
                    lrs.append(group["lr"])
                index = torch.as_tensor(index, dtype=torch.long, device=self.device)
                logits = self.tip_logits(features[index], alpha, beta)
                loss = F.cross_entropy(logits, labels[index])
                if not torch.isfinite(loss):
                    raise PromptClipError(f"{self.name}: the training loss became {float(loss)} at epoch "
                                          f"{epoch + 1}; try a lower learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = float(self.cache_keys.grad.norm())
                optimizer.step()
                step += 1
                hits = int((logits.argmax(dim=1) == labels[index]).sum())
                data.log_step({"epoch": epoch + 1, "step": step, "batch": batch_number,
                               "batches": len(orders[epoch]), "lr": lrs[0],
                               "loss": float(loss.detach()), "acc": 100 * hits / len(index),
                               "batch_size": len(index), "grad_norm": grad_norm})
            self.eval()
            with torch.no_grad():
                acc = accuracy(self.tip_logits(select_features, alpha, beta), select_labels)
            accs.append(acc)
            data.log_record({"event": "epoch", "epoch": epoch + 1, f"{config.selection}_acc": acc})
            data.on_epoch_end(epoch, self)
            if acc > best_acc:
                best_acc, best_epoch = acc, epoch
                best_state = self.cache_keys.detach().clone()
        note = {}
        if best_state is None:  # the reference has nothing to reload and fails; we keep the last epoch, and say so
            best_epoch = train.max_epoch - 1
            note = {"note": f"no epoch had a {config.selection} accuracy above 0; the last epoch's keys are kept "
                            "(the reference would fail to reload a best epoch)"}
        else:
            with torch.no_grad():
                self.cache_keys.copy_(best_state)
        return {"selection": config.selection, "selection_acc_per_epoch": accs, "best_epoch": best_epoch,
                "best_selection_acc": best_acc, "steps": step, **note}

    # -- adapter -------------------------------------------------------------------------------------------------

    def trainable_buffers(self):
        names = ("cache_values", "cache_class_ids", "alpha", "beta")
        if not self.trains_keys:
            names = ("cache_keys", *names)
        return ((n, getattr(self, n)) for n in names)

    def load_adapter_state(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        if "cache_keys" in state and "cache_values" in state:  # the cache's size is the training set's
            self._set_cache(state["cache_keys"].to(self.device), state["cache_values"].to(self.device))
            if "cache_class_ids" in state:
                self.cache_class_ids = state["cache_class_ids"].to(self.device).clone()
        super().load_adapter_state(state, strict)

    def num_trainable(self) -> int:
        return self.cache_keys.numel() if self.trains_keys else 0

    # -- presets -------------------------------------------------------------------------------------------------

    @classmethod
    def preset_for(cls, protocol: str, dataset: str, shots: int) -> str | None:
        """The reference's per-dataset config (``<method>/<dataset>``; bundled samples use their dataset's)."""
        from ..presets import PRESETS_DIR

        base = dataset.removesuffix("-sample")
        if (PRESETS_DIR / cls.name / f"{base}.yaml").exists():
            return f"{cls.name}/{base}"
        raise ConfigError(f"{cls.name}: the reference's hyperparameters are per dataset and there is none for "
                          f"{dataset!r}; choose one with --preset {cls.name}=<preset> (e.g. {cls.name}/caltech101)")

    # -- reference -----------------------------------------------------------------------------------------------

    _REFERENCE_KEYS: ClassVar[set[str]] = {
        "root_path", "load_cache", "load_pre_feat", "search_hp", "search_scale", "search_step", "init_beta",
        "init_alpha", "dataset", "shots", "backbone", "lr", "augment_epoch", "train_epoch", "cache_dir"}

    @classmethod
    def config_from_reference(cls, trainer: Mapping[str, Any]) -> TipAdapterConfig:
        """Our config for a reference ``configs/<dataset>.yaml`` (as a dict); ``templates`` may be given too."""
        options = reference_options(trainer, cls._REFERENCE_KEYS | {"templates"}, cls.name)
        return TipAdapterConfig(
            augment_epoch=int(options.get("augment_epoch", 10)), init_beta=float(options["init_beta"]),
            init_alpha=float(options["init_alpha"]), search=bool(options.get("search_hp", True)),
            search_scale=[float(v) for v in options["search_scale"]],
            search_step=[int(v) for v in options["search_step"]],
            templates=list(options["templates"]) if options.get("templates") else None,
            selection="test" if cls.trains_keys else "val")

    @classmethod
    def train_config_from_reference(cls, options: Mapping[str, Any], batch_size: int = 256, **overrides: Any):
        """The TrainConfig of a reference run (Tip-Adapter-F's AdamW: eps 1e-4, weight decay 0.01)."""
        from ..train import TrainConfig

        values = {"lr": float(options.get("lr", 0.001)), "max_epoch": int(options.get("train_epoch", 20)),
                  "batch_size": int(batch_size), "optimizer": "adamw", "adam_eps": 1e-4, "weight_decay": 0.01,
                  "warmup_epoch": 0}
        values.update(overrides)
        return TrainConfig(**values)

    def reference_name_map(self) -> dict[str, str]:
        return {"adapter.weight": "cache_keys"} if self.trains_keys else {}


@register
class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: the cache keys are trained (the reference's ``adapter.weight``)."""

    name = "tip_adapter_f"
    trains_keys = True
