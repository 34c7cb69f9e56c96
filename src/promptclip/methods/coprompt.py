"""CoPrompt (Roy & Etemad, ICLR 2024): MaPLe prompts + adapters kept consistent with frozen CLIP.

Consistency-guided prompt learning, after ShuvenduRoy/CoPrompt ``trainers/coprompt.py`` (MIT).

Learned: MaPLe's multi-modal prompts (:mod:`.maple`: text prompts ``P_0 .. P_{J-1}`` and the couplers giving the
vision prompts) plus two residual adapters, image and text, each ``Linear(D -> D/4, no bias) -> ReLU -> Linear(D/4 ->
D, no bias) -> ReLU`` (the output is non-negative). Features ``v`` (image, view 1) and ``t`` (text) of the prompted
towers become ``0.1 * A_img(v) + 0.9 * v`` and ``0.2 * A_txt(t) + 0.8 * t`` (fixed ratios, as in the reference);
logits are ``exp(logit_scale) * cos``. This is also the evaluation rule (no teacher, one view).

Training loss: ``CE + w * (L_text + L_image)`` with, against the frozen CLIP (our backbone without prompts — the
reference's second CLIP copy ``model_distill`` has the same weights):

- ``L_text = 1 - mean_c cos(t_c, e_c)``, ``e = normalize(E[d])`` where ``E`` ``[n_desc, C, D]`` are the frozen text
  features of the LLM descriptions of every class (``descriptions``: :mod:`promptclip.data.descriptions`) and ``d``
  one description index per training step, the same for every class, drawn with :meth:`train_randint` (Python
  random, as the reference's ``random.randint``; parity replays the reference's draws with ``set_train_draws``);
- ``L_image = 1 - mean_b cos(v_b, u_b)``, ``u`` the frozen image features of a SECOND augmented view of each image
  (``batch["image_view2"]``: the method trains on ``train_views = 2``);
- cosine with eps 1e-7 on the adapted, normalised student features; ``distill: mse`` switches both terms to MSE.

Classes with different numbers of descriptions (not in the reference's files, where every class has the same count):
class ``c`` uses description ``d mod n_c`` with ``d`` drawn over the largest count (ours; equal counts give the
reference's rule). The description features are computed on the first training step for the current classes (never
at evaluation, which needs no descriptions).

Widths come from the backbone (the reference hard-codes 512 / 768 and the adapters' 512 -> 128).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..clip.tokenizer import ContextLengthError
from ..data.descriptions import load_descriptions
from ..errors import ConfigError, DataError
from .base import reference_options, register
from .maple import MaPLe
from .prompts import encode_texts

#: The reference's fixed residual ratios of the adapters (``image_adapter_m``, ``text_adapter_m``).
IMAGE_RATIO = 0.1
TEXT_RATIO = 0.2
#: Description texts per frozen text-tower pass when their features are computed.
DESCRIPTION_CHUNK = 256


@dataclass
class CoPromptConfig:
    n_ctx: int = 2
    #: Init words of P_0 (used when n_ctx <= 4); the prompt string keeps all of them.
    ctx_init: str = "a photo of a"
    #: Prompt depth J (configs/trainers/coprompt.yaml: 9; trainers/constants.py sets 9 or 12 per dataset).
    depth: int = 9
    #: Weight of the consistency terms (``TRAINER.W``; the config file's 1.0, per-dataset values in constants.py).
    w: float = 1.0
    #: ``cosine`` (the reference's default) or ``mse`` (``TRAINER.DISTILL``).
    distill: str = "cosine"
    #: Class descriptions: a bundled set (``eurosat``, ``sun397``, ...), a JSON file (class -> list of strings), or
    #: None: every bundled set, looked up by class name (promptclip.data.descriptions).
    descriptions: str | None = None
    init_std: float = 0.02
    #: Seed of the random init of prompts, couplers and adapters (explicit; independent of any global RNG).
    init_seed: int = 0
    #: Classes per text-encoder chunk (None: the engine's automatic chunking, promptclip.memory).
    text_chunk_size: int | None = None

    def __post_init__(self):
        if self.distill not in ("cosine", "mse"):
            raise ConfigError(f"coprompt: distill must be 'cosine' or 'mse', got {self.distill!r}")
        if self.w < 0:
            raise ConfigError(f"coprompt: w must be >= 0, got {self.w!r}")


def adapter(width: int, reduction: int, generator: torch.Generator) -> nn.Sequential:
    """The reference's ``Adapter``: Linear(no bias) -> ReLU -> Linear(no bias) -> ReLU, with ``nn.Linear``'s
    default init (kaiming-uniform, i.e. U(±1/sqrt(in))) drawn from ``generator``."""
    hidden = width // reduction
    layers = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, width, bias=False),
                           nn.ReLU())
    with torch.no_grad():
        for layer in (layers[0], layers[2]):
            bound = layer.in_features ** -0.5
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
    return layers


@register
class CoPrompt(MaPLe):
    name = "coprompt"
    config_class = CoPromptConfig
    reference_trainers = ("CoPrompt",)
    train_views: ClassVar[int] = 2
    description_field: ClassVar[str | None] = "descriptions"
    #: ``cfg.TRAINER.CoPrompt`` keys, plus the TRAINER-level ``W`` and ``DISTILL`` (outside the trainer's node).
    REFERENCE_KEYS: ClassVar[set[str]] = {"N_CTX", "CTX_INIT", "PROMPT_DEPTH", "W", "DISTILL"}
    #: The TRAINER-level options (outside ``cfg.TRAINER.CoPrompt``) that config_from_reference also reads.
    reference_trainer_keys: ClassVar[tuple[str, ...]] = ("W", "DISTILL")

    def __init__(self, backbone, config: CoPromptConfig, classnames, template=None):
        self._description_features: torch.Tensor | None = None
        super().__init__(backbone, config, classnames, template)
        width = self.clip.config.embed_dim
        generator = torch.Generator().manual_seed(config.init_seed + 1)
        self.adapter_image = adapter(width, 4, generator)
        self.adapter_text = adapter(width, 4, generator)
        self._student: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- features ------------------------------------------------------------------------------------------------

    def rebuild_class_buffers(self) -> None:
        super().rebuild_class_buffers()
        self._description_features = None  # recomputed for the new classes at the next training step

    def encode_classes(self) -> torch.Tensor:
        text = super().encode_classes()
        return TEXT_RATIO * self.adapter_text(text) + (1 - TEXT_RATIO) * text

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        image = super().encode_image(images)
        return IMAGE_RATIO * self.adapter_image(image) + (1 - IMAGE_RATIO) * image

    def forward(self, batch) -> torch.Tensor:
        image, text = self.encode_image(batch["image"]), self.class_features()
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        if self.training and torch.is_grad_enabled():
            self._student = (image, text)  # the consistency terms of loss() use the same features
        return self.clip.logit_scale.exp() * image @ text.t()

    def description_features(self) -> torch.Tensor:
        """``[n_desc, C, D]``: frozen text features of every class's descriptions, each row L2-normalised (the
        reference's ``ori_embedding``); computed once per class set."""
        if self._description_features is None:
            source = load_descriptions(self.config.descriptions)
            per_class = source.for_classes(self.classnames)
            texts = [t for texts in per_class for t in texts]
            device_type = self.device.type
            feats = []
            with torch.no_grad(), torch.autocast(device_type, enabled=False):
                for start in range(0, len(texts), DESCRIPTION_CHUNK):
                    try:
                        chunk = encode_texts(self.clip, texts[start:start + DESCRIPTION_CHUNK]).float()
                    except ContextLengthError as err:
                        raise DataError(f"class descriptions {source.source}: a description is longer than the text "
                                        f"encoder's context ({err})") from None
                    feats.append(chunk / chunk.norm(dim=-1, keepdim=True))
            feats = torch.cat(feats)
            count = max(len(t) for t in per_class)
            index, offset = [], 0
            for texts_c in per_class:
                index.append([offset + d % len(texts_c) for d in range(count)])
                offset += len(texts_c)
            rows = torch.tensor(index, device=feats.device).t()  # [n_desc, C]
            self._description_features = feats[rows]
        return self._description_features

    # -- training ------------------------------------------------------------------------------------------------

    def loss(self, batch, logits) -> dict[str, torch.Tensor]:
        if self._student is None:
            raise RuntimeError("coprompt: loss() needs the features of a training-mode forward of the same batch")
        image, text = self._student
        self._student = None
        if "image_view2" not in batch:
            raise ConfigError("coprompt trains on two augmented views of each image (batch['image_view2'] for the "
                              "frozen teacher): build the training data with the method's train_views (2), as "
                              "promptclip's train and run commands do")
        labels = batch["label"].to(logits.device)
        descriptions = self.description_features()
        d = self.train_randint(0, descriptions.shape[0] - 1)
        teacher_text = descriptions[d].to(text.dtype)
        teacher_text = teacher_text / teacher_text.norm(dim=-1, keepdim=True)
        with torch.no_grad():
            teacher_image = self.clip.encode_image(batch["image_view2"])
            teacher_image = teacher_image / teacher_image.norm(dim=-1, keepdim=True)
        ce = F.cross_entropy(logits, labels)
        terms: dict[str, torch.Tensor] = {"loss_ce": ce}
        if self.config.distill == "cosine":
            text_term = 1.0 - torch.mean(F.cosine_similarity(text, teacher_text, dim=1, eps=1e-7))
            image_term = 1.0 - torch.mean(F.cosine_similarity(image, teacher_image.to(image.dtype), dim=1, eps=1e-7))
        else:
            text_term = F.mse_loss(text, teacher_text)
            image_term = F.mse_loss(image, teacher_image.to(image.dtype))
        distill = text_term + image_term
        terms.update(loss_distill_text=text_term, loss_distill_image=image_term, loss_distill=distill,
                     description_index=torch.tensor(float(d), device=logits.device))
        terms["loss"] = ce + self.config.w * distill
        return terms

    # -- reference ---------------------------------------------------------------------------------------------

    def reference_loss_terms(self, terms) -> dict[str, float]:
        names = ("loss_ce", "loss_distill_text", "loss_distill_image", "loss_distill", "description_index")
        return {**{k: terms[k] for k in names if k in terms}, "w": self.config.w}

    @classmethod
    def config_from_reference(cls, trainer) -> CoPromptConfig:
        """``cfg.TRAINER.CoPrompt`` (with ``TRAINER.W`` / ``TRAINER.DISTILL`` merged in where the caller has them);
        missing options take the reference's ``train.py`` defaults (``W`` 8.0, depth 9, ``N_CTX`` 2)."""
        opts: dict[str, Any] = reference_options(trainer, cls.REFERENCE_KEYS, cls.name)
        return CoPromptConfig(n_ctx=opts.get("N_CTX", 2), ctx_init=opts.get("CTX_INIT", "a photo of a") or "",
                              depth=opts.get("PROMPT_DEPTH", 9), w=float(opts.get("W", 8.0)),
                              distill=str(opts.get("DISTILL", "cosine")))

    def reference_name_map(self) -> dict[str, str]:
        names = super().reference_name_map()
        for which in ("image", "text"):
            names.update({f"adapter_{which}.fc.{i}.weight": f"adapter_{which}.{i}.weight" for i in (0, 2)})
        return names
