"""Independent vision-language prompting (IVLP), the uncoupled baseline of MaPLe's repository
(muzairkhattak/multimodal-prompt-learning ``trainers/independentVL.py`` with ``clip/model.py``'s
``ResidualAttentionBlock_IVLP``).

Learned, independently per tower (no coupling):

- text: ``n_ctx_text`` context vectors at positions 1..n for blocks ``0 .. depth_text - 1``. Layer 0 is initialised
  from ``ctx_init`` when ``n_ctx_text <= 4`` (the first n token embeddings of the init words; the prompt string
  keeps all init words, so the rest stay frozen tokens), else N(0, 0.02) behind "X X ... X"; deeper layers N(0, 0.02);
- vision: ``n_ctx_vision`` tokens appended at the end of the image sequence for blocks ``0 .. depth_vision - 1``,
  N(0, 0.02). ``depth_vision = 0`` gives the language-only ablation (plain CLIP image tower).

Deep prompts replace the prompt positions before blocks 1 .. depth-1 and are carried forward after (``deep.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import reference_options, register
from .deep import DeepPromptMethod, check_depth, check_n_ctx, layer_name_map, normal_prompts

_TEXT_FIRST = "prompt_learner.ctx"
_TEXT_DEEPER = "text_encoder.transformer.resblocks.{}.VPT_shallow"
_VISION_FIRST = "image_encoder.VPT"
_VISION_DEEPER = "image_encoder.transformer.resblocks.{}.VPT_shallow"


@dataclass
class IVLPConfig:
    n_ctx_text: int = 2
    n_ctx_vision: int = 2
    #: Init words of the text context (used when n_ctx_text <= 4); the prompt string keeps all of them.
    ctx_init: str = "a photo of a"
    #: Text prompts for blocks 0 .. depth_text-1 (at least 1).
    depth_text: int = 12
    #: Vision prompts for blocks 0 .. depth_vision-1 (0: no vision prompts, the language-only ablation).
    depth_vision: int = 12
    init_std: float = 0.02
    #: Seed of the random prompt init (explicit; independent of any global RNG).
    init_seed: int = 0
    #: Classes per text-encoder chunk (None: the engine's automatic chunking, promptclip.memory).
    text_chunk_size: int | None = None


@register
class IVLP(DeepPromptMethod):
    name = "ivlp"
    config_class = IVLPConfig
    reference_trainers = ("IVLP",)

    def __init__(self, backbone, config: IVLPConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        self._build_prompts(config)
        self.set_classnames(classnames, template)

    def _build_prompts(self, config: IVLPConfig) -> None:
        clip = self.clip
        check_depth(config.depth_text, len(clip.text.blocks), f"{self.name}: depth_text")
        check_depth(config.depth_vision, len(clip.visual.blocks), f"{self.name}: depth_vision", minimum=0)
        if config.depth_vision:
            check_n_ctx(config.n_ctx_vision, f"{self.name}: n_ctx_vision")
        generator = torch.Generator().manual_seed(config.init_seed)
        ctx = self._setup_text(config.n_ctx_text, config.ctx_init, config.init_std, generator)
        deeper = normal_prompts(generator, config.depth_text - 1, config.n_ctx_text, clip.text.width, config.init_std)
        self.text_prompts = nn.ParameterList(nn.Parameter(p) for p in [ctx, *deeper])
        self.vision_prompts = nn.ParameterList(
            nn.Parameter(p)
            for p in normal_prompts(generator, config.depth_vision, config.n_ctx_vision, clip.visual.width,
                                    config.init_std)
        )

    def text_layer_prompts(self) -> list[torch.Tensor]:
        return list(self.text_prompts)

    def vision_layer_prompts(self) -> list[torch.Tensor]:
        return list(self.vision_prompts)

    REFERENCE_KEYS = {"N_CTX_VISION", "N_CTX_TEXT", "CTX_INIT", "PROMPT_DEPTH_VISION", "PROMPT_DEPTH_TEXT"}

    #: Defaults of the reference's ``train.py`` (``extend_cfg``) for options a config leaves out.
    REFERENCE_DEFAULTS = {"N_CTX_TEXT": 2, "N_CTX_VISION": 2, "CTX_INIT": "a photo of a", "PROMPT_DEPTH_TEXT": 9,
                          "PROMPT_DEPTH_VISION": 9}

    @classmethod
    def _common_from_reference(cls, opts) -> dict:
        opts = {**cls.REFERENCE_DEFAULTS, **opts}
        return dict(
            n_ctx_text=opts["N_CTX_TEXT"],
            n_ctx_vision=opts["N_CTX_VISION"],
            ctx_init=opts["CTX_INIT"] or "",
            depth_text=opts["PROMPT_DEPTH_TEXT"],
            depth_vision=opts["PROMPT_DEPTH_VISION"],
        )

    @classmethod
    def config_from_reference(cls, trainer) -> IVLPConfig:
        opts = reference_options(trainer, cls.REFERENCE_KEYS, cls.name)
        return IVLPConfig(**cls._common_from_reference(opts))

    def reference_name_map(self) -> dict[str, str]:
        names = layer_name_map("text_prompts", _TEXT_FIRST, _TEXT_DEEPER, len(self.text_prompts))
        if len(self.vision_prompts):
            names.update(layer_name_map("vision_prompts", _VISION_FIRST, _VISION_DEEPER, len(self.vision_prompts)))
        return names
