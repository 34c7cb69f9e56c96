"""The Python API mirrors the CLI: backbone, method, fit, protocol, adapter prediction."""

import torch

import promptclip
from promptclip.data import load_splits


def test_api_end_to_end_on_the_bundled_sample(tmp_path):
    backbone = promptclip.load_backbone("tiny")
    assert backbone.random_weights and backbone.name == "tiny"
    grid = promptclip.run_protocol("fewshot", ["eurosat-sample"], ["coop"], backbone, tmp_path, seeds=[1], shots=[1],
                                   overrides=["train.max_epoch=1"])
    assert grid.ran == 1 and len(grid.records) == 1
    run_dir = grid.records[0]["run_dir"]
    predictor = promptclip.load_adapter(run_dir, backbone, precision="fp32")
    splits = load_splits("eurosat-sample")
    paths = [r.path for r in splits.test[:3]]
    top = predictor.predict(paths, top_k=3)
    assert len(top) == 3 and all(len(t) == 3 for t in top)
    assert all(label in splits.classnames for t in top for label, _ in t)
    # the same images through the method directly give the same probabilities
    pixels = predictor._images(paths)
    with torch.no_grad():
        direct = predictor.method({"image": pixels}).softmax(-1)
    assert torch.allclose(predictor.probabilities(paths), direct, atol=1e-6)
    # swapping class names after loading
    predictor.set_classnames(["forest", "river"])
    assert {label for label, _ in predictor.predict(paths, top_k=2)[0]} == {"forest", "river"}


def test_zero_shot_predictor_and_lazy_names():
    backbone = promptclip.load_backbone("tiny")
    predictor = promptclip.zero_shot(["forest", "river"], backbone)
    probs = predictor.probabilities(torch.zeros(2, 3, 224, 224))
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(-1), torch.ones(2))
    assert "maple" in promptclip.list_methods()
    try:
        promptclip.no_such_name  # noqa: B018
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("unknown attribute must raise")
