"""TCP (Yao, Zhang, Xu, CVPR 2024): textual-based class-aware prompt tuning.

Reference: htyao89/Textual-based_Class-aware_prompt_tuning ``trainers/tcp.py`` with the class-aware injection of its
CLIP copy ``trainers/clip_text/model.py`` (card: tests/golden/methods/tcp.md). What is learned:

- ``ctx``: ``n_ctx`` shared context vectors that replace the tokens after SOS of a per-dataset prompt sentence
  (EuroSAT: "X X X X {}."; UCF101 and ImageNet have no placeholders and the vectors replace "a photo of a");
- ``meta_net``: ``Linear(D -> D // 4) -> QuickGELU -> Linear(-> 4 x text width)`` applied to the frozen, normalised
  CLIP features ``t0`` of a second, hand-crafted sentence per class ("a centered satellite photo of {}."): four
  class-aware tokens per class.

Text pass: the prompt runs through the text tower; before block ``injection_layer`` (8 of 12 in the reference,
hard-coded there) token positions ``1..4`` of every class's sequence are replaced by that class's four tokens, so the
blocks from there on see them and ``ctx`` acts only through the earlier blocks. The loss is

    CE(logits, y) + 8.0 * (1 - mean_c cos(t_c, t0_c))

with the weight 8.0 written into the reference's forward: its config weight ``TRAINER.COOP.W`` reaches the text
encoder but is overwritten there and never used. :meth:`TCP.config_from_reference` accepts ``W`` and ignores it as
the reference does; ``loss_weight`` (default 8.0) is where promptclip lets the weight be changed.

The reference trains with Adam, eps 1e-3 (its README's edit of Dassl's ``build_optimizer``): the presets set
``train.optimizer: adam`` and ``train.adam_eps: 1.0e-3``.

Templates: the method is given the dataset's CoOp template (as every method is) and maps it to TCP's two sentences.
CoOp's "a photo of a {}." is StanfordCars', SUN397's, Caltech101's and the ImageNets' template: it maps to the prompt
sentence of SUN397 and Caltech101 ("X X X X {}."); StanfordCars ("X X X X {}, a type of car") and the ImageNets ("a
photo of a {}.") need ``prompt_template`` set. The frozen sentence is the same for all four. A template TCP does not
know gives the frozen sentence itself and the prompt "X X X X {}.".
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..clip.model import QuickGELU, truncate_after_eot
from ..data.templates import CUSTOM_TEMPLATES, check_template
from ..errors import ConfigError
from ..memory import plan_text_pass, run_in_chunks
from .base import PromptMethod, cosine_logits, reference_options, register
from .cocoop import _uniform_linear
from .prompts import build_class_prompts, check_prompts_fit, frozen_class_features, init_words_embedding, normal_init

#: Class-aware tokens per class: the reference's meta-net output is four text-width vectors, whatever ``N_CTX`` is.
CLASS_AWARE_TOKENS = 4
#: The words ``CTX_INIT`` initialises the context with in the reference (its value is never read).
CTX_INIT_WORDS = "a photo of a"

#: TCP's per-dataset sentence of the frozen class features (the reference's ``CUSTOM_TEMPLATES_ori``).
TCP_FROZEN_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of an aircraft {}.",
    "DescribableTextures": "a photo of a {}, a type of texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of a {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}
#: TCP's per-dataset prompt sentence, whose tokens after SOS the context replaces (the reference's
#: ``CUSTOM_TEMPLATES``).
TCP_PROMPT_TEMPLATES = {
    "OxfordPets": "X X X X {}, a type of pet.",
    "OxfordFlowers": "X X X X {}, a type of flower.",
    "FGVCAircraft": "X X X X {}, a type of aircraft.",
    "DescribableTextures": "X X X X {} texture.",
    "EuroSAT": "X X X X {}.",
    "StanfordCars": "X X X X {}, a type of car",
    "Food101": "X X X X {}, a type of food.",
    "SUN397": "X X X X {}.",
    "Caltech101": "X X X X {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}
#: The prompt sentence for a template TCP has no entry for.
GENERIC_PROMPT_TEMPLATE = "X X X X {}."
#: CoOp's template "a photo of a {}." is several datasets'; it maps to SUN397's and Caltech101's prompt sentence.
_SHARED_COOP_TEMPLATE_DATASET = "SUN397"


def _by_coop_template(table: dict[str, str]) -> dict[str, str]:
    """``table`` keyed by the CoOp template of each dataset (the template the method is handed)."""
    out = {}
    for dataset, coop in CUSTOM_TEMPLATES.items():
        if coop not in out or dataset == _SHARED_COOP_TEMPLATE_DATASET:
            out[coop] = table[dataset]
    return out


_FROZEN_FOR = _by_coop_template(TCP_FROZEN_TEMPLATES)
_PROMPT_FOR = _by_coop_template(TCP_PROMPT_TEMPLATES)


@dataclass
class TCPConfig:
    #: Context vectors (the reference's ``N_CTX``; 4 matches its four-placeholder sentences).
    n_ctx: int = 4
    #: The reference's ``CTX_INIT`` switch: True initialises the context with the embeddings of "a photo of a"
    #: (then ``n_ctx`` is 4), False draws it from N(0, ``init_std``).
    ctx_init: bool = False
    #: The text block before which the class-aware tokens replace positions 1..4 (the reference hard-codes 8 of 12).
    injection_layer: int = 8
    #: Weight of the knowledge term (8.0, hard-coded in the reference; its ``TRAINER.COOP.W`` has no effect).
    loss_weight: float = 8.0
    #: Prompt sentence with the class slot ``{}`` (e.g. "X X X X {}, a type of car"); "" maps the dataset's template.
    prompt_template: str = ""
    #: Sentence of the frozen class features (e.g. "a photo of a {}."); "" maps the dataset's template.
    frozen_template: str = ""
    init_std: float = 0.02
    #: Seed of the random context (``init_seed``) and of the meta-net (``init_seed + 1``); no global RNG is used.
    init_seed: int = 0
    #: Classes per text-tower chunk (None: the engine's automatic chunking, promptclip.memory).
    text_chunk_size: int | None = None


@register
class TCP(PromptMethod):
    name = "tcp"
    config_class = TCPConfig
    image_independent_text = True
    frozen_image_features = True
    reference_trainers = ("TCP",)
    #: Goldens record the injection layer they patched into the reference (cfg.tcp_injection_layer).
    reference_cfg_keys = ("tcp_injection_layer",)

    def __init__(self, backbone, config: TCPConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        for field_name in ("prompt_template", "frozen_template"):
            if getattr(config, field_name):
                check_template(getattr(config, field_name), f"tcp: {field_name}")
        layers = len(backbone.text.blocks)
        if not 0 <= config.injection_layer < layers:
            raise ConfigError(f"tcp: injection_layer must be a text block index 0..{layers - 1} of this backbone "
                              f"({layers} text blocks), got {config.injection_layer}; the reference uses 8 of 12")
        width = backbone.text.width
        if config.ctx_init:
            ctx = init_words_embedding(backbone, CTX_INIT_WORDS)[: len(CTX_INIT_WORDS.split())]
        else:
            if config.n_ctx < 1:
                raise ConfigError(f"tcp: n_ctx must be at least 1, got {config.n_ctx}")
            ctx = normal_init((config.n_ctx, width), config.init_std, config.init_seed)
        self.ctx = nn.Parameter(ctx)
        dim = backbone.visual.output_dim
        if dim < 4:
            raise ConfigError(f"tcp: the embedding ({dim}) is too narrow for a meta-net of width dim // 4")
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.utils.skip_init(nn.Linear, dim, dim // 4)),
            ("relu", QuickGELU()),
            ("linear2", nn.utils.skip_init(nn.Linear, dim // 4, CLASS_AWARE_TOKENS * width)),
        ]))  # skip_init: no draw from the global RNG; nn.Linear's distribution from the seeded generator below
        generator = torch.Generator().manual_seed(config.init_seed + 1)
        _uniform_linear(self.meta_net.linear1, generator)
        _uniform_linear(self.meta_net.linear2, generator)
        self._last_text_features: torch.Tensor | None = None
        self.set_classnames(classnames, template)

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[0]

    @property
    def prompt_template(self) -> str:
        if self.config.prompt_template:
            return self.config.prompt_template
        return _PROMPT_FOR.get(self.template, GENERIC_PROMPT_TEMPLATE) if self.template else GENERIC_PROMPT_TEMPLATE

    @property
    def frozen_template(self) -> str:
        if self.config.frozen_template:
            return self.config.frozen_template
        template = self.template or "a photo of a {}."
        return _FROZEN_FOR.get(template, template)

    def rebuild_class_buffers(self) -> None:
        texts = [self.prompt_template.format(name) for name in self.classnames]
        prompts = build_class_prompts(self.clip, texts, self.classnames)
        shortest = int(prompts.eot.min())
        if shortest <= max(self.n_ctx, CLASS_AWARE_TOKENS):
            raise ConfigError(f"tcp: the prompt {texts[int(prompts.eot.argmin())]!r} has {shortest - 1} tokens, fewer "
                              f"than the {max(self.n_ctx, CLASS_AWARE_TOKENS)} that the context and the class-aware "
                              "tokens replace")
        self.register_buffer("token_prefix", prompts.embeddings[:, :1], persistent=False)
        self.register_buffer("token_suffix", prompts.embeddings[:, 1 + self.n_ctx :], persistent=False)
        self.register_buffer("eot", prompts.eot, persistent=False)
        # The frozen class features t0: computed at first use for the current classes (fp32, never trained).
        check_prompts_fit(self.clip, [self.frozen_template], self.classnames)
        self.register_buffer("_frozen_features", None, persistent=False)

    @property
    def frozen_text_features(self) -> torch.Tensor:
        """L2-normalised frozen CLIP features ``[C, D]`` of the frozen sentence for the current classes (fp32)."""
        if self._frozen_features is None:
            self._frozen_features = frozen_class_features(self.clip, self.frozen_template, self.classnames)
        return self._frozen_features

    def class_aware_tokens(self) -> torch.Tensor:
        """Meta-net output ``[C, 4, text width]`` for the current classes."""
        frozen = self.frozen_text_features
        tokens = self.meta_net(frozen.to(self.meta_net.linear1.weight.dtype))
        return tokens.reshape(frozen.shape[0], CLASS_AWARE_TOKENS, -1)

    def encode_classes(self) -> torch.Tensor:
        tokens = self.class_aware_tokens()
        num = self.token_prefix.shape[0]
        ctx = self.ctx.unsqueeze(0).expand(num, -1, -1).to(self.token_prefix.dtype)
        embeds = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        layer_at = self.config.injection_layer
        text = self.clip.text

        def run(start: int, stop: int) -> torch.Tensor:
            rows = tokens[start:stop]

            def inject(layer: int, x: torch.Tensor) -> torch.Tensor:
                if layer != layer_at:
                    return x
                return torch.cat([x[:, :1], rows.to(x.dtype), x[:, 1 + CLASS_AWARE_TOKENS :]], dim=1)

            eot = self.eot[start:stop]
            x = text.embed(token_embeds=truncate_after_eot(embeds[start:stop], eot))
            return text.pool(text.forward_blocks(x, inject), eot)

        # Chunks of classes, checkpointed while training, by the text-memory policy (promptclip.memory); each chunk
        # injects its own classes' tokens.
        plan = plan_text_pass(num, int(self.eot.max()) + 1, self.config.text_chunk_size)
        if plan.chunk is None and not plan.checkpoint:
            return run(0, num)
        return run_in_chunks(run, num, plan.chunk or num, plan.checkpoint)

    def forward(self, batch) -> torch.Tensor:
        text_features = self.class_features()
        self._last_text_features = text_features  # the knowledge term of ``loss`` uses the same forward's features
        return cosine_logits(self.clip, self.image_features_of(batch), text_features)

    def knowledge_gap(self, text_features: torch.Tensor) -> torch.Tensor:
        """``1 - mean_c cos(t_c, t0_c)`` (cosine eps 1e-7, as the reference's ``CosineSimilarity``)."""
        text_features = text_features.float()
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        return 1.0 - F.cosine_similarity(text_features, self.frozen_text_features.float(), dim=1, eps=1e-7).mean()

    def loss(self, batch, logits) -> dict[str, torch.Tensor]:
        text_features, self._last_text_features = self._last_text_features, None
        if text_features is None:
            raise RuntimeError("tcp: call the method on the batch before loss() (the knowledge term needs its "
                               "features)")
        ce = F.cross_entropy(logits, batch["label"].to(logits.device))
        score = self.knowledge_gap(text_features)
        return {"loss": ce + self.config.loss_weight * score, "loss_ce": ce, "score": score}

    def reference_loss_terms(self, terms) -> dict[str, float]:
        return {"loss_ce": terms["loss_ce"], "score": terms["score"], "w_hardcoded": self.config.loss_weight}

    @classmethod
    def config_from_reference(cls, trainer) -> TCPConfig:
        # W reaches the reference's text encoder but is overwritten there (weights=[1.0]) and the loss hard-codes 8.0;
        # CLASS_TOKEN_POSITION and ALPHA are never read. tcp_injection_layer: a golden's patched injection layer.
        known = {"N_CTX", "CSC", "CTX_INIT", "W", "CLASS_TOKEN_POSITION", "ALPHA", "tcp_injection_layer"}
        opts = reference_options(trainer, known, cls.name)
        if opts.get("CSC", False):
            raise ConfigError("tcp: CSC True has no working reference (its prompt learner expands a shared context)")
        ctx_init = bool(opts.get("CTX_INIT", False))
        return TCPConfig(n_ctx=len(CTX_INIT_WORDS.split()) if ctx_init else int(opts.get("N_CTX", 4)),
                         ctx_init=ctx_init, injection_layer=int(opts.get("tcp_injection_layer", 8)))

    def reference_name_map(self) -> dict[str, str]:
        names = {"prompt_learner.ctx": "ctx"}
        for layer in ("linear1", "linear2"):
            for kind in ("weight", "bias"):
                names[f"prompt_learner.meta_net.{layer}.{kind}"] = f"meta_net.{layer}.{kind}"
        return names
