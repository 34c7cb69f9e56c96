"""The method interface: one file per method, a config dataclass, a ``PromptMethod`` subclass and a registration.

A method owns its learnable tensors and its injection logic (through the backbone's hooks); the backbone is frozen
and shared. The trainable state is whatever has ``requires_grad`` — never selected by name substrings — and an
adapter file holds exactly those tensors.

Batches are dicts: ``image`` ``[B, 3, H, W]``, ``label`` ``[B]`` (training), plus per-sample extras such as
``caption``, and ``image_view2`` (a second augmented view, in training batches of methods with ``train_views = 2``).
Methods whose image features come from the frozen image tower unchanged (``frozen_image_features``)
may get ``image_features`` ``[B, D]`` instead of ``image`` at evaluation: the output of ``clip.encode_image`` for
those images, read from the feature cache (:mod:`promptclip.features`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..clip.model import CLIP
from ..clip.tokenizer import ContextLengthError
from ..data.classnames import check_classnames, prompt_too_long
from ..data.templates import check_template
from ..errors import ConfigError

#: Every registered method by name: the built-in ones and plugins (promptclip.methods.registry looks names up).
_REGISTRY: dict[str, type[PromptMethod]] = {}


def register(cls: type[PromptMethod]) -> type[PromptMethod]:
    """Class decorator adding a method to the registry under ``cls.name`` (built-in methods and plugins alike)."""
    if not isinstance(cls, type) or not issubclass(cls, PromptMethod):
        raise TypeError(f"{cls!r} is not a PromptMethod subclass")
    if not getattr(cls, "name", None) or not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
        raise TypeError(f"{cls.__name__} needs a `name` and a dataclass `config_class`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        other = _REGISTRY[cls.name]
        raise TypeError(f"method name {cls.name!r} is registered twice ({other.__module__}.{other.__qualname__} and "
                        f"{cls.__module__}.{cls.__qualname__}); give one of them another `name`")
    _REGISTRY[cls.name] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What is being evaluated, as the protocol (or ``eval``/``predict``) sees it; set on the method with
    :meth:`PromptMethod.set_eval_context` before an evaluation. Methods whose evaluation rule depends on it (DePT's
    fused head on the training classes only, MMRL's fused vs class-token logits) read it; the rest ignore it, so the
    rule is chosen by the protocol, never by a flag the user must remember.

    ``subsample``: ``base`` / ``new`` (the halves of base→novel), ``all`` (every class of the dataset).
    ``source``: the dataset the method was trained on (False for a cross-dataset or domain-generalisation target).
    ``protocol``: the protocol's name where one runs (``base2novel``, ``fewshot``, ...), else None.
    """

    subsample: Literal["base", "new", "all"] = "base"
    source: bool = True
    protocol: str | None = None

    @property
    def training_classes(self) -> bool:
        """Whether the classes evaluated are those the method was trained on."""
        return self.source and self.subsample != "new"


class PromptMethod(nn.Module):
    """Base class of all methods.

    Subclasses set ``name`` and ``config_class``, build their tensors in ``__init__`` (after calling
    ``super().__init__``) and finish it with ``self.set_classnames(classnames)``; they implement ``forward``.
    They override ``loss`` when the objective is not plain cross-entropy, ``rebuild_class_buffers`` when they
    hold class-dependent buffers, and ``encode_classes`` when their text features do not depend on the image
    (then eval caches them). A method whose image path is the plain frozen tower sets ``frozen_image_features``
    and gets its image features through :meth:`image_features_of`.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = type(None)
    #: False when a method needs visual prompt tokens (a ViT image tower).
    supports_resnet: ClassVar[bool] = True
    #: Text features independent of the image: eval computes them once per class set.
    image_independent_text: ClassVar[bool] = False
    #: Whether its learned text passes follow the text-memory policy (chunks, checkpoints: promptclip.memory), as
    #: :func:`promptclip.methods.prompts.encode_text_embeddings` does; the contract checks it unless False.
    follows_text_memory: ClassVar[bool] = True
    #: Class names go into text prompts (False for a method without a text side, e.g. the linear probe: no name can
    #: be too long for it).
    names_in_text: ClassVar[bool] = True
    #: Image features are ``clip.encode_image(image)``, untouched by learned tensors: eval may pass them precomputed
    #: (``batch["image_features"]``) from the feature cache, so each test image is encoded once per backbone.
    frozen_image_features: ClassVar[bool] = False
    #: Trainer class names of the reference implementations this method reproduces (parity goldens).
    reference_trainers: ClassVar[tuple[str, ...]] = ()
    #: Keys of a reference run's config outside its trainer options (a golden's ``cfg.<key>``: e.g. Dassl's ``LOSS``
    #: node, or a constant the reference hard-codes and a golden changes) that :meth:`config_from_reference` reads:
    #: whoever builds the config from a reference run passes them along with the trainer options, under these names.
    reference_cfg_keys: ClassVar[tuple[str, ...]] = ()
    #: Augmented views of each training image the method trains on: with 2, training datasets built for it (protocols,
    #: ``promptclip train``) yield ``image`` and ``image_view2``, two independent draws of the training augmentation
    #: (each seeded from (seed, epoch, index, view), so reproducible and resume-safe); evaluation always has one view.
    train_views: ClassVar[int] = 1
    #: The config field holding class descriptions (a bundled set name or a JSON file, promptclip.data.descriptions),
    #: or None for methods that use none. The CLI's ``--descriptions FILE`` sets that field, and every command checks
    #: that each class has a description before any weight loads.
    description_field: ClassVar[str | None] = None
    #: Dassl ``OPTIM`` options that the method's own config maps (:meth:`config_from_reference_cfg` reads them, e.g.
    #: DePT's staged learning rates): :func:`promptclip.train.train_config_from_dassl` leaves them to the method.
    reference_optim_options: ClassVar[tuple[str, ...]] = ()
    #: Entries of the whole ``TRAINER`` node outside the method's own (a golden's ``cfg.trainer_full``: CoPrompt's
    #: ``W`` and ``DISTILL``) that :meth:`config_from_reference` reads, passed along with the trainer options.
    reference_trainer_keys: ClassVar[tuple[str, ...]] = ()
    #: Presets shipped with the method (plugins; the built-in presets are YAML files in promptclip/presets/): preset
    #: name -> the preset's keys without ``method`` (``backbone``, ``method_config``, ``train``, ``eval``, ``source``)
    #: or the path of a YAML preset file (relative: to the file defining the class). Named ``<method>/<name>``; one
    #: named after a protocol is that protocol's default preset, ``default`` the default of the others.
    presets: ClassVar[Mapping[str, Mapping[str, Any] | str | Path]] = {}
    #: What the method trains on; protocols (``run``) and ``train`` build it from this, never from the method's name.
    #: ``"labeled"`` (default): the labelled (few-shot) training images of the training classes (base2novel: the base
    #: half). ``"unlabeled_all_classes"``: every training image of every class of the dataset, base and novel alike,
    #: without labels (batches have no ``label``; the shots setting does not apply, since drawing K images per class
    #: would use the labels) and the method is built on all the class names — PromptKD's transductive setting. Records
    #: of such runs say ``"unlabeled_novel_images": true`` in base2novel, and the report marks their rows: they saw
    #: the novel classes' (unlabelled) training images, so they are not comparable with labelled rows.
    train_data: ClassVar[Literal["labeled", "unlabeled_all_classes"]] = "labeled"
    #: The method distils a frozen teacher: a trained adapter of another method on its own backbone (e.g. PromptSRC
    #: on ViT-L/14), named by path in the method config's ``teacher`` field (``--teacher PATH`` on ``train``/``run``
    #: sets it; a preset may too). The method loads it with
    #: :func:`promptclip.checkpoint.load_teacher` (which loads the backbone the adapter names) and takes it with
    #: :meth:`set_teacher`; the run's config hash covers the teacher file's content.
    uses_teacher: ClassVar[bool] = False
    #: The protocols the method makes sense for (None: all). A grid cell of another protocol is marked "not
    #: applicable" before any cell runs, with ``not_applicable_reason``, and reported as such.
    protocols: ClassVar[tuple[str, ...] | None] = None
    not_applicable_reason: ClassVar[str] = ""
    #: Fitted by :meth:`fit_features` on frozen image features instead of the epoch loop (module
    #: :mod:`promptclip.feature_fit`): ``train.fit`` hands such a method the features of the augmented training
    #: views and of the evaluation splits.
    fits_on_features: ClassVar[bool] = False

    def __init__(self, backbone: CLIP, config: Any, classnames: list[str], template: str | None = None):
        super().__init__()
        #: The evaluation being run (:class:`EvalContext`); the default: the training classes of the training data.
        self.eval_context = EvalContext()
        #: Python-``random`` draws a method makes inside its training step (e.g. one of several class descriptions)
        #: come from this generator, never from the global one: ``fit`` reseeds it at every epoch from the run's
        #: seed and the epoch, so a resumed run draws what an uninterrupted one draws.
        self.train_rng = random.Random(0)
        self._train_draws: Iterator[int] | None = None
        if not self.supports_resnet and not backbone.is_vit:
            raise ConfigError(
                f"method {self.name!r} inserts visual prompt tokens and needs a ViT backbone; "
                "this backbone has a ResNet image tower (use a text-only method such as coop, cocoop or kgcoop)"
            )
        backbone.requires_grad_(False)
        self.clip = backbone.eval()
        self.config = config
        self.template = check_template(template) if template is not None else None
        self.classnames = check_classnames(classnames)
        #: The class names exactly as given (``classnames`` are normalised: ``_`` read as a space), for a method
        #: whose reference puts them into its prompts unchanged.
        self.given_classnames = list(classnames)
        self._text_cache: tuple[tuple[bool, torch.dtype], torch.Tensor] | None = None

    # -- class names ---------------------------------------------------------------------------------------------

    @property
    def batch_independent(self) -> bool:
        """Whether an image's logits are independent of the other images in its batch (the contract's default)."""
        return True

    def set_classnames(self, classnames: list[str], template: str | None = None) -> None:
        """Swap the class set (base → novel, cross-dataset) without touching learned tensors.

        Names are checked (:func:`promptclip.data.classnames.check_classnames`: none empty, none the same as another
        to the text encoder) and so is every prompt built from them: one over the text context names its class, and
        the method keeps its previous class set."""
        previous = (self.classnames, self.template, self.given_classnames)
        self.classnames = check_classnames(classnames)
        self.given_classnames = list(classnames)
        if template is not None:
            self.template = check_template(template)
        self._text_cache = None
        try:
            with torch.no_grad():
                self.rebuild_class_buffers()
        except ContextLengthError as err:
            error = prompt_too_long(err, self.classnames)
            if previous != (self.classnames, self.template, self.given_classnames):  # a swap: undo it
                self.classnames, self.template, self.given_classnames = previous
                with torch.no_grad():
                    self.rebuild_class_buffers()
            raise error from None

    def rebuild_class_buffers(self) -> None:
        """Recompute class-dependent, non-learned buffers (tokenized prompts, frozen embeddings). Every prompt a
        class name goes into must be tokenized here (or checked with :func:`.prompts.check_prompts_fit`), so that a
        class name too long for the text context fails here, naming the class, and not in the middle of a run."""

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def device(self) -> torch.device:
        return self.clip.token_embedding.weight.device

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def image_features_of(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The frozen tower's features ``[B, D]`` of the batch's images: ``batch["image_features"]`` when the
        batch carries them precomputed, else ``clip.encode_image(batch["image"])`` (methods with
        ``frozen_image_features`` only)."""
        if not self.frozen_image_features:
            raise TypeError(f"{self.name} does not declare frozen_image_features; its image path is its own")
        if "image_features" in batch:
            return batch["image_features"]
        return self.clip.encode_image(batch["image"])

    def encode_classes(self) -> torch.Tensor:
        """Text features ``[C, D]`` of the current classes (image-independent methods only)."""
        raise NotImplementedError(f"{self.name} has image-dependent text features")

    def class_features(self) -> torch.Tensor:
        """``encode_classes()``, cached while evaluating (no grad, eval mode).

        The cache is kept per autocast setting, so features computed in bf16 are never reused by an fp32 pass.
        """
        if self.training or torch.is_grad_enabled():
            self._text_cache = None
            return self.encode_classes()
        device_type = self.device.type
        precision = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        if self._text_cache is None or self._text_cache[0] != precision:
            self._text_cache = (precision, self.encode_classes())
        return self._text_cache[1]

    def loss(self, batch: Mapping[str, Any], logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training objective; ``loss`` is the total that is back-propagated, other keys are logged terms."""
        return {"loss": F.cross_entropy(logits, batch["label"].to(logits.device))}

    def set_eval_context(self, context: EvalContext) -> None:
        """Called before an evaluation with what is evaluated (:class:`EvalContext`). Methods whose evaluation
        depends on it override this and call ``super()``; clear any cached class features it affects."""
        self.eval_context = context
        self._text_cache = None

    # -- training extension points ---------------------------------------------------------------------------
    # What a method may change about how it is trained, each with the engine's default behaviour; ``fit`` stays one
    # loop and plugins use the same points as built-in methods.

    def training_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training forward: ``(logits, loss terms)`` (``loss`` is back-propagated). Default: ``forward`` then
        :meth:`loss`. ``logits`` give the batch's training accuracy (against ``batch["label"]`` when present)."""
        logits = self(batch)
        return logits, self.loss(batch, logits)

    def backward(self, losses: Mapping[str, torch.Tensor], scale: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Fill the ``.grad`` of the trainable tensors from the step's loss terms. ``scale`` is the mixed-precision
        loss scaling (identity without it): apply it to whatever is back-propagated. Default:
        ``scale(losses["loss"]).backward()``. A custom gradient (e.g. ProGrad's projection) overrides this."""
        scale(losses["loss"]).backward()

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups: dicts with ``params`` (trainable tensors, together every trainable tensor
        exactly once) and optionally ``lr`` (the group's base learning rate, in place of the run's ``lr``; or a
        function of the run's ``lr`` returning it, for a rate derived from it in a given float order) or
        ``lr_mult`` (a factor on it); other keys are passed to the optimizer. The schedule (warm-up, cosine) applies
        to every group's base rate. Default: one group of every trainable tensor."""
        return [{"params": [p for _, p in self.named_trainable()]}]

    def build_optimizer(self, groups: list[dict[str, Any]], config: Any) -> torch.optim.Optimizer | None:
        """An optimizer of the method's own over ``groups`` (each with its ``lr`` set), or None (default) for the
        run's ``TrainConfig.optimizer`` (SGD, Adam or AdamW, as Dassl builds them)."""
        return None

    def train_randint(self, low: int, high: int) -> int:
        """A Python-random integer in ``low .. high`` (both included) drawn inside the training step: from
        :attr:`train_rng`, or the next value given to :meth:`set_train_draws` while those last."""
        if self._train_draws is not None:
            value = next(self._train_draws, None)
            if value is not None:
                if not low <= int(value) <= high:
                    raise ConfigError(f"a replayed draw is {value}, outside {low} .. {high}")
                return int(value)
            self._train_draws = None
        return self.train_rng.randint(low, high)

    def set_train_draws(self, values: Iterable[int] | None) -> None:
        """Replay recorded draws (e.g. a reference run's ``random.randint`` values, for parity): the next calls of
        :meth:`train_randint` return them in order, then draw from :attr:`train_rng` again. None: stop replaying."""
        self._train_draws = iter([int(v) for v in values]) if values is not None else None

    def lr_schedule(self, base_lr: float, step: int, total_steps: int, epoch: int, config: Any) -> float | None:
        """The learning rate of a group with base rate ``base_lr`` for optimizer step ``step`` (0-based over the run,
        of ``total_steps``; ``epoch`` 0-based), set before every step: a per-iteration schedule of the method's own
        (e.g. cosine per iteration). None (default): the run's per-epoch schedule (Dassl's warm-up, then cosine over
        epochs, set at the start of each epoch)."""
        return None

    def trainable_buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Non-parameter tensors that training updates and the adapter must carry (e.g. BatchNorm running
        statistics of a trained module). Saved in adapters and training states with the parameters."""
        return iter(())

    def set_teacher(self, teacher: PromptMethod) -> None:
        """Take ``teacher`` (a frozen, trained method on its own backbone) as the model to distil (methods with
        ``uses_teacher`` only). It follows the method's class names (``set_classnames``) and stays in eval mode."""
        raise ConfigError(f"method {self.name!r} does not use a teacher")

    def fit_features(self, data: Any) -> dict[str, Any]:
        """Fit without the epoch loop (methods with ``fits_on_features``): ``data`` is a
        :class:`promptclip.feature_fit.FeatureFitData` (training-view features, labels, evaluation splits, batch
        order, the run's TrainConfig, step logging). Everything learned must end up in the adapter state
        (parameters and :meth:`trainable_buffers`); returns a JSON summary (e.g. a hyperparameter search's result),
        stored in the adapter's JSON and the run's history."""
        raise NotImplementedError(f"{self.name} is trained by the epoch loop, not fit_features")

    # -- training hooks ------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> PromptMethod:
        super().train(mode)
        self.clip.eval()  # the backbone is frozen: BatchNorm statistics of ResNet towers never update
        self._text_cache = None
        return self

    def on_train_start(self, max_epoch: int) -> None:
        """Called by the trainer before the first epoch: reject settings that cannot work for this run length."""

    def on_epoch_end(self, epoch: int, max_epoch: int) -> None:
        """Called by the trainer after each epoch (0-based ``epoch``), e.g. for prompt aggregation."""

    def on_train_end(self) -> None:
        """Called once after the last epoch, before the final adapter is saved."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Non-parameter tensors that a resumed run needs (not part of the adapter), e.g. running aggregates."""
        return {}

    def load_extra_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ConfigError(f"method {self.name!r} has no extra state, got {', '.join(state)}")

    # -- adapter -------------------------------------------------------------------------------------------------

    def named_trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The method's learnable tensors (and :meth:`trainable_buffers`) only, never a backbone tensor."""
        state = {n: p.detach().clone() for n, p in self.named_trainable()}
        state.update({n: b.detach().clone() for n, b in self.trainable_buffers()})
        return state

    def load_adapter_state(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        params = dict(self.named_trainable())
        params.update(dict(self.trainable_buffers()))
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if strict and (missing or unexpected):
            raise ConfigError(
                f"adapter does not fit method {self.name!r}: "
                f"missing {missing or 'none'}; unexpected {unexpected or 'none'}"
            )
        with torch.no_grad():
            for n, value in state.items():
                if n not in params:
                    continue
                if params[n].shape != value.shape:
                    raise ConfigError(
                        f"adapter tensor {n!r} has shape {tuple(value.shape)}, method expects {tuple(params[n].shape)}"
                    )
                params[n].copy_(value)
        self._text_cache = None

    # -- presets -------------------------------------------------------------------------------------------------

    @classmethod
    def preset_for(cls, protocol: str, dataset: str, shots: int) -> str | None:
        """The official preset (``<method>/<name>``) for a protocol's cell, where the reference's settings depend on
        the dataset or shots; None (default): the method's ``protocol``/``default`` preset as usual."""
        return None

    # -- reference implementations -------------------------------------------------------------------------------

    @classmethod
    def config_from_reference(cls, trainer: Mapping[str, Any]) -> Any:
        """Our config for a reference run's trainer options (``cfg.TRAINER.<NAME>`` of its Dassl config), plus the
        run's config entries named by :attr:`reference_cfg_keys` (under those names) where it has them."""
        raise NotImplementedError(f"{cls.name} has no reference implementation")

    @classmethod
    def config_from_reference_cfg(cls, cfg: Mapping[str, Any]) -> Any:
        """Our config for a reference run as a golden records its Dassl config: ``trainer`` (the method's
        ``cfg.TRAINER.<NAME>`` node), ``trainer_full`` (the whole ``TRAINER`` node, where a golden has it), ``optim``
        (``cfg.OPTIM``), ``dataset_name``. Default: :meth:`config_from_reference` of ``trainer``; methods with options
        outside their trainer node (DePT's linear-probe head and staged learning rates) override this; entries named by
        :attr:`reference_cfg_keys` (of ``cfg``) and :attr:`reference_trainer_keys` (of ``trainer_full``) are passed
        along with the trainer options."""
        options = dict(cfg["trainer"])
        options.update({key: cfg[key] for key in cls.reference_cfg_keys if key in cfg})
        full = cfg.get("trainer_full", {})
        options.update({key: full[key] for key in cls.reference_trainer_keys if key in full})
        return cls.config_from_reference(options)

    def reference_name_map(self) -> dict[str, str]:
        """Reference parameter name (as its ``named_parameters()`` spells it) → our parameter name."""
        raise NotImplementedError(f"{self.name} has no reference implementation")

    def reference_buffer_map(self) -> dict[str, str]:
        """Reference buffer name → ours, for the :meth:`trainable_buffers` a reference checkpoint saves (e.g.
        BatchNorm running statistics); imported with the parameters. Default: none."""
        return {}

    def reference_loss_terms(self, terms: Mapping[str, float]) -> dict[str, float]:
        """Our logged loss terms (``loss`` keys of :meth:`loss`, as floats) under the names the reference trainer
        reports them (its ``loss_summary``), for the terms it reports besides the total loss and accuracy."""
        return {}

    def num_trainable(self) -> int:
        return sum(p.numel() for _, p in self.named_trainable())


def reference_options(trainer: Mapping[str, Any], known: set[str], method: str) -> dict[str, Any]:
    """The reference trainer options, rejecting keys this mapping does not know (so none is silently ignored).

    ``PREC`` is always accepted: precision is our engine's policy, not a method option.
    """
    unknown = sorted(set(trainer) - known - {"PREC"})
    if unknown:
        raise ConfigError(f"{method}: reference option(s) {', '.join(unknown)} have no mapping in promptclip")
    return dict(trainer)


def cosine_logits(clip: CLIP, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """``logit_scale.exp() * cos`` for shared text features ``[C, D]`` or per-image ones ``[B, C, D]``."""
    image_feats = image_feats / image_feats.norm(dim=-1, keepdim=True)
    text_feats = text_feats / text_feats.norm(dim=-1, keepdim=True)
    scale = clip.logit_scale.exp()
    if text_feats.dim() == 3:
        return scale * torch.einsum("bd,bcd->bc", image_feats, text_feats)
    return scale * image_feats @ text_feats.t()
