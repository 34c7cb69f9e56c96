"""PromptKD (Li et al., CVPR 2024): unsupervised prompt distillation of a large prompted CLIP teacher into a
prompted image tower (zhengli97/PromptKD ``trainers/promptkd.py``, card tests/golden/methods/promptkd.md).

Two models:

- **teacher** (frozen): a trained adapter of another method on its own backbone (the reference: PromptSRC on
  ViT-L/14), given by path as ``teacher`` in the config (``--teacher PATH``; loaded with
  :func:`promptclip.checkpoint.load_teacher`, or handed over with :meth:`PromptKD.set_teacher`). It must have
  image-independent text features. It follows the student's class names. Without a teacher the student's own
  frozen CLIP, zero-shot with the dataset's template, stands in (ours, not the reference's: a warning says so when
  training starts);
- **student** (learned): VPT-deep vision prompts in the student's image tower (IVLP's vision side: ``n_ctx_vision``
  tokens for blocks ``0 .. depth_vision - 1``), then a projector ``Conv1x1(D_s, D_t) -> BatchNorm(D_t) -> ReLU ->
  Conv1x1(D_t, D_t)`` from the student's embedding width to the teacher's (the reference hard-codes 512 -> 768).
  The student's text tower is never used. The BatchNorm's running statistics are trained buffers
  (:meth:`trainable_buffers`: saved in the adapter and in training states).

Logits (training and evaluation): ``exp(student logit_scale) * s @ t^T`` with ``s`` the normalised projector output
and ``t`` the teacher's normalised text features of the current classes (detached). For base-to-novel this equals
the reference's ``cat(base logits over classes :ceil(n/2), novel logits over ceil(n/2):)``: each class's text
feature is encoded independently, so the halves are the base and novel class sets.

Loss (labels are never read)::

    L_ukd = KL(softmax(z_t / T) || softmax(z_s / T)) * T^2 / (B * C)      (sum over the batch, then / numel)
    loss  = kd_weight * L_ukd

with ``z_t`` the teacher's logits on the same images (its own image tower and logit scale). The method trains on
every training image of every class, unlabelled (``train_data = "unlabeled_all_classes"``: the transductive setting
of the paper; records and reports mark it).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import PromptMethod, reference_options, register
from .deep import DeepPromptMethod, check_depth, check_n_ctx, layer_name_map, normal_prompts

_PROJECTOR_REFERENCE = "VPT_image_trans.conv1"
#: The projector's BatchNorm in ``nn.Sequential(conv, bn, relu, conv)``.
_BN = 1


@dataclass
class PromptKDConfig:
    n_ctx_vision: int = 4
    #: Vision prompts for blocks 0 .. depth_vision-1 of the student's image tower.
    depth_vision: int = 9
    #: Weight of the distillation loss. The reference YAMLs say 1.0, its launch scripts run 1000 (200 on
    #: fgvc_aircraft, oxford_flowers and dtd).
    kd_weight: float = 1000.0
    #: KL temperature T (the loss carries the T^2 factor).
    temperature: float = 1.0
    #: The teacher adapter (a file of the .safetensors/.json pair, or a run directory); None: the student's own
    #: frozen CLIP, zero-shot (not the paper's setting; warned about when training starts).
    teacher: str | None = None
    init_std: float = 0.02
    #: Seed of the random init (prompts, projector; explicit, independent of any global RNG).
    init_seed: int = 0


def _projector(in_dim: int, out_dim: int, seed: int) -> nn.Sequential:
    """Conv1x1 -> BatchNorm2d -> ReLU -> Conv1x1 with PyTorch's default init (U(+-1/sqrt(fan_in)) weights and
    biases, BatchNorm 1 / 0), drawn from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    first, second = nn.Conv2d(in_dim, out_dim, 1), nn.Conv2d(out_dim, out_dim, 1)
    with torch.no_grad():
        for conv, fan_in in ((first, in_dim), (second, out_dim)):
            bound = fan_in**-0.5
            conv.weight.copy_((torch.rand(conv.weight.shape, generator=generator) * 2 - 1) * bound)
            conv.bias.copy_((torch.rand(conv.bias.shape, generator=generator) * 2 - 1) * bound)
    return nn.Sequential(first, nn.BatchNorm2d(out_dim), nn.ReLU(), second)


@register
class PromptKD(DeepPromptMethod):
    name = "promptkd"
    config_class = PromptKDConfig
    reference_trainers = ("PromptKD",)
    has_text_prompts = False
    image_independent_text = False  # the class features are the teacher's, never the student's own
    train_data = "unlabeled_all_classes"
    uses_teacher = True

    def __init__(self, backbone, config: PromptKDConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        if config.temperature <= 0:
            raise ConfigError(f"promptkd: temperature must be positive, got {config.temperature}")
        visual = backbone.visual
        check_n_ctx(config.n_ctx_vision, "promptkd: n_ctx_vision")
        check_depth(config.depth_vision, len(visual.blocks), "promptkd: depth_vision")
        generator = torch.Generator().manual_seed(config.init_seed)
        self.vision_prompts = nn.ParameterList(
            nn.Parameter(p)
            for p in normal_prompts(generator, config.depth_vision, config.n_ctx_vision, visual.width,
                                    config.init_std)
        )
        self.teacher: PromptMethod | None = None
        self.projector: nn.Sequential | None = None
        if config.teacher is not None:
            from ..checkpoint import load_teacher

            teacher = load_teacher(config.teacher)
        else:
            from .registry import create_method

            teacher = create_method("zeroshot", backbone, list(classnames), template=template)
        self.set_teacher(teacher, classnames, template)
        self._zero_shot_teacher = config.teacher is None

    # -- the teacher ---------------------------------------------------------------------------------------------

    @property
    def zero_shot_teacher(self) -> bool:
        """Whether the teacher is the stand-in (the student's own zero-shot CLIP), not one given."""
        return self._zero_shot_teacher

    def set_teacher(self, teacher: PromptMethod, classnames: list[str] | None = None,
                    template: str | None = None) -> None:
        """Distil ``teacher`` (frozen here). The projector maps the student's embedding width to the teacher's; it is
        (re)built from the config's seed when that width changes, so a method given its teacher after construction
        starts from the values it would have had with it."""
        if not teacher.image_independent_text:
            raise ConfigError(f"promptkd: the teacher ({teacher.name}) must have image-independent text features "
                              "(its class features are what the student is scored against)")
        ours, theirs = self.clip.visual.input_resolution, teacher.clip.visual.input_resolution
        if ours != theirs:
            raise ConfigError(f"promptkd: the teacher's backbone takes {theirs} px images, the student's {ours} px; "
                              "both see the same batches (the reference asserts the same)")
        teacher.requires_grad_(False)
        self.teacher = teacher.eval()
        self._zero_shot_teacher = False
        width = teacher.clip.config.embed_dim
        if self.projector is None or self.projector[0].out_channels != width:
            self.projector = _projector(self.clip.config.embed_dim, width, self.config.init_seed + 1)
        self.set_classnames(list(classnames or self.classnames), template)

    def rebuild_class_buffers(self) -> None:
        if self.teacher is not None:
            self.teacher.set_classnames(list(self.classnames), self.template)

    def train(self, mode: bool = True) -> PromptKD:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: never in training mode
        return self

    def teacher_text_features(self) -> torch.Tensor:
        """The teacher's normalised text features of the current classes ``[C, D_t]`` (cached by the teacher)."""
        with torch.no_grad():
            text = self.teacher.class_features()
        return text / text.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on ``images`` (its own image tower and logit scale)."""
        return self.teacher({"image": images})

    def trainable_buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, buffer in self.projector[_BN].named_buffers():
            yield f"projector.{_BN}.{name}", buffer

    # -- forward and loss ----------------------------------------------------------------------------------------

    def vision_layer_prompts(self) -> list[torch.Tensor]:
        return list(self.vision_prompts)

    def student_features(self, images: torch.Tensor) -> torch.Tensor:
        """The projector's output ``[B, D_t]`` (before normalisation) for the prompted image features."""
        features = self.encode_image(images)
        out = self.projector(features.to(self.projector[0].weight.dtype)[:, :, None, None])
        return out[:, :, 0, 0]

    def forward(self, batch) -> torch.Tensor:
        student = self.student_features(batch["image"])
        student = student / student.norm(dim=-1, keepdim=True)
        text = self.teacher_text_features().to(device=student.device, dtype=student.dtype)
        return self.clip.logit_scale.exp() * student @ text.t()

    def loss(self, batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        temperature = self.config.temperature
        teacher = self.teacher_logits(batch["image"]).to(logits.dtype)
        kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), F.softmax(teacher / temperature, dim=1),
                      reduction="sum")
        loss_ukd = kl * temperature * temperature / logits.numel()
        return {"loss": self.config.kd_weight * loss_ukd, "loss_ukd": loss_ukd.detach()}

    def on_train_start(self, max_epoch: int) -> None:
        if self.zero_shot_teacher:
            warnings.warn("promptkd: no teacher given (--teacher PATH, or method_config.teacher): distilling the "
                          "student's own zero-shot CLIP instead, which is not PromptKD's setting (a trained adapter "
                          "of a larger model, e.g. promptsrc on ViT-L/14)", stacklevel=2)

    # -- reference -----------------------------------------------------------------------------------------------

    #: N_CTX_TEXT / CTX_INIT configure the teacher's text prompts (the teacher adapter carries its own);
    #: PROMPT_DEPTH_TEXT builds student text prompts that are never used; CE_WEIGHT and PROJECT_LAYER are not read
    #: by the reference; TEACHER_NAME is the teacher's backbone (the teacher adapter names its own).
    REFERENCE_KEYS = {"N_CTX_VISION", "N_CTX_TEXT", "CTX_INIT", "PROMPT_DEPTH_VISION", "PROMPT_DEPTH_TEXT",
                      "PROJECT_LAYER", "CE_WEIGHT", "KD_WEIGHT", "TEMPERATURE", "TEACHER_NAME"}

    @classmethod
    def config_from_reference(cls, trainer) -> PromptKDConfig:
        opts = reference_options(trainer, cls.REFERENCE_KEYS, cls.name)
        # The reference's defaults (train.py extend_cfg) for options a config leaves out.
        return PromptKDConfig(n_ctx_vision=opts.get("N_CTX_VISION", 4), depth_vision=opts.get("PROMPT_DEPTH_VISION", 9),
                              kd_weight=float(opts.get("KD_WEIGHT", 1.0)),
                              temperature=float(opts.get("TEMPERATURE", 1.0)))

    def reference_name_map(self) -> dict[str, str]:
        names = layer_name_map("vision_prompts", "image_encoder.VPT",
                               "image_encoder.transformer.resblocks.{}.VPT_shallow", len(self.vision_prompts))
        for index in (0, 1, 3):
            for tensor in ("weight", "bias"):
                names[f"{_PROJECTOR_REFERENCE}.{index}.{tensor}"] = f"projector.{index}.{tensor}"
        return names

    def reference_buffer_map(self) -> dict[str, str]:
        """Reference name -> ours for the trained BatchNorm statistics (:meth:`trainable_buffers`)."""
        return {f"{_PROJECTOR_REFERENCE}.{_BN}.{name}": f"projector.{_BN}.{name}"
                for name in ("running_mean", "running_var", "num_batches_tracked")}

    def reference_loss_terms(self, terms) -> dict[str, float]:
        return {"L_ukd": terms["loss_ukd"], "kd_weight": self.config.kd_weight,
                "temperature": self.config.temperature}
