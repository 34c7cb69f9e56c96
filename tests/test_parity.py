"""Parity with the reference implementations, driven entirely by the golden files in tests/golden/.

For every golden: our method is built from the reference's trainer options, its tensors take the reference's
initial values through the method's name map, and eval logits, features, the training loss and every gradient
must match within the tolerances of tests/golden/README.md.
"""

import pytest
import torch

from parity import (
    assert_close_grad,
    assert_close_values,
    build_method,
    golden_batch,
    load_golden,
    method_golden_names,
)

GOLDENS = method_golden_names()


def test_goldens_are_present():
    assert len(GOLDENS) >= 11


@pytest.fixture(scope="module", params=GOLDENS)
def golden(request):
    return load_golden(request.param)


def test_name_map_covers_every_trainable_tensor(golden):
    method, name_map = build_method(golden)
    reference = {entry["name"] for entry in golden.meta["trainable_params"]}
    assert set(name_map) == reference
    assert set(name_map.values()) == set(dict(method.named_trainable()))
    assert len(set(name_map.values())) == len(name_map)
    assert method.num_trainable() == sum(entry["numel"] for entry in golden.meta["trainable_params"])


def test_eval_logits_match(golden):
    method, _ = build_method(golden)
    method.eval()
    with torch.no_grad():
        logits = method(golden_batch(golden, train=False))
    assert_close_values(logits, golden.tensors["eval.logits"], f"{golden.name} eval.logits")


def test_train_loss_and_gradients_match(golden):
    method, name_map = build_method(golden)
    method.train()
    _, losses = method.training_step(golden_batch(golden, train=True))
    assert_close_values(losses["loss"], golden.tensors["train.loss"], f"{golden.name} train.loss")
    method.backward(losses, lambda loss: loss)  # the method's own gradient step (e.g. a projection), as fit runs it
    params = dict(method.named_trainable())
    largest = max(((g or {}).get("max_abs", 0.0) for g in golden.meta.get("grads", {}).values()), default=0.0)
    for reference_name, ours in name_map.items():
        grad = params[ours].grad
        if reference_name in golden.meta["params_without_grad"]:
            assert grad is None or torch.count_nonzero(grad) == 0, f"{reference_name} must get no gradient"
            continue
        key = f"grad.{reference_name}"
        if key in golden.tensors:
            assert_close_grad(grad, golden.tensors[key], key, largest)
        else:
            assert_close_grad(grad, golden.tensors[f"gradrows.{reference_name}"], f"gradrows.{reference_name}",
                              largest)
