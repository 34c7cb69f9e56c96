"""RPO, Read-only Prompt Optimization (Lee et al., ICCV 2023; mlvlab/RPO ``trainers/rpo.py`` with its
``clip/model.py``, whose transformers take an attention mask at call time).

Learned: ``K`` text prompt tokens ``[K, text width]`` and ``K`` visual prompt tokens ``[K, vision width]``;
nothing else. The prompts are read-only: they attend to the original tokens, but nothing attends to them (not even
a prompt to itself or to another prompt), so every original token computes exactly what plain CLIP computes.

- Text, per class: the prompt ``"a photo of a <class>."`` (``prompt`` with ``_`` replaced by the class name, which
  keeps its own underscores) as token + positional embeddings; positions ``len + i`` (``len``: one past EOT) hold
  text prompt ``i`` with no positional embedding. Mask: causal, and no position attends to a column ``>= len``.
  Features: ``ln_final`` of the rows ``len + i`` times the text projection, ``[C, K, D]``.
- Image: CLS + patches + positions, then the ``K`` visual prompts appended (no positional embedding), ``ln_pre``
  over all; mask: no token attends to the last ``K`` columns. Features: ``ln_post`` of the last ``K`` tokens times
  the projection, ``[B, K, D]``.
- Logits: ``sum_i exp(logit_scale) * cos(img_f[:, i], text_f[:, i]) / K``: prompt ``i`` of one tower is matched
  with prompt ``i`` of the other only, accumulated in float32 in the order ``i = 0 .. K-1`` as the reference does.

The masks go through the backbone's general ``attn_mask`` argument (on top of the text tower's causal mask). The
reference writes the prompts in place into its text buffer; on the GPU that buffer is a fresh copy every forward,
which is what is reproduced here (the prompts are inserted out of place into the pristine embeddings every time).
Its hard-coded sizes (8 text heads, a 14 x 14 grid, 768 / 512 widths) are read from the backbone here.

Init (reference): ``text_prompt = E[EOT] + 0.1 * n_t / ||n_t||`` and ``img_prompt = class_embedding +
0.1 * n_v / ||n_v||`` per row, ``n_t`` then ``n_v`` standard normal draws (from ``init_seed`` here; the reference
draws from the global generator after CLIP's own random init, which no seed alone reproduces).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..clip.tokenizer import ContextLengthError, get_tokenizer, tokenize
from ..errors import ConfigError
from ..memory import plan_text_pass, run_in_chunks
from .base import PromptMethod, reference_options, register


@dataclass
class RPOConfig:
    #: K: read-only prompt tokens per tower.
    k: int = 24
    #: The class prompt, ``_`` standing for the class name (the reference's ``DATASET.PROMPT``).
    prompt: str = "a photo of a _."
    #: Seed of the prompts' random init (explicit; independent of any global RNG).
    init_seed: int = 0
    #: Classes per text-encoder chunk (None: the engine's automatic chunking, promptclip.memory).
    text_chunk_size: int | None = None


def initial_prompts(clip, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's init: (text ``[K, text width]``, visual ``[K, vision width]``), ``n_t`` drawn first."""
    noise_text = torch.randn((k, clip.text.width), generator=generator)
    noise_visual = torch.randn((k, clip.visual.width), generator=generator)
    with torch.no_grad():
        eot = clip.token_embedding.weight[get_tokenizer().eot_id].detach().float().cpu()  # 49407
        cls = clip.visual.class_embedding.detach().float().cpu()
    text = eot.expand(k, -1) + 0.1 * (noise_text / noise_text.norm(dim=-1, keepdim=True))
    visual = cls.expand(k, -1) + 0.1 * (noise_visual / noise_visual.norm(dim=-1, keepdim=True))
    return text, visual


def read_only_columns(lengths: torch.Tensor, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive masks ``[N, 1, size, size]``: ``-inf`` in every column ``>= lengths[n]`` (nothing attends there)."""
    columns = torch.arange(size, device=lengths.device)
    blocked = columns.unsqueeze(0) >= lengths.unsqueeze(1)  # [N, size]
    mask = torch.zeros(blocked.shape, dtype=dtype, device=lengths.device).masked_fill(blocked, float("-inf"))
    return mask[:, None, None, :].expand(-1, 1, size, -1)


def last_columns_blocked(size: int, k: int, dtype: torch.dtype = torch.float32,
                         device: torch.device | None = None) -> torch.Tensor:
    """An additive mask ``[size, size]``: ``-inf`` in the last ``k`` columns (nothing attends to those tokens)."""
    mask = torch.zeros(size, size, dtype=dtype, device=device)
    mask[:, size - k :] = float("-inf")
    return mask


@register
class RPO(PromptMethod):
    name = "rpo"
    config_class = RPOConfig
    supports_resnet = False
    image_independent_text = True
    reference_trainers = ("RPO",)

    def __init__(self, backbone, config: RPOConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        if config.k < 1:
            raise ConfigError(f"rpo: k (prompt tokens per tower) must be at least 1, got {config.k}")
        if "_" not in config.prompt:
            raise ConfigError(f"rpo: prompt {config.prompt!r} has no '_' where the class name goes")
        text, visual = initial_prompts(self.clip, config.k, torch.Generator().manual_seed(config.init_seed))
        device = self.clip.token_embedding.weight.device
        self.text_prompt = nn.Parameter(text.to(device))
        self.img_prompt = nn.Parameter(visual.to(device))
        self.set_classnames(classnames, template)

    @property
    def k(self) -> int:
        return self.text_prompt.shape[0]

    def rebuild_class_buffers(self) -> None:
        clip = self.clip
        context = clip.text.context_length
        texts = [_fill(self.config.prompt, name) for name in self.given_classnames]
        tokens = tokenize(texts, context_length=context).to(self.device)
        lengths = tokens.argmax(dim=-1) + 1
        for text, length in zip(texts, lengths.tolist(), strict=True):
            if length + self.k > context:
                raise ContextLengthError(
                    f"rpo: the prompt {text!r} has {length} tokens; with its {self.k} read-only prompts after it, it "
                    f"needs {length + self.k} of the {context} text positions", text=text,
                    num_tokens=length + self.k, context_length=context)
        size = int(lengths.max()) + self.k
        embeds = clip.text.embed(tokens[:, :size])
        self.register_buffer("text_x", embeds, persistent=False)
        self.register_buffer("lengths", lengths, persistent=False)

    # -- towers ----------------------------------------------------------------------------------------------------

    def _text_rows(self, start: int, stop: int) -> torch.Tensor:
        """Text features ``[stop - start, K, D]`` of classes ``start .. stop``."""
        clip = self.clip
        lengths = self.lengths[start:stop]
        pristine = self.text_x[start:stop]  # never written: every forward starts from the pristine embeddings
        slots = lengths.unsqueeze(1) + torch.arange(self.k, device=lengths.device)  # [n, K]
        index = slots.unsqueeze(-1).expand(-1, -1, pristine.shape[-1])
        prompts = self.text_prompt.to(pristine.dtype).unsqueeze(0).expand(pristine.shape[0], -1, -1)
        x = pristine.scatter(1, index, prompts)
        x = clip.text.forward_blocks(x, attn_mask=read_only_columns(lengths, x.shape[1], x.dtype))
        rows = x.gather(1, index)
        return clip.ln_final(rows) @ clip.text_projection

    def encode_classes(self) -> torch.Tensor:
        """Per-class text features of the K prompts ``[C, K, D]``, under the text-memory policy."""
        num = self.text_x.shape[0]
        plan = plan_text_pass(num, self.text_x.shape[1], self.config.text_chunk_size)
        if plan.chunk is None and not plan.checkpoint:
            return self._text_rows(0, num)
        return run_in_chunks(self._text_rows, num, plan.chunk or num, plan.checkpoint)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image features of the K visual prompts ``[B, K, D]``."""
        visual = self.clip.visual
        x = visual.embed(images, self.img_prompt)
        size = x.shape[1]
        x = visual.forward_blocks(x, attn_mask=last_columns_blocked(size, self.k, x.dtype, x.device))
        return visual.ln_post(x[:, size - self.k:]) @ visual.proj

    def forward(self, batch) -> torch.Tensor:
        image = self.encode_image(batch["image"])
        text = self.class_features()
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        scale = self.clip.logit_scale.exp()
        logits = torch.zeros(image.shape[0], text.shape[0], dtype=torch.float32, device=image.device)
        for i in range(self.k):  # the reference's accumulation: float32, prompt by prompt
            logits = logits + scale * image[:, i] @ text[:, i].t()
        return logits / self.k

    # -- reference -------------------------------------------------------------------------------------------------

    @classmethod
    def config_from_reference(cls, trainer) -> RPOConfig:
        # CTX_INIT is declared in the reference's configs but never read by its trainer.
        opts = reference_options(trainer, {"K", "CTX_INIT"}, cls.name)
        return RPOConfig(k=opts.get("K", RPOConfig.k))

    def reference_name_map(self) -> dict[str, str]:
        return {"prompt_learner.text_prompt": "text_prompt", "prompt_learner.img_prompt": "img_prompt"}


def _fill(prompt: str, name: str) -> str:
    """The reference's ``prompt.replace("_", name)``: every ``_`` of the prompt becomes the class name as given."""
    return prompt.replace("_", name)
