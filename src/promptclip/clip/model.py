"""Our own CLIP in the OpenAI state-dict layout, with explicit stages for prompt methods.

Module names equal the keys of OpenAI's checkpoints, so official weights load with ``strict=True``. Tensors run
batch-first (``[batch, tokens, width]``) through the towers; attention goes through
``torch.nn.functional.scaled_dot_product_attention``.

Each tower exposes the same stages:

- ``embed(...)``: token/patch embedding plus positions (the vision tower can append extra prompt tokens after the
  positional embedding, before ``ln_pre``);
- ``blocks``: the residual attention blocks;
- ``forward_blocks(x, hook, after=None, attn_mask=None)``: runs the blocks, calling ``hook(layer, x) -> x`` before
  each block and ``after(layer, x_in, x_out) -> x_out`` after it (``x_in``: the block's input), every block
  attending with the additive ``attn_mask`` (broadcastable to ``[batch, heads, tokens, tokens]``) on top of its own
  causal mask, if any. Without ``after`` and ``attn_mask`` the blocks run exactly as without these arguments;
- ``pool(x)``: the projected feature (vision: CLS token; text: the token at explicit EOT positions).

``CLIP.forward_lockstep`` runs both towers layer by layer with a ``couple(layer, x_img, x_txt)`` callback.
This module holds no method code, no learnable prompts and no dtype casts: precision is applied by autocast
(``promptclip.precision``). The blocks' products go through :func:`promptclip.clip.kernels.frozen_linear`, which
picks the CPU kernel of fp32 products with frozen weights.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import frozen_linear

Hook = Callable[[int, torch.Tensor], torch.Tensor]
#: ``after(layer, block_input, block_output) -> block_output``: called after each block (e.g. a parallel branch that
#: reads the block's input and adds to its output).
AfterHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
Couple = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPConfig:
    """Architecture of a CLIP model. ``vision_layers`` is an int for a ViT, a 4-tuple for a ModifiedResNet."""

    embed_dim: int
    image_size: int
    vision_layers: int | tuple[int, int, int, int]
    vision_width: int
    vision_patch_size: int | None
    vision_heads: int
    context_length: int
    vocab_size: int
    text_width: int
    text_heads: int
    text_layers: int
    quick_gelu: bool = True
    # Hidden width of the MLPs; None is OpenAI's 4 x width. open_clip's ViT-g-14 and ViT-bigG-14 use other ratios.
    vision_mlp_width: int | None = None
    text_mlp_width: int | None = None
    # The pixel normalisation the weights were trained with (OpenAI's unless the weights' source says otherwise).
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    image_std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self):
        for name in ("vision_layers", "image_mean", "image_std"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.is_vit and self.vision_patch_size is None:
            raise ValueError("a ViT config needs vision_patch_size")
        for name in ("vision_width", "text_width"):
            width, heads = getattr(self, name), getattr(self, name.replace("width", "heads"))
            if heads < 1 or width % heads:
                raise ValueError(f"{name}={width} is not divisible by its number of heads {heads}")

    @property
    def is_vit(self) -> bool:
        return isinstance(self.vision_layers, int)

    @property
    def vision_head_width(self) -> int:
        """Width of one attention head of the image tower (of its attention pool for a ResNet)."""
        return (self.vision_width if self.is_vit else self.vision_width * 32) // self.vision_heads

    @property
    def text_head_width(self) -> int:
        return self.text_width // self.text_heads

    def to_dict(self) -> dict:
        return asdict(self)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the autocast dtype, as OpenAI's CLIP does, returning the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        # Without autograd, the same operations in one buffer: the [tokens, 4 x width] temporaries are the largest
        # tensors of a block, and each fresh one costs page faults on the CPU. The values are bitwise the same.
        return torch.mul(x, 1.702).sigmoid_().mul_(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, computed with SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_mask``: see :func:`attend`."""
        qkv = frozen_linear(x, self.in_proj_weight, self.in_proj_bias)
        out = attend(qkv, self.heads, causal, attn_mask)
        return frozen_linear(out, self.out_proj.weight, self.out_proj.bias)


def attend(qkv: torch.Tensor, heads: int, causal: bool = False, attn_mask: torch.Tensor | None = None
           ) -> torch.Tensor:
    """Multi-head scaled dot-product attention of packed projections ``qkv`` ``[batch, tokens, 3 * width]``, back to
    ``[batch, tokens, width]``. ``attn_mask``: an additive float mask broadcastable to ``[batch, heads, tokens,
    tokens]`` (``-inf``: no attention), applied on top of the causal mask when ``causal``."""
    batch, length, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    qkv = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    if attn_mask is None:
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)
    else:
        mask = attn_mask.to(qkv.dtype)
        if causal:
            mask = mask + torch.full((length, length), float("-inf"), dtype=qkv.dtype, device=qkv.device).triu(1)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, length, width)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, quick_gelu: bool = True, causal: bool = False,
                 mlp_width: int | None = None):
        super().__init__()
        self.causal = causal
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        activation = QuickGELU() if quick_gelu else nn.GELU()
        hidden = mlp_width or width * 4
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, hidden)), ("gelu", activation), ("c_proj", nn.Linear(hidden, width))]
            )
        )
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=self.causal, attn_mask=attn_mask)
        mlp = self.mlp
        hidden = mlp.gelu(frozen_linear(self.ln_2(x), mlp.c_fc.weight, mlp.c_fc.bias))
        return x + frozen_linear(hidden, mlp.c_proj.weight, mlp.c_proj.bias)


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool = True, causal: bool = False,
                 mlp_width: int | None = None):
        super().__init__()
        self.width = width
        self.layers = layers
        self.heads = heads
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, quick_gelu, causal, mlp_width) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, hook: Hook | None = None, after: AfterHook | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer, block in enumerate(self.resblocks):
            if hook is not None:
                x = hook(layer, x)
            if after is None:
                x = block(x) if attn_mask is None else block(x, attn_mask)
            else:
                x = after(layer, x, block(x) if attn_mask is None else block(x, attn_mask))
        return x


class VisionTransformer(nn.Module):
    """ViT image tower. Sequence layout after ``embed``: ``[CLS, patches..., extra prompt tokens...]``."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
                 quick_gelu: bool = True, mlp_width: int | None = None):
        super().__init__()
        self.input_resolution = image_size
        self.patch_size = patch_size
        self.width = width
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        n_tokens = (image_size // patch_size) ** 2 + 1
        self.positional_embedding = nn.Parameter(scale * torch.randn(n_tokens, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu, mlp_width=mlp_width)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    @property
    def blocks(self) -> nn.Sequential:
        return self.transformer.resblocks

    @property
    def num_tokens(self) -> int:
        """Tokens before any extra prompt tokens: CLS + patches."""
        return self.positional_embedding.shape[0]

    def embed(self, images: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Patches + CLS + positions, then optional ``prompts`` (``[P, width]`` or ``[B, P, width]``), then ln_pre."""
        x = self.conv1(images.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        if x.shape[1] != self.num_tokens:
            raise ValueError(
                f"images of size {tuple(images.shape[-2:])} give {x.shape[1]} tokens; this model expects "
                f"{self.input_resolution}x{self.input_resolution} images ({self.num_tokens} tokens)"
            )
        x = x + self.positional_embedding.to(x.dtype)
        if prompts is not None:
            if prompts.dim() == 2:
                prompts = prompts.expand(x.shape[0], -1, -1)
            x = torch.cat([x, prompts.to(x.dtype)], dim=1)
        return self.ln_pre(x)

    def forward_blocks(self, x: torch.Tensor, hook: Hook | None = None, after: AfterHook | None = None,
                       attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer(x, hook, after, attn_mask)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_post(x[:, 0, :]) @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_blocks(self.embed(images)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        # All convolutions have stride 1; an average pool does the downsampling (anti-aliased, as in OpenAI's RN).
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling of a feature map: the mean token attends over all positions."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        if x.shape[1] != self.positional_embedding.shape[0]:
            side = int(round((self.positional_embedding.shape[0] - 1) ** 0.5))
            raise ValueError(f"feature map has {x.shape[1] - 1} positions; this model expects {side}x{side}")
        x = x + self.positional_embedding.to(x.dtype)
        head_dim = channels // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, t.shape[1], self.num_heads, head_dim).transpose(1, 2)

        q = heads(self.q_proj(x[:, :1]))
        k, v = heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.c_proj(out.transpose(1, 2).reshape(batch, channels))


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet image tower: 3-conv stem, anti-aliased strided convs, attention pooling."""

    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int, input_resolution: int,
                 width: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.width = width
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @property
    def blocks(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def embed(self, images: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        if prompts is not None:
            raise ValueError("visual prompt tokens: this needs a ViT backbone (a ResNet tower has no token sequence)")
        x = images.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward_blocks(self, x: torch.Tensor, hook: Hook | None = None, after: AfterHook | None = None,
                       attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("an attention mask needs a ViT image tower (a ResNet has no token sequence)")
        for layer, stage in enumerate(self.blocks):
            if hook is not None:
                x = hook(layer, x)
            x = stage(x) if after is None else after(layer, x, stage(x))
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.attnpool(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_blocks(self.embed(images)))


class TextTower:
    """A view of CLIP's text modules with the same stages as the image tower.

    OpenAI keeps the text modules at the top level of the model (``transformer``, ``token_embedding``, …); this
    view groups them without changing any state-dict key.
    """

    def __init__(self, model: CLIP):
        self._model = model

    @property
    def blocks(self) -> nn.Sequential:
        return self._model.transformer.resblocks

    @property
    def width(self) -> int:
        return self._model.transformer.width

    @property
    def token_embedding(self) -> nn.Embedding:
        return self._model.token_embedding

    @property
    def context_length(self) -> int:
        return self._model.positional_embedding.shape[0]

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Word embeddings of token ids, without positions (what prompt methods splice learned vectors into)."""
        return self._model.token_embedding(tokens)

    def embed(self, tokens: torch.Tensor | None = None, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (computed from ``tokens`` or given as ``token_embeds``) plus positions."""
        if (tokens is None) == (token_embeds is None):
            raise ValueError("pass exactly one of tokens or token_embeds")
        x = self.embed_tokens(tokens) if token_embeds is None else token_embeds
        return x + self._model.positional_embedding[: x.shape[1]].to(x.dtype)

    def forward_blocks(self, x: torch.Tensor, hook: Hook | None = None, after: AfterHook | None = None,
                       attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._model.transformer(x, hook, after, attn_mask)

    def pool(self, x: torch.Tensor, eot_positions: torch.Tensor) -> torch.Tensor:
        """Projected features at ``eot_positions`` (one index per sequence)."""
        x = x[torch.arange(x.shape[0], device=x.device), eot_positions]
        return self._model.ln_final(x) @ self._model.text_projection


def eot_positions(tokens: torch.Tensor) -> torch.Tensor:
    """Index of the end-of-text token of each sequence: the largest id, as in OpenAI's CLIP."""
    return tokens.argmax(dim=-1)


def truncate_after_eot(x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """Cut sequences after the last EOT position of the batch.

    Exact under the causal mask: no kept position attends to a removed one.
    """
    return x[:, : int(eot.max()) + 1]


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.context_length = config.context_length
        if config.is_vit:
            self.visual = VisionTransformer(
                config.image_size, config.vision_patch_size, config.vision_width, config.vision_layers,
                config.vision_heads, config.embed_dim, config.quick_gelu, config.vision_mlp_width,
            )
        else:
            self.visual = ModifiedResNet(
                config.vision_layers, config.embed_dim, config.vision_heads, config.image_size, config.vision_width
            )
        self.transformer = Transformer(
            config.text_width, config.text_layers, config.text_heads, config.quick_gelu, causal=True,
            mlp_width=config.text_mlp_width,
        )
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.text_width))
        self.ln_final = LayerNorm(config.text_width)
        self.text_projection = nn.Parameter(torch.empty(config.text_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(4.605170185988092))  # log(100), OpenAI's trained value
        self._init_text_parameters()

    def _init_text_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.config.text_width**-0.5)

    @property
    def text(self) -> TextTower:
        return TextTower(self)

    @property
    def vision(self) -> VisionTransformer | ModifiedResNet:
        return self.visual

    @property
    def is_vit(self) -> bool:
        return isinstance(self.visual, VisionTransformer)

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor, truncate: bool = True) -> torch.Tensor:
        """Text features of token ids ``[N, context]``; ``truncate`` cuts after the last EOT (exact, faster)."""
        eot = eot_positions(tokens)
        if truncate:
            tokens = truncate_after_eot(tokens, eot)
        text = self.text
        return text.pool(text.forward_blocks(text.embed(tokens)), eot)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities ``[images, texts]``."""
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        return self.logit_scale.exp() * image_features @ text_features.t()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_per_image = self.logits(self.encode_image(images), self.encode_text(tokens))
        return logits_per_image, logits_per_image.t()

    def forward_lockstep(self, x_img: torch.Tensor, x_txt: torch.Tensor, couple: Couple | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the two towers' blocks side by side; ``couple(layer, x_img, x_txt)`` runs before block ``layer``.

        Inputs are the outputs of the towers' ``embed``; outputs go to their ``pool``. Where the towers differ in
        depth, the shallower one's state is passed through unchanged for the remaining layers.
        """
        if not self.is_vit:
            raise ValueError("the lockstep driver needs a ViT image tower (a ResNet has no token sequence)")
        img_blocks, txt_blocks = self.visual.blocks, self.text.blocks
        for layer in range(max(len(img_blocks), len(txt_blocks))):
            if couple is not None:
                x_img, x_txt = couple(layer, x_img, x_txt)
            if layer < len(img_blocks):
                x_img = img_blocks[layer](x_img)
            if layer < len(txt_blocks):
                x_txt = txt_blocks[layer](x_txt)
        return x_img, x_txt
