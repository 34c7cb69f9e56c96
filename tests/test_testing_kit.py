"""The contract kit (promptclip.testing) catches broken methods: each deliberately broken plugin fails exactly the
checks it breaks, and a sound one passes them all (the built-ins pass them in test_contract.py). These toy methods
need no deep towers, so the checks run on a 2-layer backbone (check_method's ``backbone=``)."""

import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from promptclip.clip.architectures import build_random
from promptclip.clip.model import CLIPConfig
from promptclip.methods import PromptMethod
from promptclip.methods.base import cosine_logits
from promptclip.methods.prompts import build_class_prompts, encode_text_embeddings, encode_texts
from promptclip.testing import CHECKS, ContractError, check_method

SMALL = CLIPConfig(embed_dim=48, image_size=32, vision_layers=2, vision_width=64, vision_patch_size=16,
                   vision_heads=2, context_length=77, vocab_size=49408, text_width=64, text_heads=2, text_layers=2)


def small_backbone():
    return build_random(SMALL, seed=3)


@dataclass
class ShiftConfig:
    scale: float = 0.5


class Shift(PromptMethod):
    """Sound: a learned, seeded shift of the image features; frozen text features of the class names."""

    name = "kit_shift"
    config_class = ShiftConfig
    image_independent_text = True

    def __init__(self, backbone, config, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        self.shift = nn.Parameter(self.initial_shift(backbone.config.embed_dim))
        self.register_buffer("text", torch.empty(0), persistent=False)
        self.set_classnames(classnames, template)

    def initial_shift(self, width):
        return torch.randn(width, generator=torch.Generator().manual_seed(0)) * 0.1

    def rebuild_class_buffers(self):
        self.text = encode_texts(self.clip, [(self.template or "{}.").format(c) for c in self.classnames])

    def encode_classes(self):
        return self.text

    def image_features(self, batch):
        return self.clip.encode_image(batch["image"])

    def forward(self, batch):
        return cosine_logits(self.clip, self.image_features(batch) + self.config.scale * self.shift,
                             self.class_features())


class TrainsBackbone(Shift):
    name = "kit_trains_backbone"

    def __init__(self, backbone, config, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        self.clip.visual.proj.requires_grad_(True)  # the deliberate bug: a backbone tensor is trained


class ChangesBackbone(Shift):
    name = "kit_changes_backbone"

    def forward(self, batch):
        if self.training:
            with torch.no_grad():
                self.clip.logit_scale.add_(0.01)
        return super().forward(batch)


class WrongShape(Shift):
    name = "kit_wrong_shape"

    def forward(self, batch):
        return super().forward(batch)[:, :1]


class KeepsOldClasses(Shift):
    name = "kit_keeps_old_classes"

    def rebuild_class_buffers(self):
        if self.text.numel() == 0:
            super().rebuild_class_buffers()


class Unseeded(Shift):
    name = "kit_unseeded"

    def initial_shift(self, width):
        return torch.randn(width) * 0.1  # global RNG


class BatchDependent(Shift):
    name = "kit_batch_dependent"

    def image_features(self, batch):
        features = super().image_features(batch)
        return features - features.mean(dim=0, keepdim=True)


class TeacherAtEval(Shift):
    name = "kit_teacher_at_eval"

    def forward(self, batch):
        self.clip.encode_image(batch["image"])  # the deliberate bug: a training-only teacher pass at evaluation
        return super().forward(batch)


class IgnoresPrecomputedFeatures(Shift):
    name = "kit_ignores_precomputed"
    frozen_image_features = True  # declared, but its image path reads batch["image"], never image_features_of(batch)


class LosesAdapterState(Shift):
    name = "kit_loses_adapter"

    def load_adapter_state(self, state, strict=True):
        pass


@dataclass
class PromptConfig:
    pass


class LearnedPrompt(PromptMethod):
    """Sound: a learned vector added to every class prompt's token embeddings, encoded through the engine's text
    path (which follows the text-memory policy)."""

    name = "kit_prompt"
    config_class = PromptConfig
    image_independent_text = True

    def __init__(self, backbone, config, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        width = backbone.text.width
        self.ctx = nn.Parameter(torch.randn(width, generator=torch.Generator().manual_seed(1)) * 0.02)
        self.set_classnames(classnames, template)

    def rebuild_class_buffers(self):
        self.prompts = build_class_prompts(self.clip, [f"a photo of {c}." for c in self.classnames])

    def embeddings(self):
        return self.prompts.embeddings + self.ctx

    def encode_classes(self):
        return encode_text_embeddings(self.clip, self.embeddings(), self.prompts.eot)

    def forward(self, batch):
        return cosine_logits(self.clip, self.clip.encode_image(batch["image"]), self.class_features())


class BypassesTextMemory(LearnedPrompt):
    name = "kit_bypasses_text_memory"

    def encode_classes(self):
        text = self.clip.text  # the whole class set through the tower in one pass, whatever the policy
        return text.pool(text.forward_blocks(text.embed(token_embeds=self.embeddings())), self.prompts.eot)


@pytest.fixture(scope="module")
def backbone():
    return small_backbone()


def failed_checks(cls, backbone) -> set[str]:
    with pytest.raises(ContractError) as err:
        check_method(cls, backbone=backbone)
    return set(re.findall(r"^- (\w+):", str(err.value), flags=re.MULTILINE))


@pytest.mark.parametrize("cls", [Shift, LearnedPrompt])
def test_sound_methods_pass_every_check(cls, backbone, isolated_registry):
    check_method(cls, backbone=backbone)


@pytest.mark.parametrize("cls, expected", [
    (TrainsBackbone, {"gradients", "frozen_backbone", "adapter_round_trip"}),
    (ChangesBackbone, {"frozen_backbone", "text_memory"}),  # the second of its two steps sees another model
    (WrongShape, {"logits", "class_names", "gradients", "frozen_backbone", "text_memory"}),
    (KeepsOldClasses, {"class_names"}),
    (Unseeded, {"determinism"}),
    (BatchDependent, {"batch_independence"}),
    (LosesAdapterState, {"adapter_round_trip"}),
    (TeacherAtEval, {"eval_image_passes"}),
    (IgnoresPrecomputedFeatures, {"frozen_image_features"}),
    (BypassesTextMemory, {"text_memory"}),
])
def test_each_broken_plugin_fails_the_checks_it_breaks(cls, expected, isolated_registry):
    # A fresh backbone: some of these methods change it.
    assert failed_checks(cls, small_backbone()) == expected


def test_the_message_says_what_is_wrong(backbone, isolated_registry):
    with pytest.raises(ContractError, match=r"backbone tensors get gradients: clip\.visual\.proj"):
        check_method(TrainsBackbone, checks=["gradients"], backbone=small_backbone())
    with pytest.raises(ContractError, match="encode_text_embeddings"):
        check_method(BypassesTextMemory, checks=["text_memory"], backbone=backbone)
    with pytest.raises(ValueError, match="unknown contract check"):
        check_method(Shift, checks=["gradient"], backbone=backbone)
    assert list(CHECKS) == ["logits", "gradients", "frozen_backbone", "adapter_round_trip", "class_names",
                            "determinism", "batch_independence", "text_memory", "eval_image_passes",
                            "frozen_image_features"]
