"""PromptKD (tests/golden/methods/promptkd.md): the teacher mechanism, the distillation loss with its T^2 factor,
BatchNorm statistics as trained state, training on unlabelled images of every class (protocol, records, report),
the Dassl checkpoint imports (the student, and the teacher's PromptSRC layout), and a mutation check per mechanism.

The generic parity suites (test_parity.py, test_trajectory.py) compare the one-step and trajectory goldens."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from parity import (
    assert_close_values,
    build_method,
    golden_backbone,
    golden_batch,
    load_golden,
    logits_error,
    replay_trajectory,
)
from promptclip.checkpoint import load_teacher, save_adapter
from promptclip.clip.architectures import build_random
from promptclip.clip.weights import backbone_fingerprint
from promptclip.errors import ConfigError
from promptclip.methods import create_method, get_method_class, register
from promptclip.methods.promptkd import PromptKD, PromptKDConfig
from promptclip.protocols import Backbone, training_splits
from promptclip.train import TrainConfig, fit
from toy_data import Separable


@pytest.fixture(scope="module")
def golden():
    return load_golden("promptkd")


def _ratio(ours: torch.Tensor, golden: torch.Tensor) -> float:
    """max|ours - golden| as a multiple of the one-step bar 1e-4 * max(1, max|golden|)."""
    return (ours.double() - golden.double()).abs().max().item() / (1e-4 * max(1.0, golden.abs().max().item()))


# -- config and reference names ---------------------------------------------------------------------------------------


def test_config_comes_from_the_reference_options(golden):
    config = PromptKD.config_from_reference(golden.trainer_cfg)
    cfg = golden.trainer_cfg
    assert (config.n_ctx_vision, config.depth_vision) == (cfg["N_CTX_VISION"], cfg["PROMPT_DEPTH_VISION"])
    assert (config.kd_weight, config.temperature) == (cfg["KD_WEIGHT"], cfg["TEMPERATURE"])
    with pytest.raises(ConfigError, match="NEW_OPTION"):
        PromptKD.config_from_reference({**cfg, "NEW_OPTION": 1})


def test_defaults_are_the_launch_script_values():
    config = PromptKDConfig()
    assert (config.n_ctx_vision, config.depth_vision, config.kd_weight, config.temperature) == (4, 9, 1000.0, 1.0)


def test_the_projector_maps_the_student_width_to_the_teachers(golden):
    method, _ = build_method(golden)
    teacher_width = golden.meta["teacher"]["config"]["embed_dim"]
    student_width = golden.meta["backbone"]["config"]["embed_dim"]
    assert method.projector[0].weight.shape == (teacher_width, student_width, 1, 1)
    assert {n for n, _ in method.trainable_buffers()} == {
        "projector.1.running_mean", "projector.1.running_var", "projector.1.num_batches_tracked"}


# -- the teacher ------------------------------------------------------------------------------------------------------


def test_teacher_features_and_logits_match_the_reference(golden):
    method, _ = build_method(golden)
    method.eval()
    images = golden.images()
    assert_close_values(method.teacher_text_features(), golden.tensors["eval.teacher_text_features"],
                        "teacher text features")
    assert_close_values(method.teacher_logits(images), golden.tensors["eval.teacher_logits"], "teacher logits")
    with torch.no_grad():
        assert_close_values(method.student_features(images), golden.tensors["eval.student_projector_out"],
                            "student projector (running statistics)")


def test_eval_logits_are_base_then_novel_halves(golden):
    """``eval.logits`` = cat(base logits over classes :ceil(n/2), novel logits over ceil(n/2):): the same as
    evaluating on each half's class names."""
    method, _ = build_method(golden)
    method.eval()
    n_base = golden.meta["inputs"]["n_base"]
    batch = golden_batch(golden, train=False)
    with torch.no_grad():
        method.set_classnames(golden.classnames[:n_base])
        base = method(batch)
        method.set_classnames(golden.classnames[n_base:])
        novel = method(batch)
    assert_close_values(base, golden.tensors["eval.logits_base"], "base logits")
    assert_close_values(novel, golden.tensors["eval.logits_novel"], "novel logits")


def test_the_teacher_is_frozen_and_never_trains(golden):
    method, _ = build_method(golden)
    method.train()
    assert not method.teacher.training and not any(m.training for m in method.teacher.modules())
    assert not any(p.requires_grad for p in method.teacher.parameters())
    assert all(not n.startswith("teacher.") for n, _ in method.named_trainable())
    assert set(method.adapter_state()) == {n for n, _ in method.named_trainable()} | {
        n for n, _ in method.trainable_buffers()}


def test_mutation_student_text_in_place_of_the_teachers_fails_the_logits(golden):
    """The teacher mechanism off (the student's own zero-shot CLIP as the classifier, as without --teacher): the eval
    logits are far from the golden's."""
    method, _ = build_method(golden)
    zero_shot = create_method("zeroshot", method.clip, golden.classnames)
    # The projector must keep its width: only the text side changes.
    zero_shot_text = zero_shot.encode_classes()
    pad = method.projector[0].out_channels - zero_shot_text.shape[1]
    method.teacher_text_features = lambda: F.normalize(F.pad(zero_shot_text, (0, pad)), dim=-1)
    method.eval()
    with torch.no_grad():
        logits = method(golden_batch(golden, train=False))
    ratio = _ratio(logits, golden.tensors["eval.logits"])
    print(f"mutation (no teacher text): eval.logits off by {ratio:.3g}x the bar")
    assert ratio > 10


def test_without_a_teacher_the_student_distils_its_own_zero_shot_clip_with_a_warning():
    backbone = build_random("tiny", seed=0)
    method = create_method("promptkd", backbone, ["a", "b"], {"depth_vision": 2})
    assert method.zero_shot_teacher and method.teacher.name == "zeroshot"
    with pytest.warns(UserWarning, match="no teacher given"):
        method.on_train_start(1)


def test_teacher_of_another_resolution_is_refused(golden):
    method, _ = build_method(golden)
    other = create_method("zeroshot", build_random("tiny", seed=0), golden.classnames)
    with pytest.raises(ConfigError, match="px"):
        method.set_teacher(other)


# -- the loss ---------------------------------------------------------------------------------------------------------


def _independent_loss(student_logits, teacher_logits, temperature, kd_weight):
    """The card's formula, written out: KL(p_t || p_s) summed, times T^2, over B * C, times the KD weight."""
    p_t = torch.softmax(teacher_logits.double() / temperature, dim=1)
    log_p_s = torch.log_softmax(student_logits.double() / temperature, dim=1)
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum()
    return kd_weight * kl * temperature**2 / student_logits.numel()


def test_loss_matches_the_golden_terms(golden):
    method, _ = build_method(golden)
    method.train()
    logits, losses = method.training_step(golden_batch(golden, train=True))
    assert_close_values(logits, golden.tensors["train.student_logits"], "train student logits")
    assert_close_values(losses["loss_ukd"], golden.tensors["train.loss_kd_unweighted"], "L_ukd")
    assert_close_values(losses["loss"], golden.tensors["train.loss"], "loss")
    assert_close_values(method.projector[1].running_mean, golden.tensors["train.bn_running_mean"], "running mean")
    assert_close_values(method.projector[1].running_var, golden.tensors["train.bn_running_var"], "running var")
    assert int(method.projector[1].num_batches_tracked) == golden.meta["extra"]["bn_after_train_forward"][
        "num_batches_tracked"]


def _loss_and_grads_at(golden, temperature: float, kd_weight: float = 200.0):
    """Our loss and the gradient of the student logits at another T and KD weight (the held-back golden's T = 2),
    against the card's formula applied to the golden's own student and teacher logits."""
    method, _ = build_method(golden)
    method.config = dataclasses.replace(method.config, temperature=temperature, kd_weight=kd_weight)
    method.train()
    logits, losses = method.training_step(golden_batch(golden, train=True))
    logits.retain_grad()
    losses["loss"].backward()
    student = golden.tensors["train.student_logits"].double().requires_grad_(True)
    expected = _independent_loss(student, golden.tensors["train.teacher_logits"], temperature, kd_weight)
    expected.backward()
    return losses["loss"].detach(), expected.detach(), logits.grad, student.grad


def test_temperature_enters_with_its_square(golden):
    loss, expected, grad, expected_grad = _loss_and_grads_at(golden, 2.0)
    assert _ratio(loss, expected) <= 1
    assert (grad.double() - expected_grad).abs().max() <= 1e-4 * expected_grad.abs().max()


def test_mutation_dropping_the_t_squared_factor_fails_loss_and_gradients(golden, monkeypatch):
    original = PromptKD.loss

    def without_t2(self, batch, logits):
        losses = original(self, batch, logits)
        t2 = self.config.temperature ** 2
        return {"loss": losses["loss"] / t2, "loss_ukd": losses["loss_ukd"] / t2}

    monkeypatch.setattr(PromptKD, "loss", without_t2)
    loss, expected, grad, expected_grad = _loss_and_grads_at(golden, 2.0)
    loss_ratio = _ratio(loss, expected)
    grad_ratio = ((grad.double() - expected_grad).abs().max() / (1e-4 * expected_grad.abs().max())).item()
    print(f"mutation (no T^2): loss off by {loss_ratio:.3g}x, logit gradient by {grad_ratio:.3g}x the bar")
    assert loss_ratio > 10 and grad_ratio > 10


# -- BatchNorm statistics: trajectory, resume -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replay():
    return replay_trajectory("promptkd")


def test_running_statistics_follow_the_reference_every_step(replay):
    tensors = replay.golden.tensors
    means, variances = tensors["trajectory.bn_running_mean"], tensors["trajectory.bn_running_var"]
    assert len(replay.step_buffers) == len(means) == len(replay.trajectory["steps"])
    for step, buffers in enumerate(replay.step_buffers):
        for ours, golden, what in ((buffers["projector.1.running_mean"], means[step], "running_mean"),
                                   (buffers["projector.1.running_var"], variances[step], "running_var")):
            err = (ours.double() - golden.double()).abs().max().item() / golden.abs().max().item()
            assert err <= 1e-4, f"step {step}: {what} off by {err:.3g} of its largest value"
        tracked = int(tensors["trajectory.bn_num_batches_tracked"][step])
        assert int(buffers["projector.1.num_batches_tracked"]) == tracked


def test_best_val_choice_can_be_replayed_from_the_per_epoch_val_logits(replay):
    """The golden keeps the last step; its per-epoch test(split='val') logits (eval mode, running statistics) are
    what the reference's best_val choice reads. Ours after the last epoch equal the last of them."""
    golden = replay.golden
    n_base = golden.meta["inputs"]["n_base"]
    last = golden.tensors[f"eval.val_logits_epoch{replay.trajectory['epochs'] - 1}"]
    assert logits_error(replay.logits[:, :n_base], last) <= 1


def test_mutation_running_statistics_left_out_of_the_trained_state(replay, monkeypatch):
    """Without the BatchNorm statistics in the adapter, a loaded student evaluates with fresh statistics: its logits
    are far from the trained model's."""
    method = replay.method
    state = method.adapter_state()
    monkeypatch.setattr(PromptKD, "trainable_buffers", lambda self: iter(()))
    fresh, _ = build_method(replay.golden)
    fresh.load_adapter_state({k: v for k, v in state.items() if not k.startswith("projector.1.r")
                              and not k.endswith("num_batches_tracked")}, strict=True)
    logits = _eval(fresh, replay.golden.tensors["input.eval_images"])
    ratio = logits_error(logits, replay.golden.tensors["eval.logits"])
    print(f"mutation (no BatchNorm statistics in the state): final eval.logits off by {ratio:.3g}x the bar")
    assert ratio > 10


def _eval(method, images):
    method.eval()
    with torch.no_grad():
        return method({"image": images})


def _student(backbone, teacher=None):
    method = create_method("promptkd", backbone, ["a", "b", "c"], {"depth_vision": 3, "n_ctx_vision": 2,
                                                                    "kd_weight": 10.0})
    if teacher is not None:
        method.set_teacher(teacher)
    return method


def test_a_resumed_run_equals_an_uninterrupted_one_running_statistics_included(tmp_path):
    backbone = build_random("tiny", seed=0)
    data = Separable(n=16)
    config = TrainConfig(batch_size=8, lr=0.002, max_epoch=3, precision="fp32", seed=5, warmup_epoch=0)
    straight = _student(backbone)
    fit(straight, data, config, progress=False)

    class Stop(Exception):
        pass

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(_student(backbone), data, config, out_dir=tmp_path, progress=False, on_epoch=stop_after_two)
    resumed = _student(backbone)
    result = fit(resumed, data, config, out_dir=tmp_path, progress=False)
    assert result.resumed_from_epoch == 1
    ours, theirs = resumed.adapter_state(), straight.adapter_state()
    assert int(ours["projector.1.num_batches_tracked"]) == 3 * 2
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


# -- the Dassl checkpoints: the student, and the released teachers' PromptSRC layout --------------------------------


def _save_torch(path: Path, state: dict, epoch: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "epoch": epoch, "optimizer": None, "scheduler": None}, path)
    return path


def _teacher_checkpoint(golden, folder: Path) -> Path:
    """The teacher checkpoint the reference loads (``teacher_model/<DATASET>/VLPromptLearner/model-best.pth.tar``):
    a PromptSRC run of the teacher backbone, as its trainer saves it (the whole model: prompts, the frozen towers,
    the frozen image tower once more as ``ZS_image_encoder``, class buffers; PromptKD's teacher may add the
    ``token_prefix2/suffix2`` of a base/novel split)."""
    backbone = golden_backbone(golden, "teacher")
    state = {t["name"]: golden.tensors[t["key"]].clone() for t in golden.meta["teacher"]["tensors"]}
    frozen = backbone.state_dict()
    for key, value in frozen.items():
        if key.startswith("visual."):
            state["image_encoder." + key.removeprefix("visual.")] = value.clone()
            state["prompt_learner.ZS_image_encoder." + key.removeprefix("visual.")] = value.clone()
        else:
            state["text_encoder." + key if key not in ("logit_scale",) else key] = value.clone()
    n, width = len(golden.classnames), backbone.text.width
    n_ctx = golden.trainer_cfg["N_CTX_TEXT"]
    for name, rows in (("token_prefix", 3), ("token_prefix2", n - 3)):
        state[f"prompt_learner.{name}"] = torch.zeros(rows, 1, width)
    for name, rows in (("token_suffix", 3), ("token_suffix2", n - 3)):
        state[f"prompt_learner.{name}"] = torch.zeros(rows, 77 - 1 - n_ctx, width)
    return _save_torch(folder / "VLPromptLearner" / "model-best.pth.tar", state)


@pytest.fixture(scope="module")
def imported_teacher(golden, tmp_path_factory):
    from promptclip.reference.dassl import import_checkpoint

    folder = tmp_path_factory.mktemp("teacher_model")
    _teacher_checkpoint(golden, folder)
    backbone = golden_backbone(golden, "teacher")
    depth_v = min(9, len(backbone.visual.blocks))
    depth_t = min(9, len(backbone.text.blocks))
    config = {"n_ctx_text": golden.trainer_cfg["N_CTX_TEXT"], "n_ctx_vision": 4, "depth_text": depth_t,
              "depth_vision": depth_v}
    fingerprint = backbone_fingerprint(backbone)
    with pytest.warns(UserWarning):  # trained on 3 classes (its class buffers say), given all 5
        result = import_checkpoint(folder, "promptsrc", Backbone(backbone, "golden-mini-large", fingerprint),
                                   golden.classnames, folder / "adapter", config=config, epoch="best")
    assert result.report.frozen.matches  # the frozen towers it carries are the teacher backbone's
    assert "prompt_learner.token_prefix2" in result.report.dropped_buffers
    return result.adapter_path, backbone, fingerprint


def test_released_teacher_layout_imports_and_teaches_the_golden_student(golden, imported_teacher):
    path, backbone, fingerprint = imported_teacher
    teacher = load_teacher(path, backbone=backbone, backbone_fingerprint=fingerprint)
    assert teacher.name == "promptsrc" and not any(p.requires_grad for p in teacher.parameters())
    method, _ = build_method(golden)
    method.set_teacher(teacher)
    method.eval()
    with torch.no_grad():
        logits = method(golden_batch(golden, train=False))
    ratio = _ratio(logits, golden.tensors["eval.logits"])
    print(f"imported teacher: eval.logits within {ratio:.3g}x the bar")
    assert ratio <= 1


def _student_checkpoint(method, name_map, buffers: dict | None = None) -> dict:
    """The student's Dassl checkpoint (the registered model is the whole student ``CustomCLIP``: its image tower
    with the prompts, ``logit_scale`` and ``VPT_image_trans`` with the BatchNorm buffers)."""
    params = dict(method.named_trainable())
    state = {ref: params[ours].detach().clone() for ref, ours in name_map.items()}
    for ref, ours in method.reference_buffer_map().items():
        state[ref] = (buffers or dict(method.trainable_buffers()))[ours].clone()
    for key, value in method.clip.state_dict().items():
        if key.startswith("visual."):
            state["image_encoder." + key.removeprefix("visual.")] = value.clone()
    state["logit_scale"] = method.clip.logit_scale.detach().clone()
    return state


def test_student_checkpoint_imports_with_its_running_statistics(golden, imported_teacher, tmp_path, monkeypatch):
    from promptclip.reference.dassl import DasslCheckpointError, import_checkpoint

    teacher_path, _, _ = imported_teacher
    method, name_map = build_method(golden)
    trained_stats = {"projector.1.running_mean": golden.tensors["train.bn_running_mean"],
                     "projector.1.running_var": golden.tensors["train.bn_running_var"],
                     "projector.1.num_batches_tracked": torch.tensor(1)}
    _save_torch(tmp_path / "run" / "VLPromptLearner" / "model.pth.tar-20",
                _student_checkpoint(method, name_map, trained_stats))
    backbone = golden_backbone(golden)
    fingerprint = backbone_fingerprint(backbone)
    config = {**dataclasses.asdict(PromptKD.config_from_reference(golden.trainer_cfg)), "teacher": str(teacher_path)}
    # The teacher is loaded on the backbone its adapter names; here that is a test backbone given by hand.
    teacher_model, teacher_fp = imported_teacher[1], imported_teacher[2]
    from promptclip import checkpoint

    names = []

    def teacher_backbone(name):
        names.append(name)
        return teacher_model, teacher_fp

    monkeypatch.setattr(checkpoint, "_teacher_backbone", teacher_backbone)
    result = import_checkpoint(tmp_path / "run", "promptkd", Backbone(backbone, "golden-mini", fingerprint),
                               golden.classnames, tmp_path / "student", config=config)
    loaded = checkpoint.load_adapter(result.adapter_path, backbone, fingerprint)
    assert names and set(names) == {"golden-mini-large"}  # the backbone the teacher adapter names
    state = loaded.adapter_state()
    for name, value in trained_stats.items():
        assert torch.equal(state[name], value.to(state[name].dtype)), name
    assert set(result.report.tensors.values()) == set(state)
    # With the initial statistics it is the golden's evaluated student, teacher included.
    fresh = {"projector.1.running_mean": torch.zeros_like(trained_stats["projector.1.running_mean"]),
             "projector.1.running_var": torch.ones_like(trained_stats["projector.1.running_var"])}
    loaded.load_adapter_state({**state, **fresh})
    logits = _eval(loaded, golden.images())
    ratio = _ratio(logits, golden.tensors["eval.logits"])
    print(f"imported student: eval.logits within {ratio:.3g}x the bar")
    assert ratio <= 1
    # A student checkpoint is told apart from the other methods' by its projector.
    with pytest.raises(DasslCheckpointError, match="promptkd"):
        import_checkpoint(tmp_path / "run", "ivlp", Backbone(backbone, "golden-mini", fingerprint),
                          golden.classnames, tmp_path / "wrong")


def test_student_import_needs_the_teacher():
    from promptclip.presets import load_preset
    from promptclip.reference.cli import _with_teacher

    preset = load_preset("promptkd/vit_b16_c2_ep20_batch8_4+4ctx")
    with pytest.raises(ConfigError, match="--teacher"):
        _with_teacher(preset, None)
    with pytest.raises(ConfigError, match="does not distil"):
        _with_teacher(load_preset("ivlp/vit_b16_c2_ep5_batch4_2+2ctx"), "x")


# -- unlabelled training on every class: protocol, records, report -----------------------------------------------------


def test_training_data_is_every_image_of_every_class_without_labels():
    from promptclip.data import protocol_splits

    splits, labeled = training_splits("promptkd", "eurosat-sample", None, 16, 1, "base")
    every = protocol_splits("eurosat-sample", None, num_shots=0, seed=1, subsample="all")
    assert not labeled
    assert splits.classnames == every.classnames and len(splits.train) == len(every.train)
    base, labeled = training_splits("coop", "eurosat-sample", None, 4, 1, "base")
    assert labeled and len(base.classnames) < len(every.classnames)


class Unlabeled(get_method_class("coop")):
    """A toy method that trains on unlabelled images of every class (``train_data``) and records what it saw."""

    name = "toy_unlabeled"
    train_data = "unlabeled_all_classes"
    presets = {"default": {"method_config": {"n_ctx": 2, "ctx_init": ""},
                           "train": {"batch_size": 32, "max_epoch": 1, "lr": 0.002, "precision": "fp32"}}}
    seen: list = []

    def training_step(self, batch):
        assert "label" not in batch, "unlabelled training data carries labels"
        type(self).seen.extend(batch["path"])
        logits = self(batch)
        return logits, {"loss": logits.logsumexp(dim=1).mean()}


SAMPLE = Path(__file__).resolve().parent.parent / "src" / "promptclip" / "data" / "sample" / "eurosat" / "2750"


@pytest.fixture
def small_dataset(tmp_path) -> str:
    """``folder:PATH`` with 4 classes (2 base, 2 novel), 3 training and 2 test images each, from the bundled sample:
    every training image of every class is 12 images (the CPU-bound tests stay quick)."""
    import shutil

    root = tmp_path / "small"
    for name in ("Forest", "River", "Highway", "Industrial"):
        images = sorted((SAMPLE / name).iterdir())[:5]
        for split, chosen in (("train", images[:3]), ("test", images[3:])):
            (root / split / name).mkdir(parents=True)
            for image in chosen:
                shutil.copy(image, root / split / name / image.name)
    return f"folder:{root}"


def test_protocol_trains_on_novel_images_unlabelled_and_marks_records_and_report(tmp_path, isolated_registry,
                                                                                 small_dataset):
    from promptclip.protocols import make_cells, run_grid
    from promptclip.report import read_records, write_report

    register(Unlabeled)
    Unlabeled.seen = []
    backbone = build_random("tiny", seed=0)
    cells = make_cells("base2novel", [small_dataset], ["toy_unlabeled", "coop"], [1], [2],
                       presets={"coop": "coop/vit_b16_ep50"},
                       overrides=["train.max_epoch=1", "train.batch_size=32", "method_config.n_ctx=2",
                                  "method_config.ctx_init=''"])
    from promptclip.data import protocol_splits

    novel = protocol_splits(small_dataset, None, num_shots=0, seed=1, subsample="new")
    grid = run_grid(cells, Backbone(backbone, "tiny", backbone_fingerprint(backbone), True), tmp_path,
                    _quiet_options())
    novel_paths = {r.path for r in novel.train}
    assert novel_paths & set(Unlabeled.seen), "the novel classes' training images were not trained on"
    records = {(r["method"], r["split"]): r for r in grid.records}
    assert records[("toy_unlabeled", "novel")]["unlabeled_novel_images"] is True
    assert records[("toy_unlabeled", "base")]["train_data"] == "unlabeled_all_classes"
    assert records[("coop", "novel")]["unlabeled_novel_images"] is False
    # Evaluated on the base half and the novel half, with their own class names.
    assert records[("toy_unlabeled", "base")]["num_samples"] == records[("coop", "base")]["num_samples"]
    write_report(read_records(tmp_path / "records.jsonl"), tmp_path / "report", plots=False)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "toy_unlabeled †" in report and "unlabeled_novel_images" in report
    assert "| coop †" not in report


def _quiet_options():
    from promptclip.protocols import RunOptions

    return RunOptions(progress=False, log=lambda text: None, feature_cache=None)


def test_the_teacher_file_is_part_of_the_run_identity(tmp_path):
    from promptclip.protocols import make_cells

    backbone = build_random("tiny", seed=0)
    teacher = create_method("zeroshot", backbone, ["a", "b"])
    teacher_path = save_adapter(tmp_path / "t" / "adapter", teacher, "tiny", backbone_fingerprint(backbone))
    ident = Backbone(backbone, "tiny", backbone_fingerprint(backbone), True)

    def cell_hash():
        cells = make_cells("base2novel", ["eurosat-sample"], ["promptkd"], [1], [16], teacher=str(tmp_path / "t"))
        assert cells[0].preset.method_config["teacher"] == str(teacher_path.resolve())
        return cells[0].config_hash(ident)

    before = cell_hash()
    meta_path = teacher_path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["template"] = "a photo of the {}."
    meta_path.write_text(json.dumps(meta))
    assert cell_hash() != before
    with pytest.raises(ConfigError, match="distils a teacher"):
        make_cells("base2novel", ["eurosat-sample"], ["coop"], [1], [16], teacher=str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="filled in"):
        make_cells("base2novel", ["eurosat-sample"], ["promptkd"], [1], [16], teacher=str(tmp_path / "{nope}"))


# -- the CLI: a tiny PromptSRC teacher, then PromptKD base-to-novel ----------------------------------------------------


def test_cli_base2novel_with_a_trained_teacher(tmp_path, small_dataset):
    """The same commands as on eurosat-sample (``promptclip train --method promptsrc ...``, then ``promptclip run
    base2novel --methods promptkd --teacher ...``), on a 4-class folder dataset to keep the test quick."""
    from promptclip.cli import main

    teacher = tmp_path / "teacher"
    quick = ["--set", "train.max_epoch=1", "--set", "method_config.depth_text=2", "--set",
             "method_config.depth_vision=2", "--set", "method_config.gpa=false"]
    assert main(["train", "--method", "promptsrc", "--dataset", small_dataset, "--subsample", "base", "--shots",
                 "2", "--backbone", "tiny", "--quiet", "--out", str(teacher), *quick]) == 0
    out = tmp_path / "b2n"
    assert main(["run", "base2novel", "--methods", "promptkd", "--datasets", small_dataset, "--seeds", "1",
                 "--backbone", "tiny", "--teacher", str(teacher), "--quiet", "--no-plots", "--out", str(out),
                 "--set", "train.max_epoch=1", "--set", "method_config.depth_vision=2"]) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"base", "novel"}
    assert all(r["unlabeled_novel_images"] and r["teacher"] == str((teacher / "adapter.safetensors").resolve())
               for r in records)
    assert "promptkd †" in (out / "report" / "report.md").read_text()
    adapter = json.loads(next((out / "runs").rglob("adapter.json")).read_text())
    assert adapter["config"]["teacher"] == str((teacher / "adapter.safetensors").resolve())
    # eval of the student reloads its teacher from the adapter's config.
    run_dir = next((out / "runs").rglob("adapter.safetensors")).parent
    assert main(["eval", "--adapter", str(run_dir), "--dataset", small_dataset, "--subsample", "new",
                 "--quiet"]) == 0
