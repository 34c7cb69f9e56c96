"""Linear probe (CoOp's lpclip) parity with the golden of the reference script (tests/golden/methods/linear_probe.md):
the few-shot draws, every C of the search, every val/test accuracy, the final classifier. Every fact (shots, seeds,
num_step, search list) is read from the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from parity import GOLDEN_DIR

pytest.importorskip("sklearn", reason="the linear probe needs scikit-learn (pip install 'promptclip[sklearn]')")

from promptclip.feature_fit import FeatureFitData  # noqa: E402
from promptclip.methods import create_method  # noqa: E402
from promptclip.methods import linear_probe as lp  # noqa: E402

pytestmark = pytest.mark.skipif(not (GOLDEN_DIR / "linear_probe.json").exists(), reason="no linear-probe golden")


@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    meta = json.loads((GOLDEN_DIR / "linear_probe.json").read_text())
    return meta, load_file(GOLDEN_DIR / "linear_probe.safetensors")


def _arrays(tensors, split):
    return tensors[f"input.{split}_features"].double().numpy(), tensors[f"input.{split}_labels"].numpy()


def _num_step(meta) -> int:
    argv = meta["cfg"]["argv"]
    return int(argv[argv.index("--num_step") + 1])


def _run(meta, tensors, run, same_versions: bool):
    x, y = _arrays(tensors, "train")
    xv, yv = _arrays(tensors, "val")
    xt, yt = _arrays(tensors, "test")
    rng = np.random.RandomState()
    np.random.seed(run["seed"])  # the reference's global stream, then val continues it
    state = np.random.get_state()
    rng.set_state(state)
    train_idx = lp.lpclip_fewshot(y, run["shot"], rng)
    val_idx = lp.lpclip_fewshot(yv, meta["cfg"]["val_shot_list"][str(run["shot"])], rng)
    assert train_idx == run["train_idx"] and val_idx == run["val_idx"]
    found = lp.search_c((x[train_idx], y[train_idx]), (xv[val_idx], yv[val_idx]), meta["cfg"]["search_list"],
                        _num_step(meta), test=(xt, yt))
    return found, (xt, yt)


def test_search_and_classifier_match_reference(golden):
    meta, tensors = golden
    import scipy
    import sklearn

    same = (sklearn.__version__, scipy.__version__) == (meta["sklearn"], meta["scipy"])
    for run in meta["runs"]:
        found, (xt, yt) = _run(meta, tensors, run, same)
        where = f"shot {run['shot']} seed {run['seed']}"
        assert found["init_val_acc"] == run["init_val_acc"], where
        assert found["peak_idx"] == run["peak_idx"], where
        assert len(found["steps"]) == len(run["steps"]), where
        for ours, ref in zip(found["steps"], run["steps"], strict=True):
            for key in ("c_left", "c_right", "c_final", "val_acc_left", "val_acc_right"):
                assert ours[key] == ref[key], (where, key, ours[key], ref[key])
            assert ours["test_acc"] == pytest.approx(ref["test_acc"], abs=1e-9), where
        assert found["final_C"] == run["final_C"], where
        prefix = f"final.shot{run['shot']}_seed{run['seed']}"
        clf = found["clf"]
        assert np.array_equal(clf.predict(xt), tensors[f"{prefix}.test_pred"].numpy()), where
        tol = 1e-10 if same else 1e-3
        proba = torch.as_tensor(clf.predict_proba(xt))
        assert (proba - tensors[f"{prefix}.test_proba"]).abs().max().item() <= tol, where
        if same:
            assert np.allclose(clf.coef_, tensors[f"{prefix}.coef"].numpy(), rtol=0, atol=1e-10), where
            assert np.allclose(clf.intercept_, tensors[f"{prefix}.intercept"].numpy(), rtol=0, atol=1e-10), where


def test_method_fit_features_gives_the_reference_classifier(golden):
    """The method (the engine's fit_features path) on one run's few-shot features: same C, same test predictions,
    logits equal to sklearn's decision function; the adapter round trip keeps them."""
    from promptclip.testing import contract_backbone

    meta, tensors = golden
    run = meta["runs"][-1]
    x, y = tensors["input.train_features"], tensors["input.train_labels"]
    xv, yv = tensors["input.val_features"], tensors["input.val_labels"]
    classes = [f"class {i}" for i in range(int(y.max()) + 1)]
    backbone = contract_backbone()
    config = lp.LinearProbeConfig(search_list=meta["cfg"]["search_list"], num_step=_num_step(meta))
    method = create_method("linear_probe", backbone, classes, config)
    # the golden's features are 512-wide; the probe's width follows the features it is fitted on
    data = FeatureFitData(lambda start, count: x[None], y,
                          {"train": (x[run["train_idx"]], y[run["train_idx"]]),
                           "val": (xv[run["val_idx"]], yv[run["val_idx"]])}, None)
    summary = method.fit_features(data)
    assert summary["C"] == run["final_C"] and float(method.C) == run["final_C"]
    xt = tensors["input.test_features"]
    with torch.no_grad():
        logits = method({"image_features": xt})
    prefix = f"final.shot{run['shot']}_seed{run['seed']}"
    assert torch.equal(logits.argmax(1), tensors[f"{prefix}.test_pred"])
    fresh = create_method("linear_probe", backbone, classes, config)
    fresh.load_adapter_state(method.adapter_state())
    with torch.no_grad():
        assert torch.equal(fresh({"image_features": xt}), logits)


def test_mutation_python_pow_fails(golden, monkeypatch):
    """Quirk: the search's ends come back from log10 through numpy's power; Python's ``**`` gives other C values on
    some run of the golden (the comparison must fail)."""
    meta, tensors = golden
    monkeypatch.setattr(lp, "pow10", lambda x: 10 ** float(x))
    differs = False
    for run in meta["runs"]:
        found, _ = _run(meta, tensors, run, True)
        if any(o[k] != r[k] for o, r in zip(found["steps"], run["steps"], strict=True) for k in ("c_left", "c_right")):
            differs = True
            break
    assert differs


def test_mutation_ties_go_right_fails(golden):
    """The tie rule: letting the right end win ties changes the chosen C on the golden's runs."""
    meta, tensors = golden
    ties = [s for r in meta["runs"] for s in r["steps"] if s["val_acc_left"] == s["val_acc_right"]
            and s["c_left"] != s["c_right"]]
    assert ties and all(s["c_final"] == s["c_left"] for s in ties)


def test_linear_probe_is_fewshot_only():
    from promptclip.protocols import make_cells

    cells = make_cells("base2novel", ["eurosat-sample"], ["linear_probe"], [1], [16])
    assert all(c.not_applicable for c in cells)
