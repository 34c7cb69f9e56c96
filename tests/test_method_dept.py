"""DePT (dept_coop, dept_maple) beyond the generic parity suite: the parts of the fused logits, the novel-class
evaluation (similarity only), the training loss terms, the two learning-rate groups, the Dassl checkpoint of the
MaPLe host (built here in the reference's layout: its golden file is not shipped), and mutation checks showing that
the comparisons fail when a mechanism is turned off. Everything is read from the golden files."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from parity import (
    GOLDEN_DIR,
    assert_close_values,
    build_method,
    golden_backbone,
    golden_batch,
    load_golden,
    logits_error,
    method_for,
    replay_trajectory,
    run_replay,
    trajectory_errors,
)
from promptclip.checkpoint import load_adapter
from promptclip.cli import main
from promptclip.config import from_dict
from promptclip.errors import ConfigError
from promptclip.methods import EvalContext, PromptMethod, create_method, get_method_class
from promptclip.methods.dept import DePT
from promptclip.presets import load_preset
from promptclip.reference import LAYOUTS, find_checkpoint, load_into_method, read_checkpoint
from promptclip.train import TrainConfig, make_optimizer, train_config_from_dassl

ONE_STEP = [name for name in ("dept_coop", "dept_maple") if (GOLDEN_DIR / f"{name}.json").exists()]
TRAJECTORIES = [name for name in ONE_STEP if (GOLDEN_DIR / f"{name}.trajectory.json").exists()]


def logits(method, images: torch.Tensor, context: EvalContext | None = None) -> torch.Tensor:
    if context is not None:
        method.set_eval_context(context)
    method.eval()
    with torch.no_grad():
        return method({"image": images})


def novel_classnames(golden) -> list[str]:
    return golden.meta["extra"]["novel_eval"]["classnames"]


def novel_logits(method, golden, images: torch.Tensor) -> torch.Tensor:
    """What a protocol does for the novel half: swap in the novel class names, evaluate in the 'new' context."""
    method.set_classnames(novel_classnames(golden))
    return logits(method, images, EvalContext("new", source=True, protocol="base2novel"))


# -- one step ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ONE_STEP)
def golden(request):
    return load_golden(request.param)


def test_fused_logits_are_made_of_the_reference_parts(golden):
    method, _ = build_method(golden)
    images = golden.images()
    tensors = golden.tensors
    w = method.config.lp_weight
    assert w == golden.meta["cfg"]["trainer_full"]["LINEAR_PROBE"]["WEIGHT"]
    assert_close_values(logits(method, images), tensors["eval.logits"], "fused")
    method.config.test_time_fusion = False  # the head alone on the training classes
    assert_close_values(logits(method, images), tensors["eval.logits_head"], "eval.logits_head")
    method.config.test_time_fusion = True
    method.set_classnames(list(reversed(golden.classnames)))  # a transfer target with the same classes: rows by name
    reordered = logits(method, images, EvalContext("all", source=False))
    assert_close_values(reordered, tensors["eval.logits"].flip(1), "fused, classes reversed")


def test_novel_classes_get_similarity_logits_only(golden):
    method, _ = build_method(golden)
    images = golden.images()
    base_similarity = golden.tensors["eval.logits_similarity"]
    assert (base_similarity - golden.tensors["eval.logits"]).abs().max() > 1e-2  # fusion changes the base logits
    ours = novel_logits(method, golden, images)
    assert_close_values(ours, golden.tensors["eval.novel_logits"], "eval.novel_logits")
    # The novel prompts are the reference's (input.novel_tokenized_prompts).
    from promptclip.clip.tokenizer import tokenize
    from promptclip.methods.prompts import prompt_texts

    tokens = tokenize(prompt_texts(method.prefix_text, method.classnames))
    assert torch.equal(tokens, golden.tensors["input.novel_tokenized_prompts"])
    # Back on the base classes in their own context: fused again.
    method.set_classnames(golden.classnames)
    assert_close_values(logits(method, images, EvalContext("base")), golden.tensors["eval.logits"], "base again")


def test_cross_dataset_target_with_other_classes_gets_similarity_logits(golden):
    method, _ = build_method(golden)
    images = golden.images()
    method.set_classnames(novel_classnames(golden))
    transfer = logits(method, images, EvalContext("all", source=False, protocol="cross_dataset"))
    assert_close_values(transfer, golden.tensors["eval.novel_logits"], "transfer target")


def test_domain_generalisation_subset_takes_the_head_rows_by_name(golden):
    method, _ = build_method(golden)
    images = golden.images()
    keep = [0, 2, 3]  # like ImageNet-A/R: a subset of the training classes
    method.set_classnames([golden.classnames[i] for i in keep])
    subset = logits(method, images, EvalContext("all", source=False, protocol="domain_generalization"))
    assert_close_values(subset, golden.tensors["eval.logits"][:, keep], "subset of the head's classes")


def test_training_loss_terms_and_head_rows(golden):
    method, _ = build_method(golden)
    method.train()
    batch = golden_batch(golden, train=True)
    similarity = method(batch)  # as training_step: forward, then loss
    head_logits, head_labels = method._train_head
    losses = method.loss(batch, similarity)
    tensors = golden.tensors
    assert_close_values(similarity, tensors["train.logits_similarity"], "train.logits_similarity")
    assert_close_values(head_logits, tensors["train.logits_head"], "train.logits_head")
    assert torch.equal(head_labels, tensors["train.labels_head"].to(head_labels.dtype))
    assert_close_values(losses["loss_cls"], tensors["train.loss_ce"], "train.loss_ce")
    assert_close_values(losses["loss_cls_lp"], tensors["train.loss_head"], "train.loss_head")
    assert_close_values(losses["loss"], tensors["train.loss"], "train.loss")
    with pytest.raises(RuntimeError, match="training forward"):
        method.loss(batch, similarity)  # the head rows are used once


def test_film_starts_at_identity_and_param_groups_are_the_reference_groups(golden):
    method, name_map = build_method(golden)
    for side in ("film_img", "film_text"):
        assert torch.equal(getattr(method, side).scale, torch.ones_like(getattr(method, side).scale))
        assert torch.equal(getattr(method, side).bias, torch.zeros_like(getattr(method, side).bias))
    fresh = create_method(method.name, golden_backbone(golden), golden.classnames, method.config)
    assert torch.equal(fresh.film_img.scale, method.film_img.scale)  # ones / zeros are the init, not the recipe's
    names = {id(p): n for n, p in method.named_trainable()}
    ours = [[names[id(p)] for p in group["params"]] for group in method.param_groups()]
    reference = [[name_map[n] for n in group["trainable"]] for group in golden.meta["extra"]["optimizer_param_groups"]]
    assert [sorted(g) for g in ours] == [sorted(g) for g in reference]
    optim = golden.meta["cfg"]["optim"]
    config = train_config_from_dassl(optim, 4, method_options=type(method).reference_optim_options)
    optimizer = make_optimizer(method, config)
    lr, exp, mult = optim["LR"], optim["LR_EXP"], optim["BASE_LR_MULT"]
    assert [g["base_lr"] for g in optimizer.param_groups] == [(lr * exp) * (mult / exp), lr * exp]  # bit for bit


def test_reference_options_outside_the_implementation_are_refused(golden):
    cls = get_method_class(method_for(golden))
    cfg = golden.meta["cfg"]
    full = cfg["trainer_full"]
    for change in ({"LINEAR_PROBE": {**full["LINEAR_PROBE"], "TYPE": "similarity"}},
                   {"FILM": {"LINEAR_PROBE": False}}, {"NAMES_TO_UPDATE": ["prompt_learner"]},
                   {"LINEAR_PROBE": {**full["LINEAR_PROBE"], "NEW_KEY": 1}}):
        with pytest.raises(ConfigError, match="LINEAR_PROBE|FILM|NAMES_TO_UPDATE|NEW_KEY"):
            cls.config_from_reference_cfg({**cfg, "trainer_full": {**full, **change}})
    with pytest.raises(ConfigError, match="STAGED_LR"):
        cls.config_from_reference_cfg({**cfg, "optim": {**cfg["optim"], "STAGED_LR": False}})
    changed = cls.config_from_reference_cfg({**cfg, "optim": {**cfg["optim"], "LR_EXP": 3.0},
                                             "trainer_full": {**full, "LINEAR_PROBE": {
                                                 **full["LINEAR_PROBE"], "WEIGHT": 0.4, "TEST_TIME_FUSION": False}}})
    assert (changed.lr_exp, changed.lp_weight, changed.test_time_fusion) == (3.0, 0.4, False)
    with pytest.raises(ConfigError, match="lp_weight"):
        from_dict(cls.config_class, {"lp_weight": 1.5})


def test_training_on_other_classes_than_the_head_is_refused(golden):
    method, _ = build_method(golden)
    method.set_classnames(novel_classnames(golden))
    method.train()
    with pytest.raises(ConfigError, match="head"):
        method.training_step({"image": golden.images(), "label": torch.zeros(4, dtype=torch.long)})


# -- trajectory --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=TRAJECTORIES)
def replay(request):
    return replay_trajectory(request.param)


def test_trajectory_parts_and_novel_logits_before_and_after_training(replay):
    golden = replay.golden
    images = golden.tensors["input.eval_images"]
    method = replay.method  # trained
    bar = 1.0
    method.config.test_time_fusion = False
    assert logits_error(logits(method, images), golden.tensors["eval.logits_head"]) <= bar
    method.config.test_time_fusion = True
    trained = method.adapter_state()
    assert logits_error(novel_logits(method, golden, images), golden.tensors["eval.novel_logits"]) <= bar
    fresh, _ = build_method(golden)  # initial values
    assert logits_error(novel_logits(fresh, golden, images), golden.tensors["eval.novel_logits_init"]) <= bar
    method.set_classnames(golden.classnames)
    method.load_adapter_state(trained)
    assert logits_error(logits(method, images, EvalContext("base")), golden.tensors["eval.logits"]) <= bar


# -- the Dassl checkpoint ----------------------------------------------------------------------------------------------


def dassl_checkpoint(folder, golden, values: dict[str, torch.Tensor]):
    """What the reference's Dassl ``save_model`` writes for DePT (tests/golden/methods/dept.md): the whole model's
    state dict (here without the frozen CLIP, as the shipped goldens), the class buffers, SGD with two param groups
    in the reference's order (host prompt learner, then FiLM + head) and the scheduler holding its
    ``CosineAnnealingLR`` object."""
    width = values["prompt_learner.ctx"].shape[-1]
    n_cls, n_ctx = len(golden.classnames), values["prompt_learner.ctx"].shape[-2]
    state = OrderedDict((name, value.clone()) for name, value in values.items())
    state["prompt_learner.token_prefix"] = torch.randn(n_cls, 1, width)
    state["prompt_learner.token_suffix"] = torch.randn(n_cls, 77 - 1 - n_ctx, width)
    host = [torch.nn.Parameter(v.clone()) for n, v in values.items() if n.startswith("prompt_learner.")]
    new = [torch.nn.Parameter(v.clone()) for n, v in values.items() if not n.startswith("prompt_learner.")]
    sgd = torch.optim.SGD([{"params": host, "lr": 0.0035}, {"params": new, "lr": 0.02275}], lr=0.0035, momentum=0.9,
                          weight_decay=5e-4)
    for p in [*host, *new]:
        p.grad = torch.ones_like(p)
    sgd.step()
    scheduler = {"cons_lr": 1e-5, "successor": torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=3),
                 "warmup_epoch": 1, "base_lrs": [0.0035, 0.02275], "last_epoch": 2}
    layout = LAYOUTS[golden.meta["method"]]
    path = folder / layout.registered_name / "model.pth.tar-3"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "epoch": 3, "optimizer": sgd.state_dict(), "scheduler": scheduler,
                "val_result": None}, path)
    return path


@pytest.mark.skipif(not (GOLDEN_DIR / "dept_maple.dassl-skipped.json").exists(), reason="no dept_maple golden")
def test_dept_maple_checkpoint_built_in_the_reference_layout_imports(tmp_path, one_torch_thread):
    skipped = json.loads((GOLDEN_DIR / "dept_maple.dassl-skipped.json").read_text())
    assert skipped["registered_model"]["name"] == LAYOUTS["dept_maple"].registered_name
    replay = replay_trajectory("dept_maple")  # our run of the trajectory: its final values, the reference's layout
    golden = replay.golden
    dassl_checkpoint(tmp_path, golden, replay.final_params)
    method, name_map = build_method(golden)  # initial values: the import must replace them
    checkpoint = read_checkpoint(find_checkpoint(tmp_path, LAYOUTS["dept_maple"].registered_name))
    report = load_into_method(checkpoint, method, "golden-mini")
    assert set(report.tensors) == set(name_map)
    assert report.dropped_buffers == ["prompt_learner.token_prefix", "prompt_learner.token_suffix"]
    assert report.inferred == {"n_ctx": method.config.n_ctx, "depth": method.config.depth}
    images = golden.tensors["input.eval_images"]
    assert logits_error(logits(method, images), golden.tensors["eval.logits"]) <= 1
    params = dict(method.named_trainable())
    assert all(torch.equal(params[ours], replay.final_params[ref]) for ref, ours in name_map.items())  # exact
    assert logits_error(novel_logits(method, golden, images), golden.tensors["eval.novel_logits"]) <= 1


@pytest.mark.skipif(not (GOLDEN_DIR / "dept_coop.dassl.json").exists(), reason="no dept_coop checkpoint golden")
def test_cli_import_of_the_dept_coop_checkpoint_evaluates_base_and_novel(tmp_path, one_torch_thread):
    meta = json.loads((GOLDEN_DIR / "dept_coop.dassl.json").read_text())
    golden = load_golden(meta["trajectory_golden"]["json"].removesuffix(".json"))
    folder = GOLDEN_DIR / meta["registered_model"]["file"].split("/")[0]
    optimizer = torch.load(GOLDEN_DIR / meta["registered_model"]["file"], weights_only=False)["optimizer"]
    assert len(optimizer["param_groups"]) == 2  # DePT's staged learning rates, as the card says
    out = tmp_path / "imported"
    config = build_method(golden)[0].config  # the golden run's config: set what differs from the preset's
    preset = from_dict(type(config), load_preset(LAYOUTS["dept_coop"].default_preset).method_config)
    sets = [f"method_config.{f.name}={json.dumps(getattr(config, f.name))}" for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(preset, f.name)]
    argv = ["import", str(folder), "--out", str(out), "--backbone", "golden-mini", "--quiet", "--method", "dept_coop",
            "--classnames", ",".join(golden.classnames), *[a for s in sets for a in ("--set", s)]]
    assert main(argv) == 0
    images = golden.tensors["input.eval_images"]
    method = load_adapter(out / "adapter.safetensors", golden_backbone(golden))
    assert logits_error(logits(method, images), golden.tensors["eval.logits"]) <= 1
    assert logits_error(novel_logits(method, golden, images), golden.tensors["eval.novel_logits"]) <= 1


# -- mutation checks: the comparisons above can fail -------------------------------------------------------------------


def test_mutation_fusion_on_novel_classes_fails_the_novel_comparison(golden, monkeypatch):
    method, _ = build_method(golden)
    # Fuse whatever the context says, with the head's first rows standing in for the novel classes.
    monkeypatch.setattr(DePT, "uses_head", lambda self: True)
    monkeypatch.setattr(DePT, "head_logits",
                        lambda self, image: self.head(self.film_img(image))[:, : len(self.classnames)])
    ours = novel_logits(method, golden, golden.images())
    expected = golden.tensors["eval.novel_logits"]
    ratio = (ours - expected).abs().max().item() / (1e-4 * max(1.0, expected.abs().max().item()))
    print(f"{golden.name}: fusion on novel classes puts eval.novel_logits off by {ratio:.0f}x the bar")
    assert ratio > 100


def test_mutation_a_single_learning_rate_group_fails_the_trajectory(monkeypatch):
    name = TRAJECTORIES[0]
    monkeypatch.setattr(DePT, "param_groups", PromptMethod.param_groups)
    errors = trajectory_errors(run_replay(name))
    print(f"{name} with one learning-rate group: {json.dumps({k: round(v, 1) for k, v in errors.items()})}")
    assert errors["lr"] > 1 and errors["final_params"] > 1 and errors["logits"] > 1


def test_mutation_head_without_text_rows_fails_the_loss(golden, monkeypatch):
    method, _ = build_method(golden)
    method.train()
    batch = golden_batch(golden, train=True)
    method(batch)
    head_logits, labels = method._train_head
    image_rows_only = F.cross_entropy(head_logits[len(labels) // 2:], labels[len(labels) // 2:])
    error = abs(image_rows_only.item() - golden.tensors["train.loss_head"].item())
    assert error > 1e-4 * max(1.0, golden.tensors["train.loss_head"].abs().item())


# -- the engine extension used here: a group's lr as a function of the run's lr --------------------------------------


class TwoRates:
    """A toy method for make_optimizer: one group at a rate derived from the run's lr in a given float order, one at
    a derived rate times a factor."""

    name = "two_rates"

    def __init__(self):
        self.a, self.b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))

    def named_trainable(self):
        return iter([("a", self.a), ("b", self.b)])

    def param_groups(self):
        return [{"params": [self.a], "lr": lambda lr: (lr * 6.5) * (1.0 / 6.5)},
                {"params": [self.b], "lr": lambda lr: lr * 3, "lr_mult": 2.0}]

    def build_optimizer(self, groups, config):
        return None


def test_param_group_lr_may_be_a_function_of_the_run_lr():
    from promptclip.train import _group_lrs

    config = TrainConfig(lr=0.0035, max_epoch=4, warmup_epoch=1, warmup_lr=1e-5)
    optimizer = make_optimizer(TwoRates(), config)
    assert [g["base_lr"] for g in optimizer.param_groups] == [(0.0035 * 6.5) * (1.0 / 6.5), 0.0035 * 3 * 2.0]
    assert _group_lrs(optimizer, 0, config) == [1e-5, 1e-5]  # the warm-up: one rate for every group
    first, second = _group_lrs(optimizer, 2, config)
    assert first == pytest.approx(0.5 * 0.0035 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    assert second == pytest.approx(0.5 * 0.021 * (1 + math.cos(math.pi / 4)), rel=1e-12)


def test_train_config_from_dassl_leaves_method_options_to_the_method():
    optim = {"NAME": "sgd", "LR": 0.0035, "MAX_EPOCH": 10, "STAGED_LR": True}
    with pytest.raises(ConfigError, match="STAGED_LR"):
        train_config_from_dassl(optim, 4)
    assert train_config_from_dassl(optim, 4, method_options=("STAGED_LR",)).lr == 0.0035


def test_every_dept_method_has_a_preset_matching_its_defaults():
    from promptclip.presets import default_preset, load_preset

    for name in ("dept_coop", "dept_maple"):
        preset = load_preset(default_preset("base2novel", name))
        cls = get_method_class(name)
        assert from_dict(cls.config_class, preset.method_config) == cls.config_class()
        assert (preset.train.lr, preset.train.batch_size, preset.train.max_epoch) == (0.0035, 4, 10)
        assert TrainConfig(**{**preset.train.__dict__}) == preset.train
