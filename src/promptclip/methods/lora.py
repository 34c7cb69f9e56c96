"""Low-rank updates of frozen attention projections, on a method-owned view of the backbone.

A method that fine-tunes low-rank deltas ``W + s·B A`` of the query / key / value / output projections of chosen
blocks of either tower builds :func:`lora_view`: a shallow copy of the CLIP module tree in which the chosen
attention modules are replaced by :class:`LoRAAttention` wrappers. Every other module and every frozen tensor is
shared with the backbone (no copy, no memory), and the backbone object itself is never changed: another method (the
next cell of a grid) that holds the same backbone sees it untouched.

``LoRAAttention`` computes the frozen projections as the backbone does and adds ``s · dropout(x) Aᵀ Bᵀ`` to each
adapted projection (unmerged). With ``merge`` (evaluation), it instead runs the projections with merged weights
``W + s·B A``, built out of place for the pass: the same function, the reference implementations' merged
inference, and still no write to the shared weights.

Nothing here names a method; the scaling rule, the initialisation and which blocks get adapters are the caller's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..clip.kernels import frozen_linear
from ..clip.model import CLIP, SelfAttention, attend

#: The projections of an attention module that can be adapted: q, k, v (slices of the packed in-projection) and o.
PROJECTIONS = ("q", "k", "v", "o")


class LoRAAttention(nn.Module):
    """A :class:`~promptclip.clip.model.SelfAttention` of the backbone (held, not copied) with low-rank deltas on
    ``projections``: ``<p>_A`` ``[rank, width]`` and ``<p>_B`` ``[width, rank]`` per projection ``p``.

    ``A`` starts kaiming-uniform (``nn.Linear``'s rule, bound ``1/sqrt(width)``) from ``generator``, ``B`` at zero,
    so the module starts as the frozen one. ``dropout`` acts on the input of the low-rank branch only, in training (a
fresh mask per projection, from ``mask_generator``).
    ``merge``: in eval mode, run with merged weights (the same function up to float round-off).
    """

    def __init__(self, base: SelfAttention, projections: Iterable[str], rank: int, scaling: float,
                 dropout: float = 0.0, generator: torch.Generator | None = None, merge: bool = True):
        super().__init__()
        projections = list(dict.fromkeys(projections))
        unknown = sorted(set(projections) - set(PROJECTIONS))
        if unknown or not projections:
            raise ValueError(f"LoRA projections must be among {', '.join(PROJECTIONS)}, got {projections}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.__dict__["base"] = base  # shared and frozen: not a submodule, so it is never re-registered or moved twice
        self.heads = base.heads
        self.projections = tuple(p for p in PROJECTIONS if p in projections)
        self.scaling = float(scaling)
        self.merge = merge
        self.dropout = float(dropout)
        #: Where dropout masks are drawn from (None: torch's global generator); an owner that wants reproducible
        #: masks sets one generator on all its modules before a training forward.
        self.mask_generator: torch.Generator | None = None
        width = base.out_proj.weight.shape[1]
        device, dtype = base.out_proj.weight.device, base.out_proj.weight.dtype
        bound = 1 / math.sqrt(width)
        for p in self.projections:
            a = torch.rand(rank, width, generator=generator, dtype=dtype) * 2 * bound - bound
            self.register_parameter(f"{p}_A", nn.Parameter(a.to(device)))
            self.register_parameter(f"{p}_B", nn.Parameter(torch.zeros(width, rank, device=device, dtype=dtype)))

    def delta(self, p: str) -> torch.Tensor:
        """The merged update ``s · B A`` of projection ``p`` ``[width, width]``."""
        return self.scaling * (getattr(self, f"{p}_B") @ getattr(self, f"{p}_A"))

    def _branch(self, x: torch.Tensor, p: str) -> torch.Tensor:
        a, b = getattr(self, f"{p}_A"), getattr(self, f"{p}_B")
        if self.training and self.dropout > 0:
            keep = torch.empty_like(x).bernoulli_(1 - self.dropout, generator=self.mask_generator)
            x = x * keep / (1 - self.dropout)
        return self.scaling * F.linear(F.linear(x, a), b)

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        base = self.base
        width = x.shape[-1]
        merged = self.merge and not self.training
        if merged:
            in_weight = torch.cat([base.in_proj_weight[i * width:(i + 1) * width] + self.delta(p)
                                   if p in self.projections else base.in_proj_weight[i * width:(i + 1) * width]
                                   for i, p in enumerate("qkv")])
            qkv = frozen_linear(x, in_weight, base.in_proj_bias)
        else:
            qkv = frozen_linear(x, base.in_proj_weight, base.in_proj_bias)
            parts = list(qkv.split(width, dim=-1))
            for i, p in enumerate("qkv"):
                if p in self.projections:
                    parts[i] = parts[i] + self._branch(x, p)
            qkv = torch.cat(parts, dim=-1)
        out = attend(qkv, self.heads, causal, attn_mask)
        if "o" not in self.projections:
            return frozen_linear(out, base.out_proj.weight, base.out_proj.bias)
        if merged:
            return frozen_linear(out, base.out_proj.weight + self.delta("o"), base.out_proj.bias)
        return frozen_linear(out, base.out_proj.weight, base.out_proj.bias) + self._branch(out, "o")


def module_view(root: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """A shallow copy of ``root`` in which the submodule at each dotted path of ``replacements`` is replaced. The
    modules along those paths are copied (their child tables only); every other module, parameter and buffer is the
    same object as in ``root``, and ``root`` is left as it was."""
    view = copy.copy(root)
    view._modules = dict(root._modules)
    children: dict[str, dict[str, nn.Module]] = {}
    for path, module in replacements.items():
        head, _, rest = path.partition(".")
        if head not in view._modules:
            raise KeyError(f"{type(root).__name__} has no submodule {head!r}")
        if rest:
            children.setdefault(head, {})[rest] = module
        else:
            view._modules[head] = module
    for head, sub in children.items():
        view._modules[head] = module_view(root._modules[head], sub)
    return view


def attention_paths(clip: CLIP, tower: str, blocks: Sequence[int]) -> dict[int, str]:
    """Dotted paths of the attention modules of ``blocks`` (indices; those the tower does not have are skipped) of
    ``tower`` (``text`` or ``vision``, a ViT), by block index."""
    if tower == "text":
        prefix, count = "transformer.resblocks", len(clip.transformer.resblocks)
    elif tower == "vision":
        if not clip.is_vit:
            raise ValueError("LoRA on the image tower needs a ViT backbone (this one has a ResNet image tower)")
        prefix, count = "visual.transformer.resblocks", len(clip.visual.transformer.resblocks)
    else:
        raise ValueError(f"tower must be 'text' or 'vision', got {tower!r}")
    return {i: f"{prefix}.{i}.attn" for i in sorted(set(blocks)) if 0 <= i < count}


def lora_view(clip: CLIP, targets: Mapping[str, Sequence[int]], projections: Iterable[str], rank: int,
              scaling: float, dropout: float = 0.0, seed: int = 0, merge: bool = True
              ) -> tuple[CLIP, dict[str, LoRAAttention]]:
    """A view of ``clip`` with :class:`LoRAAttention` on the blocks ``targets[tower]`` (``text`` / ``vision``), and
    the wrappers by path. Initial values come from one generator seeded with ``seed``, in path order."""
    generator = torch.Generator().manual_seed(seed)
    modules: dict[str, LoRAAttention] = {}
    for tower in ("text", "vision"):
        for _, path in attention_paths(clip, tower, targets.get(tower, ())).items():
            base = clip.get_submodule(path)
            modules[path] = LoRAAttention(base, projections, rank, scaling, dropout, generator, merge)
    return module_view(clip, modules), modules
