"""MMRL++ (yunncheng/MMRL ``trainers/mmrlpp.py`` with ``clip/model_mmrlpp.py``): MMRL (:mod:`.mmrl`) with lighter,
shared projections and token blending across layers.

What changes from MMRL (loss, evaluation rules, logit scale 100, insertion at the first representation layer and the
text pooling at ``EOT + N`` are the same):

- projections: one shared weight per modality (``r2t.weight`` ``[text width, rep_dim]``, ``r2v.weight``) plus, per
  representation layer ``k``, a low-rank residual and a bias of its own (``Residual_Aligner``):
  ``t_k = R @ (W_t + A_k B_k)^T + b_k`` with ``A_k`` ``[width, res_lora_dim]``, ``B_k`` ``[res_lora_dim, rep_dim]``.
  Init as the reference: ``W`` and every ``b_k`` from one Linear's default init, ``A_k`` Kaiming-uniform (a = sqrt 5),
  ``B_k`` zero;
- token blending: before each representation layer after the first, positions ``1..N`` become
  ``beta * t_k + (1 - beta) * (their previous output)`` in both towers, instead of being replaced;
- the representation feature's projection is the FROZEN ``proj`` plus a trainable low-rank term
  ``proj + proj_A @ proj_B`` (``proj_A`` ``[vision width, proj_lora_dim]`` Kaiming-uniform, ``proj_B`` zero); there
  is no ``proj_rep``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import reference_options, register
from .deep import linear_init
from .mmrl import MMRL, MMRLConfig


@dataclass
class MMRLppConfig(MMRLConfig):
    #: Weight of a layer's new tokens against the previous layer's outputs at positions 1..N (BETA; per dataset in the
    #: reference, see the presets).
    beta: float = 0.9
    #: Rank of the low-rank term added to the frozen ``proj`` for the representation feature (PROJ_LORA_DIM).
    proj_lora_dim: int = 64
    #: Rank of each layer's residual on the shared projections (RES_LORA_DIM).
    res_lora_dim: int = 4


def kaiming_uniform(generator: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(w, a=sqrt(5))`` of a ``[rows, cols]`` tensor: U(±1/sqrt(cols)), from ``generator``."""
    bound = 1.0 / math.sqrt(cols)
    return torch.rand((rows, cols), generator=generator) * 2 * bound - bound


class SharedResidualAligner(nn.Module):
    """One shared weight, and per layer a low-rank residual ``A_k @ B_k`` on it and a bias ``b_k``."""

    def __init__(self, generator: torch.Generator, in_features: int, out_features: int, layers: int, rank: int):
        super().__init__()
        base = linear_init(generator, in_features, out_features)
        self.weight = nn.Parameter(base.weight.detach().clone())
        self.A = nn.ParameterList(nn.Parameter(kaiming_uniform(generator, out_features, rank)) for _ in range(layers))
        self.B = nn.ParameterList(nn.Parameter(torch.zeros(rank, in_features)) for _ in range(layers))
        self.bias = nn.ParameterList(nn.Parameter(base.bias.detach().clone()) for _ in range(layers))

    def forward(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        return F.linear(x, self.weight + self.A[layer] @ self.B[layer], self.bias[layer])


@register
class MMRLpp(MMRL):
    name = "mmrlpp"
    config_class = MMRLppConfig
    reference_trainers = ("MMRLpp",)

    def __init__(self, backbone, config: MMRLppConfig, classnames, template=None):
        from ..errors import ConfigError

        if not 0.0 <= config.beta <= 1.0:
            raise ConfigError(f"mmrlpp: beta must lie in [0, 1], got {config.beta}")
        for key in ("proj_lora_dim", "res_lora_dim"):
            if getattr(config, key) < 1:
                raise ConfigError(f"mmrlpp: {key} must be at least 1, got {getattr(config, key)}")
        super().__init__(backbone, config, classnames, template)

    def build_projections(self, generator: torch.Generator) -> None:
        clip, count, config = self.clip, len(self.rep_layers), self.config
        self.r2v = SharedResidualAligner(generator, config.rep_dim, clip.visual.width, count, config.res_lora_dim)
        self.r2t = SharedResidualAligner(generator, config.rep_dim, clip.text.width, count, config.res_lora_dim)
        width, dim = clip.visual.width, clip.visual.output_dim
        self.proj_A = nn.Parameter(kaiming_uniform(generator, width, config.proj_lora_dim))
        self.proj_B = nn.Parameter(torch.zeros(config.proj_lora_dim, dim))

    def layer_tokens(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        count = range(len(self.rep_layers))
        return [self.r2t(self.rep_tokens, k) for k in count], [self.r2v(self.rep_tokens, k) for k in count]

    def merge_tokens(self, new: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        beta = self.config.beta
        return beta * new + (1 - beta) * previous

    def rep_projection(self) -> torch.Tensor:
        return self.clip.visual.proj + self.proj_A @ self.proj_B

    # -- reference ------------------------------------------------------------------------------------------------

    REFERENCE_DEFAULTS = {**MMRL.REFERENCE_DEFAULTS, "BETA": 0.9, "PROJ_LORA_DIM": 64, "RES_LORA_DIM": 4}

    @classmethod
    def config_from_reference(cls, trainer) -> MMRLppConfig:
        opts = reference_options(trainer, set(cls.REFERENCE_DEFAULTS), cls.name)
        values = {**cls.REFERENCE_DEFAULTS, **opts}
        return MMRLppConfig(**cls._common_from_reference(opts), beta=float(values["BETA"]),
                            proj_lora_dim=int(values["PROJ_LORA_DIM"]), res_lora_dim=int(values["RES_LORA_DIM"]))

    def reference_name_map(self) -> dict[str, str]:
        names = {"representation_learner.compound_rep_tokens": "rep_tokens", "image_encoder.A": "proj_A",
                 "image_encoder.B": "proj_B"}
        for ours, ref in (("r2t", "srra_r2tproj"), ("r2v", "srra_r2vproj")):
            names[f"representation_learner.{ref}.weight"] = f"{ours}.weight"
            for k in range(len(self.rep_layers)):
                for part in ("A", "B", "bias"):
                    names[f"representation_learner.{ref}.srra.{k}.{part}"] = f"{ours}.{part}.{k}"
        return names
