"""The method contract, run over every registered method (a new method is tested without touching this file).

The backbone has 12 layers per tower (official prompt depths fit) but small, unequal widths, so that a method
with hard-coded dimensions fails here. Every method runs with its default (official) configuration.
"""

import pytest
import torch

from promptclip.checkpoint import load_adapter, read_adapter, save_adapter
from promptclip.clip.architectures import build_random
from promptclip.clip.model import CLIPConfig
from promptclip.methods import create_method, list_methods

CONTRACT_BACKBONE = CLIPConfig(embed_dim=96, image_size=64, vision_layers=12, vision_width=192, vision_patch_size=16,
                               vision_heads=3, context_length=77, vocab_size=49408, text_width=128, text_heads=2,
                               text_layers=12)
CLASSES = ["annual crop land", "forest", "sea or lake", "highway or road"]
METHODS = list_methods()


@pytest.fixture(scope="module")
def backbone():
    return build_random(CONTRACT_BACKBONE, seed=11)


def make_batch(n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 3, 64, 64, generator=g),
        "label": torch.arange(n) % len(CLASSES),
        "caption": [f"an aerial image with texture number {i}" for i in range(n)],
        "index": torch.arange(n),
    }


def build(name, backbone):
    return create_method(name, backbone, CLASSES, template="a centered satellite photo of {}.")


def perturb(method, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.named_trainable():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def eval_logits(method, batch):
    method.eval()
    with torch.no_grad():
        return method(batch)


def test_registry_has_the_methods_we_exist_for():
    assert {"zeroshot", "coop"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_logits_shape_and_finite(name, backbone):
    logits = eval_logits(build(name, backbone), make_batch())
    assert logits.shape == (4, len(CLASSES))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", METHODS)
def test_only_method_tensors_get_gradients(name, backbone):
    method = build(name, backbone)
    method.train()
    batch = make_batch()
    loss = method.loss(batch, method(batch))["loss"]
    if method.num_trainable() == 0:  # nothing learned (zero-shot): nothing may carry a gradient either
        assert loss.grad_fn is None
        return
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    grads = [p.grad for _, p in method.named_trainable()]
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads)
    method.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", METHODS)
def test_backbone_unchanged_after_an_optimizer_step(name, backbone):
    method = build(name, backbone)
    if method.num_trainable() == 0:
        assert not any(p.requires_grad for p in method.parameters())
        return
    before_backbone = {k: v.clone() for k, v in backbone.state_dict().items()}
    before_method = method.adapter_state()
    optimizer = torch.optim.SGD([p for _, p in method.named_trainable()], lr=0.1, momentum=0.9, weight_decay=5e-4)
    method.train()
    batch = make_batch()
    method.loss(batch, method(batch))["loss"].backward()
    optimizer.step()
    after = backbone.state_dict()
    assert all(torch.equal(before_backbone[k], after[k]) for k in before_backbone)
    changed = [n for n, p in method.named_trainable() if not torch.equal(p, before_method[n])]
    assert changed, "the step changed no method tensor"


@pytest.mark.parametrize("name", METHODS)
def test_adapter_round_trip_is_strict_and_holds_no_backbone_tensor(name, backbone, tmp_path):
    method = build(name, backbone)
    perturb(method)
    path = save_adapter(tmp_path / name, method, "contract", "fp")
    _, tensors = read_adapter(path)
    assert set(tensors) == {n for n, _ in method.named_trainable()}
    assert not any(n.startswith("clip.") for n in tensors)
    assert sum(t.numel() for t in tensors.values()) == method.num_trainable()
    loaded = load_adapter(path, backbone, backbone_fingerprint="fp")
    batch = make_batch()
    assert torch.equal(eval_logits(loaded, batch), eval_logits(method, batch))


@pytest.mark.parametrize("name", METHODS)
def test_set_classnames_changes_the_class_set_and_back(name, backbone):
    method = build(name, backbone)
    perturb(method)
    batch = make_batch()
    original = eval_logits(method, batch)
    method.set_classnames(["river", "pasture land"])
    assert eval_logits(method, batch).shape == (4, 2)
    method.set_classnames(CLASSES)
    assert torch.allclose(eval_logits(method, batch), original, atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_result(name, backbone):
    batch = make_batch()
    a, b = build(name, backbone), build(name, backbone)
    assert all(torch.equal(pa, pb) for (_, pa), (_, pb) in zip(a.named_trainable(), b.named_trainable(), strict=True))
    assert torch.equal(eval_logits(a, batch), eval_logits(b, batch))


@pytest.mark.parametrize("name", METHODS)
def test_eval_logits_independent_of_batch_size_unless_declared(name, backbone):
    method = build(name, backbone)
    perturb(method)
    batch = make_batch()
    whole = eval_logits(method, batch)
    halves = torch.cat([
        eval_logits(method, {k: v[:2] for k, v in batch.items()}),
        eval_logits(method, {k: v[2:] for k, v in batch.items()}),
    ])
    if method.batch_independent:
        assert torch.allclose(whole, halves, atol=1e-5)
    else:
        assert not torch.allclose(whole, halves, atol=1e-5), f"{name} declares batch dependence but shows none"
