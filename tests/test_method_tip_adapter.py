"""Tip-Adapter / Tip-Adapter-F parity with the goldens of the reference (tests/golden/methods/tip_adapter.md).

Every fact is read from the golden files (classes, templates, shots, α/β grid, epochs, batch orders, selection), so
held-back variants can be dropped in under the same names. The goldens store every feature the reference saw, so the
image tower is skipped; the text tower (golden-mini) is run and checked against the stored classifier.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from parity import GOLDEN_DIR, Golden, assert_close_grad, assert_close_values, golden_backbone, load_golden
from promptclip.feature_fit import FeatureFitData, view_key
from promptclip.methods import create_method, get_method_class
from promptclip.methods import tip_adapter as tip

pytestmark = pytest.mark.skipif(not (GOLDEN_DIR / "tip_adapter.json").exists(), reason="no Tip-Adapter golden")


def _load(name: str) -> Golden:
    if name.endswith(".trajectory"):
        meta = json.loads((GOLDEN_DIR / f"{name}.json").read_text())
        from safetensors.torch import load_file

        return Golden(name, meta, load_file(GOLDEN_DIR / f"{name}.safetensors"))
    return load_golden(name)


def _reference_cfg(golden: Golden) -> dict:
    return {**golden.meta["cfg"]["used"], "templates": golden.meta["cfg"]["templates"]}


def _method(golden: Golden, selection: str | None = None):
    name = golden.meta["method"]
    cls = get_method_class(name)
    config = cls.config_from_reference(_reference_cfg(golden))
    if selection is not None:
        config.selection = selection
    method = create_method(name, golden_backbone(golden), golden.meta["inputs"]["classnames"], config)
    method.eval()
    return method


def _labels(golden: Golden, split: str) -> torch.Tensor:
    return golden.tensors[f"input.{split}_labels"]


def _splits(golden: Golden) -> dict:
    t = golden.tensors
    return {"val": (t["feat.val_features"], _labels(golden, "val")),
            "test": (t["feat.test_features"], _labels(golden, "test"))}


# -- training-free Tip-Adapter -------------------------------------------------------------------------------------


def _fit_training_free(golden: Golden, method=None):
    method = method or _method(golden)
    views = golden.tensors["feat.cache_view_features_raw"]
    data = FeatureFitData(lambda start, count: views[start:start + count], _labels(golden, "train"),
                          _splits(golden), None)
    summary = method.fit_features(data)
    return method, summary


def test_text_classifier_matches_reference():
    golden = _load("tip_adapter")
    method = _method(golden)
    with torch.no_grad():
        ours = method.class_features().t()
    assert_close_values(ours, golden.tensors["feat.clip_weights"], "clip_weights")


def test_cache_model_and_search_match_reference():
    golden = _load("tip_adapter")
    t, result = golden.tensors, golden.meta["result"]
    method, summary = _fit_training_free(golden)
    assert_close_values(method.cache_keys.t(), t["feat.cache_keys"], "cache_keys")
    assert torch.equal(method.cache_values, t["feat.cache_values"].to(method.cache_values.dtype))
    val, test = normalise_pair(t["feat.val_features"]), normalise_pair(t["feat.test_features"])
    with torch.no_grad():
        init = method.tip_logits(val, result["init_alpha"], result["init_beta"])
        assert_close_values(init, t["val.tip_logits_init"], "val tip logits (init)")
        assert_close_values(100.0 * val @ method.class_features().t(), t["val.clip_logits"], "val clip logits")
        assert_close_values(tip.cache_logits(method.affinity(val), method.cache_values, result["init_beta"]),
                            t["val.cache_logits_init"], "val cache logits (init)")
    # the search: the exact float grid, every accuracy equal, the same best
    found = method.last_search
    assert found["beta_list"] == t["search.beta_list"].tolist()
    assert found["alpha_list"] == t["search.alpha_list"].tolist()
    assert torch.equal(torch.tensor(found["grid"], dtype=torch.float64), t["search.val_acc_grid"])
    assert (found["beta"], found["alpha"], found["acc"]) == (result["best_beta"], result["best_alpha"],
                                                             result["best_val_acc"])
    assert summary["search"]["best_beta"] == result["best_beta"] and float(method.beta) == result["best_beta"]
    assert float(method.alpha) == result["best_alpha"]
    with torch.no_grad():
        logits = method({"image_features": t["feat.test_features"]})
        assert_close_values(logits, t["test.tip_logits_best"], "test tip logits (searched)")
        assert_close_values(tip.cache_logits(method.affinity(test), method.cache_values, result["best_beta"]),
                            t["test.cache_logits_best"], "test cache logits (searched)")


def normalise_pair(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_mutation_keys_normalised_before_averaging_fails():
    """Quirk 1: keys are the normalised mean of RAW view features; averaging normalised views must fail."""
    golden = _load("tip_adapter")
    views = golden.tensors["feat.cache_view_features_raw"]
    wrong = normalise_pair(normalise_pair(views).mean(dim=0)).t()
    with pytest.raises(AssertionError):
        assert_close_values(wrong, golden.tensors["feat.cache_keys"], "cache_keys")


def test_mutation_search_ties_fail():
    """The tie rule: keeping the LAST best (>=) instead of the first must give another (β, α) on the golden."""
    golden = _load("tip_adapter")
    grid = golden.tensors["search.val_acc_grid"]
    flat = grid.flatten().tolist()
    last = max(range(len(flat)), key=lambda i: (flat[i], i))
    first = golden.meta["result"]["first_grid_max"]["flat_index"]
    assert flat.count(max(flat)) > 1 and last != first


# -- Tip-Adapter-F ---------------------------------------------------------------------------------------------------


def _with_cache(golden: Golden, method):
    t = golden.tensors
    method._set_cache(t["init.adapter.weight"].clone(), t["feat.cache_values"].clone())
    return method


def test_tip_adapter_f_one_step_matches_reference():
    golden = _load("tip_adapter_f")
    t, cfg = golden.tensors, golden.meta["cfg"]["used"]
    method = _with_cache(golden, _method(golden))
    view = golden.meta["batch"]["view"] - cfg["augment_epoch"]
    features = normalise_pair(t["feat.train_view_features_raw_per_epoch"][view])
    index = t["train.batch_index"]
    method.train()
    logits = method.tip_logits(features[index], float(cfg["init_alpha"]), float(cfg["init_beta"]))
    loss = F.cross_entropy(logits, _labels(golden, "train")[index])
    loss.backward()
    assert_close_values(logits, t["train.tip_logits"], "train tip logits")
    assert_close_values(loss, t["train.loss"], "loss")
    assert_close_grad(method.cache_keys.grad, t["grad.adapter.weight"], "grad adapter.weight")
    assert method.reference_name_map() == {"adapter.weight": "cache_keys"}


def _replay(golden: Golden, selection: str | None = None, patch=None):
    """Tip-Adapter-F's fit_features on the golden's features, batch orders and config."""
    t, cfg, traj = golden.tensors, golden.meta["cfg"]["used"], golden.meta["trajectory"]
    method = _method(golden, selection)
    cls = type(method)
    train = cls.train_config_from_reference(cfg, batch_size=traj["batch_size"])
    keys, per_epoch = t["feat.cache_keys"].t(), t["feat.train_view_features_raw_per_epoch"]
    augment = cfg["augment_epoch"]

    def views(start: int, count: int) -> torch.Tensor:
        if start < augment:  # the cache passes: any raw views whose normalised mean is the stored keys
            return keys.expand(count, *keys.shape)
        return per_epoch[start - augment:start - augment + count]

    steps, epochs = [], []

    def on_epoch(epoch, m):
        with torch.no_grad():
            test = normalise_pair(t["feat.test_features"])
            logits = m.tip_logits(test, float(cfg["init_alpha"]), float(cfg["init_beta"]))
        epochs.append((m.cache_keys.detach().clone(), logits))

    data = FeatureFitData(views, _labels(golden, "train"), _splits(golden), train, traj["orders"], steps.append,
                          on_epoch)
    if patch is not None:
        patch(method)
    summary = method.fit_features(data)
    return method, summary, steps, epochs


@pytest.fixture(scope="module")
def trajectory():
    golden = _load("tip_adapter_f.trajectory")
    return golden, _replay(golden)


def test_tip_adapter_f_trajectory_reference(trajectory):
    golden, (method, summary, steps, epochs) = trajectory
    t, traj = golden.tensors, golden.meta["trajectory"]
    assert len(steps) == len(traj["steps"])
    for ours, ref in zip(steps, traj["steps"], strict=True):
        assert math.isclose(ours["lr"], ref["lr"], rel_tol=1e-12), (ours, ref)
        assert abs(ours["loss"] - ref["loss"]) <= 1e-4 * max(1.0, abs(ref["loss"])), (ours, ref)
    assert [s["lr"] for s in steps] == pytest.approx(traj["lr_per_step"], rel=1e-12)
    for e, (weights, logits) in enumerate(epochs):
        assert_close_grad(weights, t[f"epoch{e}.adapter.weight"], f"epoch {e} adapter.weight")
        assert_close_values(logits, t[f"eval.epoch{e}.tip_logits"], f"epoch {e} test logits")
    assert summary["selection_acc_per_epoch"] == traj["eval_test_acc_per_epoch"]
    assert summary["best_epoch"] == traj["best_epoch"]
    assert_close_grad(method.cache_keys.detach(), t["final.adapter.weight"], "final (reloaded) adapter.weight")
    search = traj["search_with_adapter"]
    assert (summary["search"]["best_beta"], summary["search"]["best_alpha"], summary["search"]["best_acc"]) == (
        search["best_beta"], search["best_alpha"], search["best_val_acc"])
    with torch.no_grad():
        logits = method({"image_features": t["feat.test_features"]})
    assert_close_values(logits, t["eval.logits"], "final test logits (searched)")
    assert max(summary["best_selection_acc"], tip.accuracy(logits, _labels(golden, "test"))) == max(
        traj["best_test_acc"], traj["final_test_acc_printed"])


def test_tip_adapter_f_cache_keys_mutated_in_place(trajectory):
    """Quirk 4: the reference's ``cache_keys`` share storage with the adapter, and the best-epoch reload replaces the
    adapter's tensor, so after training ``cache_keys`` hold the LAST epoch's keys. The golden's ``eval.logits_init``
    (the harness's "untrained cache" logits, init α/β) were computed from those mutated keys, as the json's
    ``extra.cache_keys_mutated_in_place_by_training`` says; ours: the last epoch's keys at init α/β."""
    golden, (_, _, _, epochs) = trajectory
    assert golden.meta["extra"]["cache_keys_mutated_in_place_by_training"] is True
    t, cfg = golden.tensors, golden.meta["cfg"]["used"]
    method = _method(golden)
    method._set_cache(epochs[-1][0], t["feat.cache_values"].clone())
    with torch.no_grad():
        logits = method.tip_logits(normalise_pair(t["feat.test_features"]), float(cfg["init_alpha"]),
                                   float(cfg["init_beta"]))
    assert_close_values(logits, t["eval.logits_init"], "test logits (init α/β, keys as left by training)")


def test_tip_adapter_f_default_selects_on_val(trajectory):
    """Our default preset selects the epoch on val (labelled so); the reference's on test. Both run."""
    golden = trajectory[0]
    method, summary, steps, epochs = _replay(golden, selection="val")
    assert summary["selection"] == "val" and len(summary["selection_acc_per_epoch"]) == len(epochs)
    best = summary["best_epoch"]
    assert summary["selection_acc_per_epoch"][best] == max(summary["selection_acc_per_epoch"])
    torch.testing.assert_close(method.cache_keys.detach(), epochs[best][0], rtol=0, atol=0)


def test_mutation_cosine_per_epoch_fails():
    """Quirk 5: a cosine stepped per epoch (as Dassl's) gives other rates and weights than the reference."""
    golden = _load("tip_adapter_f.trajectory")
    traj = golden.meta["trajectory"]
    per_epoch = [traj["lr_per_step"][0] * (1 + math.cos(math.pi * (k // traj["steps_per_epoch"])
                                                        / traj["epochs"])) / 2 for k in range(len(traj["steps"]))]
    assert per_epoch != pytest.approx(traj["lr_per_step"], rel=1e-6)


def test_mutation_adamw_eps_fails():
    """Quirk 6: AdamW with torch's eps 1e-8 instead of 1e-4 must miss the epoch weights."""
    golden = _load("tip_adapter_f.trajectory")
    t = golden.tensors

    def patch(method):
        from promptclip import train as train_module

        original = train_module.make_optimizer

        def make(m, config):
            from dataclasses import replace

            return original(m, replace(config, adam_eps=1e-8))
        train_module.make_optimizer = make
        patch.restore = lambda: setattr(train_module, "make_optimizer", original)

    try:
        _, _, _, epochs = _replay(golden, patch=patch)
    finally:
        patch.restore()
    with pytest.raises(AssertionError):
        assert_close_grad(epochs[-1][0], t[f"epoch{len(epochs) - 1}.adapter.weight"], "last epoch weight")


# -- engine pieces ---------------------------------------------------------------------------------------------------


def test_view_keys_depend_on_image_seed_and_view_only():
    key = bytes(16)
    assert view_key(key, 1, 0) == view_key(key, 1, 0)
    assert len({view_key(key, 1, 0), view_key(key, 2, 0), view_key(key, 1, 1), view_key(b"\x01" * 16, 1, 0)}) == 4
    assert len(view_key(key, 1, 0)) == 16


def test_adapter_round_trip_restores_cache_and_search(tmp_path):
    from promptclip.checkpoint import read_adapter, save_adapter

    golden = _load("tip_adapter")
    method, _ = _fit_training_free(golden)
    save_adapter(tmp_path / "adapter", method, "golden-mini", "x", extra={"fit": method.fit_summary})
    meta, state = read_adapter(tmp_path / "adapter.safetensors")
    assert meta["fit"]["search"]["best_beta"] == golden.meta["result"]["best_beta"]
    fresh = _method(golden)
    fresh.load_adapter_state(state)
    with torch.no_grad():
        a = method({"image_features": golden.tensors["feat.test_features"]})
        b = fresh({"image_features": golden.tensors["feat.test_features"]})
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fit_dispatches_feature_methods_and_records_the_search(tmp_path):
    """train.fit hands a ``fits_on_features`` method to its fit_features (no epoch loop): the cache, the searched
    α/β and the views' count end up in the adapter, its JSON and fit.json; the adapter reloads to the same logits."""
    from promptclip.checkpoint import load_adapter, read_adapter
    from promptclip.data.loader import TensorDataset
    from promptclip.feature_fit import FIT_FILE
    from promptclip.testing import CLASSES, contract_backbone, make_batch
    from promptclip.train import TrainConfig, fit

    backbone = contract_backbone()
    batch = make_batch(6, 0, backbone.visual.input_resolution, len(CLASSES))
    data = TensorDataset(batch["image"], batch["label"])
    config = tip.TipAdapterConfig(augment_epoch=2, search_step=[5, 4])
    method = create_method("tip_adapter", backbone, list(CLASSES), config)
    result = fit(method, data, TrainConfig(batch_size=4, warmup_epoch=0), out_dir=tmp_path, progress=False,
                 eval_data={"val": data})
    meta, state = read_adapter(result.adapter_path)
    assert meta["fit"]["search"]["grid_size"] == [5, 4] and meta["fit"]["cache_size"] == 6
    assert json.loads((tmp_path / FIT_FILE).read_text())["search"] == meta["fit"]["search"]
    assert float(state["beta"]) == meta["fit"]["search"]["best_beta"]
    loaded = load_adapter(result.adapter_path, backbone)
    loaded.eval(), method.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), method(batch), rtol=0, atol=0)


def test_protocol_applicability_is_decided_before_any_cell():
    from promptclip.protocols import make_cells

    cells = make_cells("base2novel", ["eurosat-sample"], ["tip_adapter", "coop"], [1], [16])
    marked = {c.method: c.not_applicable for c in cells}
    assert marked["coop"] is None
    assert "does not apply to base2novel" in marked["tip_adapter"]
    assert all(c.not_applicable is None for c in make_cells("fewshot", ["eurosat-sample"], ["tip_adapter"], [1], [1]))


def test_report_shows_not_applicable(tmp_path):
    from promptclip.report.write import write_report

    base = {"protocol": "base2novel", "dataset": "eurosat-sample", "seed": 1, "shots": 16}
    records = [{**base, "method": "coop", "split": split, "accuracy": 50.0} for split in ("base", "novel")]
    records.append({**base, "method": "tip_adapter", "split": "all", "accuracy": None, "status": "not_applicable",
                    "reason": "tip_adapter does not apply to base2novel"})
    write_report(records, tmp_path, plots=False)
    text = (tmp_path / "report.md").read_text()
    assert "## Not applicable" in text and "not applicable: tip_adapter does not apply" in text


def test_presets_reference_and_default_are_labelled():
    from promptclip.presets import default_preset, load_preset

    for method in ("tip_adapter", "tip_adapter_f"):
        name = default_preset("fewshot", method, "eurosat-sample", 1)
        assert name == f"{method}/eurosat"
        assert "Tip-Adapter" in load_preset(name).source
    assert load_preset("tip_adapter_f/eurosat").method_config["selection"] == "val"
    reference = load_preset("tip_adapter_f/eurosat_reference")
    assert reference.method_config["selection"] == "test"
    assert (reference.train.max_epoch, reference.train.adam_eps, reference.train.optimizer) == (100, 1e-4, "adamw")
