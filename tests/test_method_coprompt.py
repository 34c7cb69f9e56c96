"""CoPrompt (tests/golden/methods/coprompt.md) beyond the generic parity suite, and the engine mechanisms it brought:

- two augmented views per training image (``PromptMethod.train_views``, ``ImageDataset(views=...)``);
- Python-random draws inside the step (``train_randint`` / ``set_train_draws``: the reference's draws replayed);
- class descriptions as data input (``description_field``, ``--descriptions``, the bundled CoPrompt files);
- the Dassl checkpoint import, whose golden file was skipped for size: built here in the card's layout;
- mutation checks: view 2 replaced by view 1, and a wrong description draw, make the golden comparison fail.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parity import (
    GOLDEN_DIR,
    assert_close_values,
    build_method,
    golden_batch,
    golden_mini_state,
    load_golden,
    replay_trajectory,
)
from promptclip.checkpoint import read_adapter
from promptclip.cli import main
from promptclip.clip.transforms import TrainTransform
from promptclip.data import ImageDataset, load_splits
from promptclip.data.description_options import check_descriptions, with_descriptions
from promptclip.data.descriptions import DESCRIPTIONS_DIR, bundled_sets, load_descriptions, read_description_file
from promptclip.data.loader import TensorDataset
from promptclip.errors import ConfigError, DataError
from promptclip.methods import PromptMethod, register
from promptclip.methods.coprompt import CoPrompt
from promptclip.reference import LAYOUTS, find_checkpoint, load_into_method, read_checkpoint
from promptclip.train import TrainConfig, fit

GOLDEN = "coprompt"


@pytest.fixture(scope="module")
def golden():
    return load_golden(GOLDEN)


def one_step(golden, batch=None):
    """Our training step on the golden's batch (view 2 and the recorded draw included): (losses, grads by
    reference name)."""
    method, name_map = build_method(golden)
    method.train()
    _, losses = method.training_step(batch if batch is not None else golden_batch(golden, train=True))
    method.backward(losses, lambda loss: loss)
    params = dict(method.named_trainable())
    return method, losses, {ref: params[ours].grad for ref, ours in name_map.items()}


def error_ratios(golden, losses, grads) -> dict[str, float]:
    """Worst error / its bar (tests/golden/README.md) of the loss, its terms and the gradients; <= 1 passes."""
    ratios = {}
    for key in ("loss", "loss_ce", "loss_distill_text", "loss_distill_image"):
        ref = golden.tensors[f"train.{key}"]
        ratios[key] = (losses[key].detach() - ref).abs().item() / (1e-4 * max(1.0, ref.abs().item()))
    worst = 0.0
    for ref_name, grad in grads.items():
        stored = golden.tensors.get(f"grad.{ref_name}", golden.tensors.get(f"gradrows.{ref_name}"))
        ours = grad.detach()[: stored.shape[0]] if grad.shape != stored.shape else grad.detach()
        worst = max(worst, (ours - stored).abs().max().item() / (1e-4 * stored.abs().max().item()))
    ratios["grads"] = worst
    return ratios


# -- the method against the one-step golden ---------------------------------------------------------------------------


def test_config_from_the_golden_has_the_constants_values(golden):
    method, _ = build_method(golden)
    after = golden.meta["extra"]["cfg_merge"]
    assert method.config.w == golden.meta["cfg"]["trainer_full"]["W"] == after["values_after_constants"]["w"]
    assert method.config.n_ctx == golden.trainer_cfg["N_CTX"]
    assert method.config.depth == golden.trainer_cfg["PROMPT_DEPTH"]


def test_description_features_are_the_reference_ori_embedding(golden):
    method, _ = build_method(golden)
    assert_close_values(method.description_features(), golden.tensors["eval.llm_text_features"],
                        "eval.llm_text_features")


def test_loss_terms_and_the_replayed_draw_match(golden):
    _, losses, grads = one_step(golden)
    assert int(losses["description_index"]) == int(golden.tensors["train.description_index"])
    ratios = error_ratios(golden, losses, grads)
    assert max(ratios.values()) <= 1, ratios


def test_teacher_features_are_the_frozen_clip_on_view_2(golden):
    method, _ = build_method(golden)
    with torch.no_grad():
        teacher = method.clip.encode_image(golden.tensors["input.images_view2"])
    teacher = teacher / teacher.norm(dim=-1, keepdim=True)
    assert_close_values(teacher, golden.tensors["train.teacher_image_features"], "train.teacher_image_features")
    index = int(golden.tensors["train.description_index"])
    text = method.description_features()[index]
    assert_close_values(text / text.norm(dim=-1, keepdim=True), golden.tensors["train.teacher_text_features"],
                        "train.teacher_text_features")


def test_eval_needs_no_descriptions_and_no_second_view(golden):
    method, _ = build_method(golden)
    method.config.descriptions = "/nonexistent/descriptions.json"  # never read at evaluation
    method.eval()
    with torch.no_grad():
        logits = method({"image": golden.images()})
    assert_close_values(logits, golden.tensors["eval.logits"], "eval.logits")


def test_training_without_a_second_view_is_a_clear_error(golden):
    method, _ = build_method(golden)
    method.train()
    with pytest.raises(Exception, match="image_view2"):
        method.training_step({k: v for k, v in golden_batch(golden, train=True).items() if k != "image_view2"})


# -- mutation checks ------------------------------------------------------------------------------------------------


def test_mutation_second_view_replaced_by_the_first_fails_the_golden(golden):
    batch = golden_batch(golden, train=True)
    batch["image_view2"] = batch["image"]
    _, losses, grads = one_step(golden, batch)
    ratios = error_ratios(golden, losses, grads)
    print(f"view 2 := view 1: {ratios}")
    assert ratios["loss_distill_image"] > 1 and ratios["grads"] > 1


def test_mutation_another_description_draw_fails_the_golden(golden):
    method, name_map = build_method(golden)
    recorded = int(golden.tensors["train.description_index"])
    n_desc = method.description_features().shape[0]
    method.set_train_draws([(recorded + 1) % n_desc])
    method.train()
    _, losses = method.training_step(golden_batch(golden, train=True))
    method.backward(losses, lambda loss: loss)
    params = dict(method.named_trainable())
    ratios = error_ratios(golden, losses, {ref: params[ours].grad for ref, ours in name_map.items()})
    print(f"draw {recorded} -> {(recorded + 1) % n_desc}: {ratios}")
    assert ratios["loss_distill_text"] > 1 and ratios["grads"] > 1


# -- the trajectory: draws and view 2 ---------------------------------------------------------------------------------


def test_trajectory_replays_every_recorded_draw():
    replay = replay_trajectory(GOLDEN)
    recorded = replay.golden.tensors["trajectory.description_index"].tolist()
    assert [int(step["description_index"]) for step in replay.steps] == recorded
    assert [int(s["terms"]["description_index"]) for s in replay.trajectory["steps"]] == recorded


# -- the engine mechanisms, with toy methods -----------------------------------------------------------------------


@dataclass
class ToyConfig:
    texts: str | None = None


class ToyTwoViews(PromptMethod):
    """A toy method with a second view and Python-random draws: a bias per class, and a loss that depends on which
    view-2 row a ``train_randint`` draw picks."""

    name = "toy_two_views"
    config_class = ToyConfig
    train_views: ClassVar[int] = 2
    description_field: ClassVar[str | None] = "texts"

    def __init__(self, backbone, config, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        self.bias = nn.Parameter(torch.zeros(len(classnames)))
        self.draws: list[int] = []
        self.set_classnames(classnames, template)

    def forward(self, batch):
        return batch["image"].flatten(1)[:, : self.num_classes] + self.bias

    def loss(self, batch, logits):
        d = self.train_randint(0, len(batch["image_view2"]) - 1)
        self.draws.append(d)
        gap = (batch["image_view2"][d] - batch["image"][d]).abs().mean()
        return {"loss": F.cross_entropy(logits, batch["label"]) + gap * self.bias.sum(), "gap": gap}


def toy_method(classes=("a", "b")):
    from promptclip.clip.architectures import build_random

    register(ToyTwoViews)
    return ToyTwoViews(build_random("tiny"), ToyConfig(), list(classes))


def test_image_dataset_views_are_independent_and_reproducible():
    records = load_splits("eurosat-sample").train[:3]
    transform = TrainTransform(32)
    two = ImageDataset(records, transform, seed=5, views=2)
    one = ImageDataset(records, transform, seed=5)
    item = two[1]
    assert set(item) >= {"image", "image_view2", "label", "index", "path"}
    assert torch.equal(item["image"], one[1]["image"])  # view 1 is drawn exactly as in a single-view dataset
    assert not torch.equal(item["image"], item["image_view2"])  # an independent draw of the augmentation
    again = ImageDataset(records, transform, seed=5, views=2)[1]
    assert torch.equal(item["image_view2"], again["image_view2"])  # seeded by (seed, epoch, index, view)
    two.set_epoch(1)
    assert not torch.equal(two[1]["image_view2"], item["image_view2"])
    assert "image_view2" not in one[1]
    with pytest.raises(DataError, match="views"):
        ImageDataset(records, transform, views=0)


def test_training_datasets_get_the_method_views(monkeypatch):
    from promptclip.clip.architectures import build_random
    from promptclip.protocols import Backbone, RunOptions, _dataset

    backbone = Backbone(build_random("tiny"), "tiny", "x", True)
    records = load_splits("eurosat-sample").train[:2]
    train = _dataset(records, backbone, train=True, seed=1, options=RunOptions(), views=ToyTwoViews.train_views)
    test = _dataset(records, backbone, train=False, seed=1, options=RunOptions(), views=ToyTwoViews.train_views)
    assert "image_view2" in train[0] and "image_view2" not in test[0]
    assert CoPrompt.train_views == 2 and PromptMethod.train_views == 1


def test_toy_method_draws_from_train_rng_or_replays():
    images, view2 = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    data = TensorDataset(images, torch.arange(8) % 2, extras={"image_view2": view2})
    config = TrainConfig(batch_size=4, max_epoch=2, lr=0.01, precision="fp32", seed=3)
    runs = []
    for _ in range(2):
        method = toy_method()
        fit(method, data, config, progress=False)
        runs.append(method.draws)
    assert runs[0] == runs[1] and len(runs[0]) == 4  # train_rng: reseeded per epoch from (seed, epoch)
    expected = [random.Random(__import__("promptclip.data.loader", fromlist=["sample_seed"]).sample_seed(3, e, -3))
                for e in range(2)]
    assert runs[0] == [rng.randint(0, 3) for rng in expected for _ in range(2)]
    method = toy_method()
    method.set_train_draws([3, 0, 1])  # replayed first, then train_rng again
    fit(method, data, config, progress=False)
    # the 4th draw is the first of epoch 2's train_rng (the replay covered epoch 2's first step)
    assert method.draws[:3] == [3, 0, 1] and method.draws[3] == runs[0][2]
    method.set_train_draws([7])
    with pytest.raises(ConfigError, match="outside 0 .. 3"):
        method.train_randint(0, 3)


def test_description_field_is_a_general_option(tmp_path):
    class Args:
        descriptions = str(tmp_path / "texts.json")

    (tmp_path / "texts.json").write_text(json.dumps({"a": ["an a"], "b": ["a b", "b!"]}))
    toy_method()  # registers it
    config = with_descriptions(Args(), "toy_two_views", {})
    assert config == {"texts": str((tmp_path / "texts.json").resolve())}
    check_descriptions("toy_two_views", config, lambda: [("toy", ["a", "b"])])
    with pytest.raises(DataError, match=r"texts\.json.*1 of 3 classes of toy have no description: 'c'"):
        check_descriptions("toy_two_views", config, lambda: [("toy", ["a", "b", "c"])])
    assert with_descriptions(Args(), "coop", {"n_ctx": 4}) == {"n_ctx": 4}  # methods without descriptions ignore it


# -- descriptions ----------------------------------------------------------------------------------------------------


def test_bundled_descriptions_are_the_reference_files():
    meta = json.loads((GOLDEN_DIR / "coprompt.gpt_descriptions.json").read_text())
    provenance = meta["provenance"]
    path = DESCRIPTIONS_DIR / Path(provenance["file"]).name
    blob = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout.strip()
    assert blob == provenance["blob"] and provenance["licence"] == "MIT"
    bundled = load_descriptions("eurosat")
    assert sorted(bundled.entries) == sorted(meta["all_keys_in_file"])
    for name, texts in meta["descriptions"].items():
        assert bundled.lookup(name) == tuple(texts)
    readme = (DESCRIPTIONS_DIR / "README.md").read_text()
    for name in bundled_sets():  # every bundled file has its provenance row
        assert f"`{name}_prompt.json`" in readme


def test_description_lookup_rules(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"Sea or Lake": ["water"], "Industrial Buildings": ["roofs"], "Empty": [""]}))
    found = read_description_file(path)
    assert found.lookup("Industrial_Buildings") == ("roofs",)  # '_' read as a space, as the reference does
    assert found.lookup("sea or lake") == ("water",)  # then ignoring case
    assert found.missing(["Empty", "Forest"]) == ["Empty", "Forest"]
    assert load_descriptions(None).lookup("Annual Crop Land")  # every bundled set by class name
    with pytest.raises(DataError, match="imagenet.*--descriptions FILE"):
        load_descriptions("imagenet")
    for text, says in (("[1, 2]", "expected a JSON object"), ('{"a": "one"}', "'a' must be a list of strings"),
                       ("{", "cannot read")):
        path.write_text(text)
        with pytest.raises(DataError, match=says):
            read_description_file(path)


def test_unequal_description_counts_cycle(golden, tmp_path):
    path = tmp_path / "d.json"
    names = golden.classnames
    path.write_text(json.dumps({n.replace("_", " "): [f"a photo of {n}", f"{n} from above"][: 1 + i % 2]
                                for i, n in enumerate(names)}))
    method, _ = build_method(golden)
    method.config.descriptions = str(path)
    feats = method.description_features()
    assert feats.shape[:2] == (2, len(names))
    assert torch.equal(feats[0, 0], feats[1, 0]) and not torch.equal(feats[0, 1], feats[1, 1])


# -- Dassl checkpoint import (golden file skipped for size: built here) ---------------------------------------------


def coprompt_checkpoint(folder: Path, replay) -> Path:
    """What CoPrompt's trainer saves (coprompt.dassl-skipped.json / the card): ``state_dict()`` of the whole
    CustomCLIP — trained tensors (the replay's final values, equal to the reference's within the trajectory bars),
    the class buffers, the frozen prompted towers, ``logit_scale`` and the teacher ``model_distill.*`` (a whole
    plain CLIP) — with SGD and the scheduler."""
    skipped = json.loads((GOLDEN_DIR / "coprompt.dassl-skipped.json").read_text())
    golden = replay.golden
    state = OrderedDict((name, value.clone()) for name, value in replay.final_params.items())
    n_cls, n_ctx, width = len(golden.classnames), golden.trainer_cfg["N_CTX"], state["prompt_learner.ctx"].shape[1]
    state["prompt_learner.token_prefix"] = torch.randn(n_cls, 1, width)
    state["prompt_learner.token_suffix"] = torch.randn(n_cls, 77 - 1 - n_ctx, width)
    clip = golden_mini_state()
    for entry in skipped["registered_model"]["stripped"]["keys"]:
        key = entry["key"]
        target = LAYOUTS["coprompt"].frozen(key)
        assert target in clip, key  # every stripped key is a frozen CLIP tensor of the backbone
        state[key] = clip[target].clone()
    params = [torch.nn.Parameter(v.clone()) for v in replay.final_params.values()]
    sgd = torch.optim.SGD(params, lr=0.0035, momentum=0.9, weight_decay=5e-4)
    for p in params:
        p.grad = torch.ones_like(p)
    sgd.step()
    scheduler = {"cons_lr": 1e-5, "successor": torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=3),
                 "warmup_epoch": 1, "base_lrs": [0.0035], "last_epoch": 2}
    registered = skipped["registered_model"]
    path = folder / registered["name"] / f"model.pth.tar-{registered['epoch']}"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "epoch": registered["epoch"], "optimizer": sgd.state_dict(),
                "scheduler": scheduler, "val_result": None}, path)
    assert sorted(registered["top_level_keys"]) == sorted(torch.load(path, weights_only=False))
    return path


def test_import_round_trip_reproduces_the_reference_logits(tmp_path, capsys):
    replay = replay_trajectory(GOLDEN)
    golden = replay.golden
    skipped = json.loads((GOLDEN_DIR / "coprompt.dassl-skipped.json").read_text())
    coprompt_checkpoint(tmp_path / "output", replay)
    expected = golden.tensors["eval.logits"]
    reference_reload = torch.tensor(skipped["registered_model"]["raw_file"]["reference_reload"]["logits"])
    assert torch.equal(reference_reload, expected)  # the reference's reload of its own file gave eval.logits
    scale = max(1.0, expected.abs().max().item())
    assert (golden.tensors["eval.logits_init"] - expected).abs().max().item() > 3e-4 * scale  # the test can fail

    # In the library: the checkpoint replaces initial values; every tensor accounted for.
    method, name_map = build_method(golden)
    checkpoint = read_checkpoint(find_checkpoint(tmp_path / "output", LAYOUTS["coprompt"].registered_name))
    report = load_into_method(checkpoint, method, "golden-mini")
    assert set(report.tensors) == set(name_map)
    assert report.frozen.saved == len(skipped["registered_model"]["stripped"]["keys"]) and not report.frozen.differing
    assert set(report.dropped_buffers) == set(skipped["reference_load_model"]["deletes_keys"])
    method.eval()
    with torch.no_grad():
        logits = method({"image": golden.tensors["input.eval_images"]})
    assert (logits - expected).abs().max().item() <= 3e-4 * scale

    # On the command line: promptclip import, then the adapter evaluates to the same logits.
    out = tmp_path / "imported"
    argv = ["import", str(tmp_path / "output"), "--method", "coprompt", "--out", str(out), "--backbone", "golden-mini",
            "--quiet", "--classnames", ",".join(golden.classnames),
            "--set", f"method_config.depth={golden.trainer_cfg['PROMPT_DEPTH']}",
            "--set", f"method_config.n_ctx={golden.trainer_cfg['N_CTX']}"]
    assert main(argv) == 0
    meta, tensors = read_adapter(out / "adapter.safetensors")
    assert meta["method"] == "coprompt" and set(tensors) == set(name_map.values())
    from promptclip.checkpoint import load_adapter

    loaded = load_adapter(out / "adapter.safetensors", build_method(golden)[0].clip,
                          backbone_fingerprint=meta["backbone"]["fingerprint"])
    loaded.eval()
    with torch.no_grad():
        cli_logits = loaded({"image": golden.tensors["input.eval_images"]})
    assert (cli_logits - expected).abs().max().item() <= 3e-4 * scale


# -- the command line -------------------------------------------------------------------------------------------------


def test_cli_train_with_a_descriptions_file(tmp_path):
    texts = {name: list(found[:2]) for name, found in load_descriptions("eurosat").entries.items()}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(texts))
    out = tmp_path / "run"
    argv = ["train", "--method", "coprompt", "--dataset", "eurosat-sample", "--shots", "1", "--subsample", "base",
            "--backbone", "tiny", "--quiet", "--precision", "fp32", "--descriptions", str(path), "--set",
            "train.max_epoch=1", "--set", "method_config.depth=2", "--out", str(out)]
    assert main(argv) == 0
    meta, _ = read_adapter(out / "adapter.safetensors")
    assert meta["config"]["descriptions"] == str(path.resolve()) and meta["config"]["w"] == 0.1  # EuroSAT's W
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s.get("kind") == "step"]
    assert steps and all(s["loss_distill_image"] > 0 and s["description_index"] in (0, 1) for s in steps)
