"""PromptSRC (Khattak, Wasim et al., ICCV 2023): IVLP prompts regularised towards frozen CLIP, with Gaussian
prompt aggregation (muzairkhattak/PromptSRC ``trainers/promptsrc.py``, same ``clip/model.py`` blocks as IVLP).

Prompts: the IVLP backbone of ``ivlp.py`` (official: 4 text + 4 vision tokens, depth 9 / 9).

Frozen teachers:

- image: the unprompted image tower of the same frozen backbone, ``f~(x)``;
- text: for each class, the mean over PromptSRC's 60 ImageNet templates of the frozen text features — the
  reference averages the raw (unnormalised) features, then L2-normalises the mean — ``g~``. Computed lazily at the
  first training loss (it is only needed for training) and dropped on ``set_classnames``.

Loss (reference ``forward_backward``), with normalised prompted text / image features ``g_p`` / ``f_p`` and
logits ``z_p`` (scale ``logit_scale.exp()``), ``z~ = scale * f~ g~^T``::

    loss = CE(z_p, y) + (KL + text_weight * L1(g_p, g~) + image_weight * L1(f_p, f~))
    KL   = sum(softmax(z~) * (log_softmax(z~) - log_softmax(z_p))) / numel(z_p)       (temperature 1)

with L1 the element mean. The loss needs the prompted features of the training forward: ``forward`` stashes them
on the method (``self._train_outputs``) in train mode, and ``loss`` consumes them, so ``loss(batch, logits)`` must
follow ``forward(batch)`` on the same batch.

GPA: after epoch e (1-based, of E), accumulate ``w_e * theta_e`` with ``w_e = N(e; mu, sigma^2) / sum_k N(k; mu,
sigma^2)`` over the trainable prompts; ``on_train_end`` loads the sum. The running sum lives in ``extra_state`` so
a resumed run continues exactly. Settings whose weights make GPA a no-op (all mass on the final epoch), or that
underflow / sit entirely outside the epoch range, are rejected (PromptSRC issue #17: an ablation that silently did
nothing).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import reference_options, register
from .ivlp import IVLP
from .prompts import check_prompts_fit, template_features

#: Mass above which the Gaussian weights count as sitting on a single epoch.
GPA_CONCENTRATED = 0.999


def promptsrc_templates() -> list[str]:
    """The 60 templates of PromptSRC's text teacher (``trainers/imagenet_templates.py`` of muzairkhattak/PromptSRC,
    shipped as data in ``promptclip.data.templates``)."""
    from ..data.templates import PROMPTSRC_TEMPLATES

    return list(PROMPTSRC_TEMPLATES)


def gpa_weights(mean: float, std: float, max_epoch: int) -> torch.Tensor:
    """Normalised Gaussian weights of epochs 1..max_epoch (float64), as the reference computes them."""
    if std <= 0:
        raise ConfigError(f"promptsrc: gpa_std must be positive, got {std}")
    if max_epoch < 1:
        raise ConfigError(f"promptsrc: GPA needs at least one epoch, got max_epoch={max_epoch}")
    epochs = torch.arange(1, max_epoch + 1, dtype=torch.float64)
    density = torch.exp(-0.5 * ((epochs - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    total = density.sum()
    if not total > 0:
        raise ConfigError(
            f"promptsrc: GPA weights N(e; mean={mean}, std={std}) underflow to zero for every epoch 1..{max_epoch}; "
            "put gpa_mean inside the epoch range or widen gpa_std"
        )
    return density / total


def check_gpa(mean: float, std: float, max_epoch: int) -> torch.Tensor:
    """The GPA weights; a warning when they put (almost) all their weight on one epoch, so that the aggregate is
    that epoch's prompts (SPEC: a knob that does nothing is rejected or warned about; it is warned here because the
    reference runs such settings, e.g. the official mean 15 in a shortened run, and replays of it must too)."""
    weights = gpa_weights(mean, std, max_epoch)
    top = int(weights.argmax())
    if weights[top] >= GPA_CONCENTRATED:
        share = weights[top].item()
        if top == max_epoch - 1:
            what = (f"puts {share:.6f} of its weight on the last epoch, so the result is the final prompts, as "
                    "without GPA (the reference computes the same); say gpa: false for that")
        elif not 1 <= mean <= max_epoch:
            what = f"lies outside epochs 1..{max_epoch} and reduces to the prompts of epoch {top + 1} ({share:.6f})"
        else:
            what = f"reduces to the prompts of epoch {top + 1} (weight {share:.6f}): a snapshot, not an aggregate"
        warnings.warn(f"promptsrc: GPA with mean={mean}, std={std} over {max_epoch} epochs {what}; move gpa_mean "
                      "inside the epoch range or widen gpa_std for an aggregate", stacklevel=2)
    return weights


@dataclass
class PromptSRCConfig:
    n_ctx_text: int = 4
    n_ctx_vision: int = 4
    #: Init words of the text context (used when n_ctx_text <= 4); the prompt string keeps all of them.
    ctx_init: str = "a photo of a"
    depth_text: int = 9
    depth_vision: int = 9
    #: Weight of L1(prompted text features, teacher text features) (the reference's TEXT_LOSS_WEIGHT).
    text_loss_weight: float = 25.0
    #: Weight of L1(prompted image features, frozen image features) (IMAGE_LOSS_WEIGHT).
    image_loss_weight: float = 10.0
    #: Weight of the KL term on the logits (1 in the reference, not configurable there).
    logits_loss_weight: float = 1.0
    #: Gaussian prompt aggregation over epochs; false uses the final prompts.
    gpa: bool = True
    gpa_mean: float = 15.0
    gpa_std: float = 1.0
    init_std: float = 0.02
    #: Seed of the random prompt init (explicit; independent of any global RNG).
    init_seed: int = 0
    #: Classes per text-encoder chunk (None: the engine's automatic chunking, promptclip.memory).
    text_chunk_size: int | None = None


@register
class PromptSRC(IVLP):
    name = "promptsrc"
    config_class = PromptSRCConfig
    reference_trainers = ("PromptSRC",)

    def __init__(self, backbone, config: PromptSRCConfig, classnames, template=None):
        if config.gpa and config.gpa_std <= 0:
            raise ConfigError(f"promptsrc: gpa_std must be positive, got {config.gpa_std}")
        super().__init__(backbone, config, classnames, template)
        self._train_outputs: dict[str, torch.Tensor] | None = None
        self._reset_gpa()

    # -- teachers ------------------------------------------------------------------------------------------------

    def rebuild_class_buffers(self) -> None:
        super().rebuild_class_buffers()
        check_prompts_fit(self.clip, promptsrc_templates(), self.classnames)  # the teacher is encoded lazily
        self.register_buffer("teacher_text", None, persistent=False)

    def teacher_text_features(self) -> torch.Tensor:
        """``g~``: L2-normalised mean over the 60 templates of the frozen (unnormalised) text features ``[C, D]``."""
        if self.teacher_text is None:
            with torch.no_grad():
                mean = template_features(self.clip, promptsrc_templates(), self.classnames, normalize_each=False)
                self.teacher_text = mean.float()
        return self.teacher_text / self.teacher_text.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def teacher(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen CLIP's normalised image features ``f~`` and logits ``z~ = scale * f~ g~^T``."""
        zs_image = self.clip.encode_image(images)
        zs_image = zs_image / zs_image.norm(dim=-1, keepdim=True)
        teacher_text = self.teacher_text_features()
        return zs_image, self.clip.logit_scale.exp() * zs_image @ teacher_text.t().to(zs_image.dtype)

    # -- forward and loss ----------------------------------------------------------------------------------------

    def forward(self, batch) -> torch.Tensor:
        image = self.encode_image(batch["image"])
        text = self.class_features()
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        logits = self.clip.logit_scale.exp() * image @ text.t()
        # The regularisers need the prompted features of this forward; ``loss`` consumes them.
        self._train_outputs = {"image": image, "text": text} if self.training else None
        return logits

    def loss(self, batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._train_outputs is None:
            raise RuntimeError("promptsrc: loss() needs the training forward of the same batch (call it in train mode)")
        outputs, self._train_outputs = self._train_outputs, None
        config = self.config
        labels = batch["label"].to(logits.device)
        loss_ce = F.cross_entropy(logits, labels)
        teacher_text = self.teacher_text_features()
        zs_image, zs_logits = self.teacher(batch["image"])
        loss_text = F.l1_loss(outputs["text"], teacher_text.to(outputs["text"].dtype)) * config.text_loss_weight
        loss_image = F.l1_loss(outputs["image"], zs_image.to(outputs["image"].dtype)) * config.image_loss_weight
        kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(zs_logits.to(logits.dtype), dim=1),
                      reduction="sum", log_target=True) / logits.numel()
        loss_logits = kl * config.logits_loss_weight
        total = loss_ce + (loss_logits + loss_text + loss_image)
        return {
            "loss": total,
            "loss_ce": loss_ce.detach(),
            "loss_scl_text": loss_text.detach(),
            "loss_scl_image": loss_image.detach(),
            "loss_scl_logits": loss_logits.detach(),
        }

    # -- Gaussian prompt aggregation -----------------------------------------------------------------------------

    def _reset_gpa(self) -> None:
        self._gpa_sum: dict[str, torch.Tensor] | None = None
        self._gpa_epochs: list[int] = []
        self._gpa_max_epoch: int | None = None

    def gpa_weights(self, max_epoch: int) -> torch.Tensor:
        """This config's checked GPA weights for a run of ``max_epoch`` epochs (call before training to fail early)."""
        return check_gpa(self.config.gpa_mean, self.config.gpa_std, max_epoch)

    def on_train_start(self, max_epoch: int) -> None:
        if self.config.gpa:
            self.gpa_weights(max_epoch)

    def on_epoch_end(self, epoch: int, max_epoch: int) -> None:
        if not self.config.gpa:
            return
        if self._gpa_max_epoch is not None and self._gpa_max_epoch != max_epoch:
            raise ConfigError(
                f"promptsrc: GPA was accumulated for {self._gpa_max_epoch} epochs, now max_epoch={max_epoch}"
            )
        if epoch in self._gpa_epochs:
            raise RuntimeError(f"promptsrc: epoch {epoch} was already added to the GPA aggregate")
        if not 0 <= epoch < max_epoch:
            raise ValueError(f"promptsrc: epoch {epoch} is outside 0..{max_epoch - 1}")
        weights = gpa_weights(self.config.gpa_mean, self.config.gpa_std, max_epoch)  # checked by on_train_start
        weight = weights[epoch].item()
        with torch.no_grad():
            params = dict(self.named_trainable())
            if self._gpa_sum is None:
                self._gpa_sum = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
            for n, p in params.items():
                self._gpa_sum[n] += weight * p.detach().double()
        self._gpa_epochs.append(epoch)
        self._gpa_max_epoch = max_epoch

    def on_train_end(self) -> None:
        if not self.config.gpa or self._gpa_sum is None:
            return
        weights = gpa_weights(self.config.gpa_mean, self.config.gpa_std, self._gpa_max_epoch)
        added = weights[self._gpa_epochs].sum().item()
        scale = 1.0
        if len(self._gpa_epochs) != self._gpa_max_epoch:
            missing = sorted(set(range(self._gpa_max_epoch)) - set(self._gpa_epochs))
            if added <= 0:
                warnings.warn(f"promptsrc: GPA aggregate is empty (epochs {missing} missing); keeping the final "
                              "prompts", stacklevel=2)
                return
            warnings.warn(f"promptsrc: GPA is missing epochs {missing}; renormalising over the epochs it has",
                          stacklevel=2)
            scale = 1.0 / added
        with torch.no_grad():
            for n, p in self.named_trainable():
                p.copy_((self._gpa_sum[n] * scale).to(p.dtype))
        self._text_cache = None

    def extra_state(self) -> dict[str, torch.Tensor]:
        if not self.config.gpa or self._gpa_sum is None:
            return {}
        state = {f"gpa_sum.{n}": t.clone() for n, t in self._gpa_sum.items()}
        state["gpa_epochs"] = torch.tensor(self._gpa_epochs, dtype=torch.long)
        state["gpa_max_epoch"] = torch.tensor(self._gpa_max_epoch, dtype=torch.long)
        return state

    def load_extra_state(self, state) -> None:
        self._reset_gpa()
        if not state:
            return
        if not self.config.gpa:
            raise ConfigError("promptsrc: the saved state holds a GPA aggregate but this config has gpa: false")
        params = dict(self.named_trainable())
        expected = {f"gpa_sum.{n}" for n in params} | {"gpa_epochs", "gpa_max_epoch"}
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ConfigError(
                "promptsrc: the saved GPA state does not fit this method: "
                f"missing {missing or 'none'}; unexpected {unexpected or 'none'}"
            )
        device = next(iter(params.values())).device
        self._gpa_sum = {n: state[f"gpa_sum.{n}"].to(device=device, dtype=torch.float64).clone() for n in params}
        for n, p in params.items():
            if self._gpa_sum[n].shape != p.shape:
                raise ConfigError(f"promptsrc: saved GPA tensor {n!r} has shape {tuple(self._gpa_sum[n].shape)}")
        self._gpa_epochs = [int(e) for e in state["gpa_epochs"].tolist()]
        self._gpa_max_epoch = int(state["gpa_max_epoch"])

    # -- reference -----------------------------------------------------------------------------------------------

    REFERENCE_KEYS = IVLP.REFERENCE_KEYS | {"TEXT_LOSS_WEIGHT", "IMAGE_LOSS_WEIGHT", "GPA_MEAN", "GPA_STD"}
    REFERENCE_DEFAULTS = {"N_CTX_TEXT": 4, "N_CTX_VISION": 4, "CTX_INIT": "a photo of a", "PROMPT_DEPTH_TEXT": 9,
                          "PROMPT_DEPTH_VISION": 9}

    def reference_loss_terms(self, terms) -> dict[str, float]:
        regularisers = ("loss_scl_text", "loss_scl_image", "loss_scl_logits")
        return {"loss_ce": terms["loss_ce"], "loss_scl_text": terms["loss_scl_text"],
                "loss_scl_image": terms["loss_scl_image"], "L_SCL_logits": terms["loss_scl_logits"],
                "L_SCL": sum(terms[k] for k in regularisers)}

    @classmethod
    def config_from_reference(cls, trainer) -> PromptSRCConfig:
        opts = reference_options(trainer, cls.REFERENCE_KEYS, cls.name)
        return PromptSRCConfig(
            **cls._common_from_reference(opts),
            text_loss_weight=float(opts.get("TEXT_LOSS_WEIGHT", 25)),
            image_loss_weight=float(opts.get("IMAGE_LOSS_WEIGHT", 10)),
            gpa_mean=float(opts.get("GPA_MEAN", 15)),
            gpa_std=float(opts.get("GPA_STD", 1)),
        )
