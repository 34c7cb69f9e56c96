"""MMA, the Multi-Modal Adapter (Yang et al., CVPR 2024; ZjjConan/Multi-Modal-Adapter ``trainers/mmadapter.py``
with its adapted ``clip/model.py`` and the gradient-scale op of ``clip/gsl.py``).

Learned: for every adapter index ``i`` in ``adapter_start .. adapter_end`` (inclusive) a text adapter
(``down`` Linear(text width -> D) + ReLU, ``up`` Linear(D -> text width)), a visual adapter (the same with the vision
width) and a shared Linear(D -> D) + ReLU used by both towers at that index. The CLIP towers, the fixed text prompts
``"<text_ctx_init> <class>."`` and the logit scale stay frozen.

Index ``i >= 1`` belongs to block ``i - 1`` (counted from 0) of both towers. With block input ``x`` and
``s = adapter_scale`` the block's output becomes ``block(x) + s * up_i(shared_i(down_i(ln_1(x))))`` (``ln_1``: that
block's own frozen LayerNorm), injected through the towers' ``after`` block hook. Inside a block the branch is
wrapped in the reference's gradient-scale op (:func:`.autograd.scale_gradient`: ``s`` where it reads the block,
``1/s`` after its output is scaled by ``s``): logits are those of the formula, every adapter tensor gets ``1/s``
times its true gradient (1000x at the official ``s = 0.001``) and the tower gets the true one. Index 0 (no official
config uses it) adapts the text token embeddings before the positional embedding and the image tokens after
``ln_pre``, without the gradient-scale op.

Text features do not depend on the image: evaluation caches them per class set, computed with the current adapters
(the reference caches them at its first eval forward, which in a real run is the test after training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .autograd import scale_gradient
from .base import PromptMethod, cosine_logits, reference_options, register
from .prompts import build_class_prompts, encode_text_embeddings, prompt_texts


@dataclass
class MMAConfig:
    #: First and last adapter index (inclusive); index i >= 1 adapts block i-1 of both towers, 0 the inputs.
    adapter_start: int = 5
    adapter_end: int = 12
    #: Bottleneck width D of every adapter.
    adapter_dim: int = 32
    #: Scale s of the adapter branches (also the gradient-scale factor 1/s of the adapter tensors).
    adapter_scale: float = 0.001
    #: Words before the class name in the fixed text prompts.
    text_ctx_init: str = "a photo of a"
    #: Seed of the Kaiming-normal init of the adapters (explicit; independent of any global RNG).
    init_seed: int = 0
    #: Classes per text-encoder chunk (None: the engine's automatic chunking, promptclip.memory).
    text_chunk_size: int | None = None


class _Adapter(nn.Module):
    """``down`` (Linear + ReLU) and ``up`` (Linear): the reference's per-tower adapter, its parameter names."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.down = nn.Sequential(nn.Linear(width, dim), nn.ReLU())
        self.up = nn.Linear(dim, width)


def _kaiming(linear: nn.Linear, generator: torch.Generator) -> None:
    with torch.no_grad():
        nn.init.kaiming_normal_(linear.weight, mode="fan_out", nonlinearity="relu", generator=generator)
        linear.bias.zero_()


@register
class MMA(PromptMethod):
    name = "mma"
    config_class = MMAConfig
    supports_resnet = False
    image_independent_text = True
    reference_trainers = ("MultiModalAdapter",)

    def __init__(self, backbone, config: MMAConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        clip = self.clip
        layers = min(len(clip.text.blocks), len(clip.visual.blocks))
        if not 0 <= config.adapter_start <= config.adapter_end <= layers:
            raise ConfigError(
                f"mma: adapter_start..adapter_end must satisfy 0 <= start <= end <= {layers} (the towers' blocks; "
                f"index i adapts block i counted from 1, 0 the inputs), got "
                f"{config.adapter_start}..{config.adapter_end}")
        if config.adapter_dim < 1:
            raise ConfigError(f"mma: adapter_dim must be at least 1, got {config.adapter_dim}")
        if not config.adapter_scale > 0:
            raise ConfigError(f"mma: adapter_scale must be positive, got {config.adapter_scale}")
        indices = [str(i) for i in range(config.adapter_start, config.adapter_end + 1)]
        dim = config.adapter_dim
        self.text_adapter = nn.ModuleDict({i: _Adapter(clip.text.width, dim) for i in indices})
        self.visual_adapter = nn.ModuleDict({i: _Adapter(clip.visual.width, dim) for i in indices})
        self.shared_adapter = nn.ModuleDict({i: nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) for i in indices})
        # The reference's order: text adapters, visual adapters, shared adapters, each by increasing index.
        generator = torch.Generator().manual_seed(config.init_seed)
        for tower in (self.text_adapter, self.visual_adapter):
            for adapter in tower.values():
                _kaiming(adapter.down[0], generator)
                _kaiming(adapter.up, generator)
        for shared in self.shared_adapter.values():
            _kaiming(shared[0], generator)
        self.set_classnames(classnames, template)

    def rebuild_class_buffers(self) -> None:
        names = [name.replace("_", " ") for name in self.classnames]
        prompts = build_class_prompts(self.clip, prompt_texts(self.config.text_ctx_init, names), names)
        self.register_buffer("token_embeds", prompts.embeddings, persistent=False)
        self.register_buffer("eot", prompts.eot, persistent=False)

    # -- the adapter branch ----------------------------------------------------------------------------------------

    def _branch(self, adapter: _Adapter, index: str, x: torch.Tensor) -> torch.Tensor:
        return adapter.up(self.shared_adapter[index](adapter.down(x)))

    def _after(self, adapters: nn.ModuleDict, blocks: nn.Sequential):
        """The towers' ``after`` hook: block ``layer``'s output plus the scaled adapter branch of its input."""
        scale = self.config.adapter_scale

        def after(layer: int, x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
            index = str(layer + 1)
            if index not in adapters:
                return x_out
            read = scale_gradient(blocks[layer].ln_1(x_in), scale)
            branch = scale_gradient(self._branch(adapters[index], index, read) * scale, 1 / scale)
            return x_out + branch.to(x_out.dtype)

        return after

    def _input_adapter(self, adapters: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        """Index 0: ``x + s * up_0(shared_0(down_0(x)))`` on the tower's input, no gradient scaling."""
        if "0" not in adapters:
            return x
        return x + (self.config.adapter_scale * self._branch(adapters["0"], "0", x)).to(x.dtype)

    # -- towers ----------------------------------------------------------------------------------------------------

    def encode_classes(self) -> torch.Tensor:
        embeds = self._input_adapter(self.text_adapter, self.token_embeds)
        return encode_text_embeddings(self.clip, embeds, self.eot, chunk_size=self.config.text_chunk_size,
                                      after=self._after(self.text_adapter, self.clip.text.blocks))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        x = self._input_adapter(self.visual_adapter, visual.embed(images))
        return visual.pool(visual.forward_blocks(x, after=self._after(self.visual_adapter, visual.blocks)))

    def forward(self, batch) -> torch.Tensor:
        return cosine_logits(self.clip, self.encode_image(batch["image"]), self.class_features())

    # -- reference -------------------------------------------------------------------------------------------------

    @classmethod
    def config_from_reference(cls, trainer) -> MMAConfig:
        opts = reference_options(trainer, {"TEXT_CTX_INIT", "ADAPTER_START", "ADAPTER_END", "ADAPTER_DIM",
                                           "ADAPTER_SCALE"}, cls.name)
        # Missing options take the reference's train.py (extend_cfg) defaults, which the official yaml overrides.
        return MMAConfig(adapter_start=opts.get("ADAPTER_START", 4), adapter_end=opts.get("ADAPTER_END", 12),
                         adapter_dim=opts.get("ADAPTER_DIM", 32), adapter_scale=opts.get("ADAPTER_SCALE", 0.1),
                         text_ctx_init=opts.get("TEXT_CTX_INIT", "") or "")

    def reference_name_map(self) -> dict[str, str]:
        return {f"adapter_learner.{name}": name for name, _ in self.named_trainable()}
