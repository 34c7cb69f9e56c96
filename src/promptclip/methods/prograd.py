"""ProGrad (Zhu, Niu, Han, Wu, Zhang, ICCV 2023): CoOp whose update never goes against zero-shot CLIP's knowledge.

Reference: BeierZhu/Prompt-align ``ProGrad.public/trainers/prograd.py`` and the projection in its bundled Dassl
(``Dassl.ProGrad.pytorch/dassl/engine/trainer.py``, ``prograd_backward_and_update``); card:
tests/golden/methods/prograd.md. The prompt is CoOp's (this class reuses :class:`CoOp`); every step takes two
gradients:

- ``g_ce`` of the cross-entropy of the prompted logits, and
- ``g_kl`` of ``T^2 * mean_i sum_c -softmax(z0_i / T)_c log_softmax(z_i / T)_c`` (soft cross-entropy to zero-shot
  CLIP's logits ``z0``, whose gradient is the KL divergence's);

then, per trainable tensor, with ``k = g_kl / ||g_kl||``: if ``cos(g_ce, g_kl) < 0`` the update uses
``g_ce - lambda * <g_ce, k> k``, else ``g_ce`` (:meth:`ProGrad.backward`; the optimizer's weight decay and momentum come
after it, unprojected). No total loss is formed: ``loss`` is the cross-entropy (what the reference reports as
``xe_loss``).

Reference behaviour kept:

- ``CTX_INIT`` is a switch: its value is never read. The init words are the dataset's ProGrad template without
  " {}." (EuroSAT: "a centered satellite photo of"); with ``m`` words, ``ctx`` is ``n_ctx`` rows of which the first
  ``n_ctx - m`` are exactly zero and the last ``m`` the embeddings of the first ``m`` *tokens* of the words; the
  prompt is "X" * (n_ctx - m) + the words + class name, so tokens beyond ``m`` stay frozen prompt tokens;
- the zero-shot teacher uses ProGrad's own templates (e.g. "a type of pet, a photo of a {}."), which differ from
  CoOp's; given a dataset's CoOp template, the method uses ProGrad's for the same dataset (:data:`PROGRAD_TEMPLATES`);
- a base-to-novel or cross-dataset swap rebuilds the prompt sentence (and the teacher) from the new template, as the
  reference rebuilds its trainer: the learned ``ctx`` stays.

For a template ProGrad has no entry for (custom datasets) the teacher uses that template and the init words are the
words before its class slot (an extension: the reference only knows its 15 datasets).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data.templates import CUSTOM_TEMPLATES, check_template
from ..errors import ConfigError
from .base import PromptMethod, cosine_logits, reference_options, register
from .coop import CoOp, context_vectors
from .prompts import check_prompts_fit, frozen_class_features, init_words_embedding, placeholder_prefix

#: ProGrad's per-dataset zero-shot templates (the reference's ``CUSTOM_TEMPLATES``; its init words come from them).
PROGRAD_TEMPLATES = {
    "OxfordPets": "a type of pet, a photo of a {}.",
    "OxfordFlowers": "a type of flower, a photo of a {}.",
    "FGVCAircraft": "a type of aircraft, a photo of a {}.",
    "DescribableTextures": "a texture of {}.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a type of food, a photo of {}.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}
#: The same, keyed by the CoOp template a dataset hands to the method (CoOp's "a photo of a {}." is several datasets'
#: template; ProGrad's is "a photo of a {}." for all of them).
_PROGRAD_FOR = {CUSTOM_TEMPLATES[name]: template for name, template in PROGRAD_TEMPLATES.items()}


@dataclass
class ProGradConfig:
    n_ctx: int = 16
    #: The reference's ``CTX_INIT`` switch: True initialises the last context rows from the words of the dataset's
    #: ProGrad template (the rest exactly zero); False draws ``n_ctx`` vectors from N(0, ``init_std``).
    ctx_init: bool = True
    class_token_position: Literal["end", "middle", "front"] = "end"
    #: Class-specific context (random init only, as in the reference).
    csc: bool = False
    #: ``LOSS.LAMBDA``: how much of ``g_ce``'s component against ``g_kl`` is removed (1.0; 0.8 in the README for 8 and
    #: 16 shots on Flowers102, DTD and EuroSAT).
    lambda_: float = 1.0
    #: ``LOSS.T``: temperature of the distillation term.
    temperature: float = 1.0
    #: Zero-shot teacher template; "" uses ProGrad's template for the dataset whose template the method was given.
    zs_template: str = ""
    init_std: float = 0.02
    #: Seed of the random context init (explicit; independent of any global RNG).
    init_seed: int = 0
    #: Classes per text-encoder chunk (None: the engine's automatic chunking, promptclip.memory).
    text_chunk_size: int | None = None


def init_words(template: str) -> str:
    """The reference's init words of a template: without its " {}." (or, for templates the reference does not have,
    the words before the class slot), ``_`` read as a space."""
    words = template.replace(" {}.", "") if " {}." in template else template.split("{}")[0]
    return words.replace("_", " ").strip()


@register
class ProGrad(CoOp):
    name = "prograd"
    config_class = ProGradConfig
    reference_trainers = ("ProGrad",)
    #: The projection strength and temperature are Dassl's ``LOSS`` node (a golden's ``cfg.loss``).
    reference_cfg_keys = ("loss",)

    def __init__(self, backbone, config: ProGradConfig, classnames, template=None):
        PromptMethod.__init__(self, backbone, config, classnames, template)
        if config.zs_template:
            check_template(config.zs_template, "prograd: zs_template")
        if config.lambda_ < 0 or config.temperature <= 0:
            raise ConfigError(f"prograd: lambda_ must be >= 0 and temperature > 0, got {config.lambda_}, "
                              f"{config.temperature}")
        if config.n_ctx < 1:
            raise ConfigError(f"prograd: n_ctx must be at least 1, got {config.n_ctx}")
        if config.ctx_init:
            words = self._init_words()
            count = len(words.split(" "))
            ctx = torch.zeros(config.n_ctx, backbone.text.width)
            ctx[config.n_ctx - count:] = init_words_embedding(backbone, words)[:count]
        else:
            ctx, _ = context_vectors(backbone, config.n_ctx, "", config.csc, len(classnames), config.init_std,
                                     config.init_seed)
        self.ctx = nn.Parameter(ctx)
        self._last_image_features: torch.Tensor | None = None
        #: Per trainable tensor, what the last :meth:`backward` computed: ``cos``, ``fired`` (projected or not).
        self.last_projection: dict[str, dict[str, float | bool]] = {}
        self.set_classnames(classnames, template)

    @property
    def zs_template(self) -> str:
        """``zs_template`` if set, else ProGrad's template for the dataset whose CoOp template the method was given."""
        if self.config.zs_template:
            return self.config.zs_template
        return _PROGRAD_FOR.get(self.template, self.template) if self.template else "a photo of a {}."

    def _init_words(self) -> str:
        words = init_words(self.zs_template)
        count = len(words.split(" "))
        if not words or count > self.config.n_ctx:
            raise ConfigError(f"prograd: ctx_init takes its words from the template {self.zs_template!r}: "
                              f"{words!r} is {count} words, n_ctx is {self.config.n_ctx} (it must be at least the "
                              "word count; or set ctx_init false)")
        return words

    @property
    def prefix_text(self) -> str:
        """The prompt words the context stands for: "X" per context row not taken by the init words, then them."""
        if not self.config.ctx_init:
            return placeholder_prefix(self.n_ctx)
        words = self._init_words()
        return f"{placeholder_prefix(self.n_ctx - len(words.split(' ')))} {words}".strip()

    def rebuild_class_buffers(self) -> None:
        super().rebuild_class_buffers()
        check_prompts_fit(self.clip, [self.zs_template], self.classnames)
        # The teacher's features: computed at the first training loss (evaluation never needs them).
        self.register_buffer("_zs_text_features", None, persistent=False)

    @property
    def zs_text_features(self) -> torch.Tensor:
        """L2-normalised zero-shot CLIP features ``[C, D]`` of ``zs_template`` for the current classes (fp32)."""
        if self._zs_text_features is None:
            self._zs_text_features = frozen_class_features(self.clip, self.zs_template, self.classnames)
        return self._zs_text_features

    def forward(self, batch) -> torch.Tensor:
        image_features = self.image_features_of(batch)
        self._last_image_features = image_features  # the teacher of ``loss`` sees the same images
        return cosine_logits(self.clip, image_features, self.class_features())

    def zero_shot_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            return cosine_logits(self.clip, image_features.float(), self.zs_text_features)

    def loss(self, batch, logits) -> dict[str, torch.Tensor]:
        image_features, self._last_image_features = self._last_image_features, None
        if image_features is None:
            raise RuntimeError("prograd: call the method on the batch before loss() (the teacher needs its images)")
        teacher = self.zero_shot_logits(image_features)
        xe = F.cross_entropy(logits, batch["label"].to(logits.device))
        t = self.config.temperature
        soft = -F.softmax(teacher / t, dim=-1) * F.log_softmax(logits.float() / t, dim=-1) * t * t
        kl = soft.sum(1).mean()
        return {"loss": xe, "xe_loss": xe, "kl_loss": kl}

    def backward(self, losses: Mapping[str, torch.Tensor], scale: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """ProGrad's update direction in ``.grad``: the cross-entropy gradient, projected per tensor where it points
        against the distillation gradient (module docstring). Both gradients carry the same loss scale, so the
        decision and the projection are unchanged by it."""
        named = [(n, p) for n, p in self.named_trainable()]
        params = [p for _, p in named]
        g_kl = torch.autograd.grad(scale(losses["kl_loss"]), params, retain_graph=True, allow_unused=True)
        g_ce = torch.autograd.grad(scale(losses["loss"]), params, allow_unused=True)
        self.last_projection = {}
        for (name, param), ce, kl in zip(named, g_ce, g_kl, strict=True):
            if ce is None:
                continue
            grad, self.last_projection[name] = ce, {"cos": float("nan"), "fired": False}
            if kl is not None:
                grad, self.last_projection[name] = self.project(ce, kl)
            param.grad = grad if param.grad is None else param.grad + grad

    def project(self, g_ce: torch.Tensor, g_kl: torch.Tensor) -> tuple[torch.Tensor, dict[str, float | bool]]:
        """``g_ce`` without ``lambda_`` of its component along ``g_kl`` when the two point apart (cos < 0), computed
        as the reference does (flattened tensors; no guard against a zero ``g_kl``, which gives NaN there too)."""
        k = g_kl / torch.linalg.norm(g_kl)
        cos = torch.dot((g_ce / torch.linalg.norm(g_ce)).flatten(), k.flatten())
        fired = bool(cos < 0)
        if fired:
            g_ce = g_ce - self.config.lambda_ * torch.dot(g_ce.flatten(), k.flatten()) * k
        return g_ce, {"cos": float(cos), "fired": fired}

    def reference_loss_terms(self, terms) -> dict[str, float]:
        return {"xe_loss": terms["xe_loss"], "kl_loss": terms["kl_loss"]}

    @classmethod
    def config_from_reference(cls, trainer) -> ProGradConfig:
        # ``loss``: Dassl's LOSS node (NAME prograd, T, LAMBDA; GM and ALPHA are not read by the ProGrad trainer).
        opts = reference_options(trainer, {"N_CTX", "CSC", "CTX_INIT", "CLASS_TOKEN_POSITION", "ALPHA", "loss"},
                                 cls.name)
        loss = dict(opts.get("loss", {}))
        if loss.get("NAME", "prograd") != "prograd":
            raise ConfigError(f"prograd: LOSS.NAME {loss['NAME']!r} is not implemented by the reference trainer")
        return ProGradConfig(n_ctx=int(opts.get("N_CTX", 16)), ctx_init=bool(opts.get("CTX_INIT", False)),
                             class_token_position=opts.get("CLASS_TOKEN_POSITION", "end"),
                             csc=bool(opts.get("CSC", False)), lambda_=float(loss.get("LAMBDA", 1.0)),
                             temperature=float(loss.get("T", 1.0)))
