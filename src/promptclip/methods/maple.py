"""MaPLe (Khattak et al., CVPR 2023): multi-modal prompts, vision prompts coupled to the text prompts
(muzairkhattak/multimodal-prompt-learning ``trainers/maple.py`` with ``clip/model.py``'s
``ResidualAttentionBlock_MaPLe``).

Learned:

- text prompts ``P_0 .. P_{J-1}`` (``n_ctx`` × text width each, ``J = depth``). ``P_0`` sits at text positions 1..n
  and is initialised from ``ctx_init`` when ``n_ctx <= 4``: the FIRST ``n_ctx`` token embeddings of the init words,
  while the prompt string keeps ALL init words — with "a photo of a" and ``n_ctx = 2`` the text tower sees
  ``[SOS][P_0,1][P_0,2]["of"]["a"][class]["."][EOS]`` ("of a" stay frozen tokens). ``P_1 ..`` are N(0, 0.02);
- couplers ``F_0 .. F_{J-1}``, one Linear(text width → vision width) per layer; the vision prompts are
  ``F_i(P_i)`` — there are no vision-only prompt parameters. As in the reference, ``F_1 ..`` start as copies of
  one initial Linear (``_get_clones``), ``F_0`` has its own init (``nn.Linear``'s default rule, seeded here).

Insertion (``deep.py``): vision prompts appended at the end of the image sequence; before blocks 1 .. J-1 both
towers' prompt positions are replaced by ``P_i`` / ``F_i(P_i)``; later blocks carry them forward.
Widths come from the backbone (the reference hard-codes 512 → 768, which breaks ViT-L/14, MaPLe issue #73).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .base import reference_options, register
from .deep import DeepPromptMethod, check_depth, layer_name_map, linear_init, normal_prompts


@dataclass
class MaPLeConfig:
    n_ctx: int = 2
    #: Init words of P_0 (used when n_ctx <= 4); the prompt string keeps all of them.
    ctx_init: str = "a photo of a"
    #: Prompt depth J: prompts for blocks 0 .. J-1 of both towers (1 = shallow MaPLe).
    depth: int = 9
    init_std: float = 0.02
    #: Seed of the random init of prompts and couplers (explicit; independent of any global RNG).
    init_seed: int = 0
    #: Classes per text-encoder chunk (None: the engine's automatic chunking, promptclip.memory).
    text_chunk_size: int | None = None


@register
class MaPLe(DeepPromptMethod):
    name = "maple"
    config_class = MaPLeConfig
    reference_trainers = ("MaPLe",)

    def __init__(self, backbone, config: MaPLeConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        clip = self.clip
        layers = min(len(clip.text.blocks), len(clip.visual.blocks))
        check_depth(config.depth, layers, "maple: depth")
        text_width, vision_width = clip.text.width, clip.visual.width
        generator = torch.Generator().manual_seed(config.init_seed)
        ctx = self._setup_text(config.n_ctx, config.ctx_init, config.init_std, generator)
        first_coupler = linear_init(generator, text_width, vision_width)
        deeper = normal_prompts(generator, config.depth - 1, config.n_ctx, text_width, config.init_std)
        deeper_coupler = linear_init(generator, text_width, vision_width)
        self.text_prompts = nn.ParameterList(nn.Parameter(p) for p in [ctx, *deeper])
        self.couplers = nn.ModuleList(
            [first_coupler, *(copy.deepcopy(deeper_coupler) for _ in range(config.depth - 1))]
        )
        self.set_classnames(classnames, template)

    def text_layer_prompts(self) -> list[torch.Tensor]:
        return list(self.text_prompts)

    def vision_layer_prompts(self) -> list[torch.Tensor]:
        """``F_i(P_i)`` for every prompted layer: the vision prompts, ``[n_ctx, vision width]`` each."""
        return [coupler(prompt) for coupler, prompt in zip(self.couplers, self.text_prompts, strict=True)]

    @classmethod
    def config_from_reference(cls, trainer) -> MaPLeConfig:
        opts = reference_options(trainer, {"N_CTX", "CTX_INIT", "PROMPT_DEPTH"}, cls.name)
        # Missing options take the reference's train.py defaults.
        return MaPLeConfig(n_ctx=opts.get("N_CTX", 2), ctx_init=opts.get("CTX_INIT", "a photo of a") or "",
                           depth=opts.get("PROMPT_DEPTH", 9))

    def reference_name_map(self) -> dict[str, str]:
        depth = len(self.text_prompts)
        names = layer_name_map("text_prompts", "prompt_learner.ctx", "prompt_learner.compound_prompts_text.{}", depth,
                               offset=1)
        for part in ("weight", "bias"):
            names[f"prompt_learner.proj.{part}"] = f"couplers.0.{part}"
            names.update({f"prompt_learner.compound_prompt_projections.{i - 1}.{part}": f"couplers.{i}.{part}"
                          for i in range(1, depth)})
        return names
