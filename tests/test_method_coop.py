"""CoOp and zero-shot CLIP beyond the goldens: the zero-shot oracle, class positions, CSC, parameter counts."""

import pytest
import torch

from promptclip.clip.architectures import ARCHITECTURES, build_random
from promptclip.clip.model import CLIP
from promptclip.clip.tokenizer import tokenize
from promptclip.errors import ConfigError
from promptclip.methods import create_method

CLASSES = ["annual crop land", "forest", "sea_or_lake"]


@pytest.fixture(scope="module")
def backbone():
    return build_random("tiny", seed=1)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def test_coop_initialised_from_a_photo_of_a_equals_zero_shot_at_step_0(backbone, images):
    coop = create_method("coop", backbone, CLASSES, {"ctx_init": "a photo of a"}).eval()
    zeroshot = create_method("zeroshot", backbone, CLASSES, template="a photo of a {}.").eval()
    with torch.no_grad():
        assert torch.allclose(coop({"image": images}), zeroshot({"image": images}), atol=1e-5)


def test_zero_shot_equals_plain_clip_logits(backbone, images):
    zeroshot = create_method("zeroshot", backbone, CLASSES, template="a centered satellite photo of {}.").eval()
    texts = [f"a centered satellite photo of {name.replace('_', ' ')}." for name in CLASSES]
    with torch.no_grad():
        expected, _ = backbone(images, tokenize(texts))
        assert torch.allclose(zeroshot({"image": images}), expected, atol=1e-5)


def test_zero_shot_ensemble_averages_normalised_features(backbone, images):
    templates = ["a photo of a {}.", "art of the {}."]
    ensemble = create_method("zeroshot", backbone, CLASSES, {"templates": "custom", "custom_templates": templates})
    with torch.no_grad():
        feats = []
        for template in templates:
            f = backbone.encode_text(tokenize([template.format(n.replace("_", " ")) for n in CLASSES]))
            feats.append(f / f.norm(dim=-1, keepdim=True))
        mean = torch.stack(feats).mean(0)
        expected = backbone.logits(backbone.encode_image(images), mean)
        assert torch.allclose(ensemble.eval()({"image": images}), expected, atol=1e-5)


@pytest.mark.parametrize("position", ["middle", "front"])
def test_class_position_moves_the_name_tokens(backbone, position):
    method = create_method("coop", backbone, CLASSES, {"n_ctx": 4, "class_token_position": position})
    embeds = method.prompt_embeddings()
    ctx = method.ctx
    name_len = 3  # "annual crop land" is three BPE tokens
    name_ids = tokenize(["annual crop land"])[0, 1 : 1 + name_len]
    name_emb = backbone.token_embedding.weight[name_ids]
    row = embeds[0]
    if position == "front":
        assert torch.equal(row[1 : 1 + name_len], name_emb)
        assert torch.equal(row[1 + name_len : 1 + name_len + 4], ctx)
    else:
        assert torch.equal(row[1:3], ctx[:2])
        assert torch.equal(row[3 : 3 + name_len], name_emb)
        assert torch.equal(row[3 + name_len : 5 + name_len], ctx[2:])
    period = backbone.token_embedding.weight[269]
    assert torch.equal(row[5 + name_len], period)


def test_class_specific_context_refuses_other_class_names(backbone):
    method = create_method("coop", backbone, CLASSES, {"n_ctx": 4, "csc": True})
    assert method.ctx.shape == (3, 4, backbone.text.width)
    with pytest.raises(ConfigError, match="class-specific context"):
        method.set_classnames(["river", "pasture"])


def test_unknown_config_key_suggests_the_right_one(backbone):
    with pytest.raises(ConfigError, match="did you mean 'n_ctx'"):
        create_method("coop", backbone, CLASSES, {"n_cxt": 4})
    with pytest.raises(ConfigError, match="did you mean 'coop'"):
        create_method("cop", backbone, CLASSES)


def test_coop_runs_on_a_resnet_backbone():
    method = create_method("coop", build_random("tiny-rn", seed=0), CLASSES, {"n_ctx": 4}).eval()
    with torch.no_grad():
        logits = method({"image": torch.randn(2, 3, 64, 64)})
    assert logits.shape == (2, 3)


@pytest.mark.parametrize("config, expected", [({"n_ctx": 16}, 8192), ({"ctx_init": "a photo of a"}, 2048)])
def test_trainable_counts_of_official_vit_b16_configs(config, expected):
    backbone = CLIP(ARCHITECTURES["ViT-B/16"])
    assert create_method("coop", backbone, CLASSES, config).num_trainable() == expected


def test_init_words_set_the_context_length_by_words_and_keep_extra_tokens_frozen(backbone):
    # "a tortoiseshell" is 2 words but more BPE tokens: the reference learns 2 vectors (the leading token
    # embeddings) and keeps the rest of the words' tokens as frozen prompt tokens.
    from promptclip.clip.tokenizer import get_tokenizer

    words = "a tortoiseshell"
    ids = get_tokenizer().encode(words)
    assert len(ids) > 2
    method = create_method("coop", backbone, CLASSES, {"ctx_init": words})
    assert method.ctx.shape[0] == 2
    assert torch.equal(method.ctx, backbone.token_embedding.weight[ids[:2]])
    row = method.prompt_embeddings()[0]
    assert torch.equal(row[3 : 1 + len(ids)], backbone.token_embedding.weight[ids[2:]])


def test_csc_is_ignored_with_init_words_as_in_the_reference(backbone):
    method = create_method("coop", backbone, CLASSES, {"ctx_init": "a photo of a", "csc": True})
    assert method.ctx.shape == (4, backbone.text.width)
    method.set_classnames(["river", "pasture"])
    assert method.num_classes == 2
