"""MMRL and MMRL++ beyond the generic parity suite (tests/golden/methods/mmrl.md): the two evaluation rules (fused
logits on the training classes, class-token logits on novel classes and transfer targets) against ``eval.logits`` /
``eval.logits_novel``, every intermediate the one-step goldens store, the block outputs, the Dassl checkpoint import
(no checkpoint golden: the file is built here in the reference's layout), the per-dataset presets, the protocol's
choice of rule, and mutations that prove the checks can fail.
"""

import json
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file

from parity import (
    GOLDEN_DIR,
    assert_close_values,
    build_method,
    golden_batch,
    load_golden,
    logits_error,
    replay_trajectory,
)
from promptclip.checkpoint import read_adapter
from promptclip.cli import main
from promptclip.methods import EvalContext
from promptclip.methods import mmrl as mmrl_module
from promptclip.reference import LAYOUTS, find_checkpoint, load_into_method, read_checkpoint

METHODS = [name for name in ("mmrl", "mmrlpp") if (GOLDEN_DIR / f"{name}.json").exists()]
BASE = EvalContext("base", source=True, protocol="base2novel")
NOVEL = EvalContext("new", source=True, protocol="base2novel")
TARGET = EvalContext("all", source=False, protocol="cross_dataset")
FEWSHOT = EvalContext("all", source=True, protocol="fewshot")


def eval_logits(method, images, context=None):
    if context is not None:
        method.set_eval_context(context)
    method.eval()
    with torch.no_grad():
        return method({"image": images})


@pytest.fixture(scope="module", params=METHODS)
def golden(request):
    return load_golden(request.param)


# -- the two evaluation rules ----------------------------------------------------------------------------------------


def test_each_context_picks_the_reference_rule(golden):
    method, _ = build_method(golden)
    images = golden.images()
    for context in (BASE, FEWSHOT, EvalContext()):
        assert_close_values(eval_logits(method, images, context), golden.tensors["eval.logits"], f"fused {context}")
    for context in (NOVEL, TARGET):
        assert_close_values(eval_logits(method, images, context), golden.tensors["eval.logits_novel"],
                            f"class-token {context}")


def test_novel_logits_fail_with_the_fused_rule(golden, monkeypatch):
    """Mutation: evaluating novel classes with the fused rule must fail the novel-logits comparison."""
    method, _ = build_method(golden)
    monkeypatch.setattr(type(method), "uses_fusion", property(lambda self: True))
    logits = eval_logits(method, golden.images(), NOVEL)
    expected = golden.tensors["eval.logits_novel"]
    with pytest.raises(AssertionError):
        assert_close_values(logits, expected, "novel logits with the fused rule")
    ratio = (logits - expected).abs().max().item() / (1e-4 * max(1.0, expected.abs().max().item()))
    assert ratio > 10, ratio


def test_training_forward_is_fused(golden):
    method, _ = build_method(golden)
    method.set_eval_context(NOVEL)  # an evaluation context never changes what training optimises
    method.train()
    logits, _ = method.training_step(golden_batch(golden, train=True))
    assert_close_values(logits, golden.tensors["train.logits_fusion"], "train.logits_fusion")


# -- intermediates of the one-step golden -------------------------------------------------------------------------


def test_eval_features_tokens_and_logits(golden):
    method, _ = build_method(golden)
    method.eval()
    with torch.no_grad():
        out = method.outputs(golden_batch(golden, train=False))
        text_tokens, visual_tokens = method.layer_tokens()
        visual = method.clip.visual
        raw_image, raw_rep = method.encode_image_rep(golden.images(), visual_tokens)
        raw_text = method.encode_classes()
    t = golden.tensors
    assert_close_values(raw_text, t["eval.text_features"], "eval.text_features")
    assert_close_values(raw_image, t["eval.image_features"], "eval.image_features")
    assert_close_values(raw_rep, t["eval.image_features_rep"], "eval.image_features_rep")
    assert_close_values(out["logits_rep"], t["eval.logits_rep"], "eval.logits_rep")
    for k in range(len(method.rep_layers)):
        assert_close_values(text_tokens[k], t[f"eval.rep_tokens_text.{k}"], f"rep_tokens_text.{k}")
        assert_close_values(visual_tokens[k], t[f"eval.rep_tokens_visual.{k}"], f"rep_tokens_visual.{k}")
    assert visual.proj.requires_grad is False


def test_train_terms_and_frozen_targets(golden):
    method, _ = build_method(golden)
    method.train()
    batch = golden_batch(golden, train=True)
    logits = method(batch)
    out = method._train_outputs
    losses = method.loss(batch, logits)
    t = golden.tensors
    assert_close_values(out["logits"], t["train.logits"], "train.logits")
    assert_close_values(out["logits_rep"], t["train.logits_rep"], "train.logits_rep")
    assert_close_values(method.zero_shot_text_features(), t["train.text_features_clip"], "train.text_features_clip")
    with torch.no_grad():
        image_clip = method.clip.encode_image(batch["image"])
    assert_close_values(image_clip / image_clip.norm(dim=-1, keepdim=True), t["train.image_features_clip"],
                        "train.image_features_clip")
    for ours, ref in (("loss_ce", "loss_ce"), ("loss_ce_rep", "loss_ce_rep"), ("cossim_reg_img", "cossim_reg_img"),
                      ("cossim_reg_text", "cossim_reg_text")):
        assert_close_values(losses[ours], t[f"train.{ref}"], f"train.{ref}")
    assert_close_values(losses["loss"], t["train.loss_criterion_forward"], "train.loss_criterion_forward")


def test_block_outputs(golden):
    """Every block's output (``<m>.layers.*``): image 0's whole sequence, class 0's first positions."""
    meta = json.loads((GOLDEN_DIR / f"{golden.name}.layers.json").read_text())
    layers = load_file(GOLDEN_DIR / f"{golden.name}.layers.safetensors")
    method, _ = build_method(golden)
    method.eval()
    seen: dict[str, torch.Tensor] = {}

    def recorder(tower):
        return [block.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(f"layers.{tower}.{k}", o))
                for k, block in enumerate(getattr(method.clip, tower).blocks)]

    handles = recorder("visual") + recorder("text")
    with torch.no_grad():
        method(golden_batch(golden, train=False))
    for handle in handles:
        handle.remove()
    for key, shape in meta["keys"].items():
        # Our text sequences end after the last EOT (+ N): the positions both have cover every EOT of the classes.
        n = min(shape[0], seen[key].shape[1])
        assert n == shape[0] or key.startswith("layers.text."), key
        assert_close_values(seen[key][0, :n], layers[key][:n], key)


def test_logit_scale_is_hard_coded(golden):
    """Mutation: CLIP's ``logit_scale`` in place of the reference's 100 fails the logits."""
    method, _ = build_method(golden)
    with torch.no_grad():
        method.clip.logit_scale.fill_(1.0)  # a no-op for MMRL, which never reads it
    assert_close_values(eval_logits(method, golden.images(), BASE), golden.tensors["eval.logits"], "eval.logits")
    original = mmrl_module.LOGIT_SCALE
    try:
        mmrl_module.LOGIT_SCALE = 50.0
        with pytest.raises(AssertionError):
            assert_close_values(eval_logits(method, golden.images(), BASE), golden.tensors["eval.logits"], "scale")
    finally:
        mmrl_module.LOGIT_SCALE = original


def test_representation_tokens_shift_the_text_pool(golden, monkeypatch):
    """Mutation: pooling the text at EOT (not EOT + N) fails the text features."""
    method, _ = build_method(golden)
    real = method.encode_text_rep

    def unshifted(text_tokens):
        from promptclip.methods.prompts import encode_text_embeddings

        return encode_text_embeddings(method.clip, method.prompt_embeddings, method.eot,
                                      hook=method.rep_hook(text_tokens))

    monkeypatch.setattr(method, "encode_text_rep", unshifted)
    with torch.no_grad(), pytest.raises(AssertionError):
        assert_close_values(method.encode_classes(), golden.tensors["eval.text_features"], "text at EOT")
    monkeypatch.setattr(method, "encode_text_rep", real)


# -- the trajectory's second rule -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in METHODS if (GOLDEN_DIR / f"{n}.trajectory.json").exists()])
def test_trajectory_novel_logits_before_and_after_training(name):
    replay = replay_trajectory(name)
    images, t = replay.golden.tensors["input.eval_images"], replay.golden.tensors
    method = replay.method
    try:
        assert logits_error(eval_logits(method, images, NOVEL), t["eval.logits_novel"]) <= 1
        assert logits_error(eval_logits(method, images, BASE), t["eval.logits"]) <= 1
    finally:
        method.set_eval_context(EvalContext())
    fresh, _ = build_method(replay.golden)
    assert logits_error(eval_logits(fresh, images, NOVEL), t["eval.logits_novel_init"]) <= 1
    assert logits_error(eval_logits(fresh, images, NOVEL), t["eval.logits_novel"]) > 1  # training moved them


# -- Dassl checkpoint import (no golden file: built here in the reference's layout) ------------------------------------


def reference_checkpoint(folder, golden, method) -> None:
    """What MMRL's trainer saves (Dassl ``save_model``): the whole CustomCLIP's ``state_dict()`` registered as
    ``MultiModalRepresentationLearner`` (the learned tensors at the trajectory golden's initial values, the frozen CLIP
    as ``image_encoder.*`` / ``text_encoder.*``, the ``prompt_embeddings`` buffer), AdamW's state and the scheduler."""
    values = {entry["name"]: golden.init_value(entry).clone() for entry in golden.meta["trainable_params"]}
    state = OrderedDict(values)
    state["prompt_embeddings"] = torch.randn(len(golden.classnames), 77, method.clip.text.width)
    clip_state = method.clip.state_dict()
    for key, value in clip_state.items():
        if key.startswith("visual."):
            state["image_encoder." + key.removeprefix("visual.")] = value.clone()
        elif key.startswith(("transformer.", "ln_final.")) or key in ("positional_embedding", "text_projection"):
            state["text_encoder." + key] = value.clone()
    params = [torch.nn.Parameter(v.clone()) for v in values.values()]
    adamw = torch.optim.AdamW(params, lr=1e-3, weight_decay=5e-4)
    for p in params:
        p.grad = torch.ones_like(p)
    adamw.step()
    scheduler = {"cons_lr": 1e-5, "successor": torch.optim.lr_scheduler.CosineAnnealingLR(adamw, T_max=3),
                 "warmup_epoch": 1, "base_lrs": [1e-3], "last_epoch": 2}
    path = folder / LAYOUTS[method.name].registered_name / "model.pth.tar-3"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "epoch": 3, "optimizer": adamw.state_dict(), "scheduler": scheduler,
                "val_result": None}, path)


@pytest.fixture(scope="module", params=[n for n in METHODS if (GOLDEN_DIR / f"{n}.trajectory.json").exists()])
def trajectory(request):
    return load_golden(f"{request.param}.trajectory")


def test_import_reproduces_the_reference_logits(tmp_path, trajectory):
    method, name_map = build_method(trajectory)
    reference_checkpoint(tmp_path, trajectory, method)
    with torch.no_grad():  # forget the initial values: only the import may bring them back
        for i, (_, p) in enumerate(method.named_trainable()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    checkpoint = read_checkpoint(find_checkpoint(tmp_path, LAYOUTS[method.name].registered_name))
    report = load_into_method(checkpoint, method, "golden-mini")
    assert set(report.tensors) == set(name_map)
    assert report.dropped_buffers == ["prompt_embeddings"] and report.saved_classes == len(trajectory.classnames)
    assert report.frozen.matches, report.frozen.summary()
    images, t = trajectory.tensors["input.eval_images"], trajectory.tensors
    assert logits_error(eval_logits(method, images, BASE), t["eval.logits_init"]) <= 1
    assert logits_error(eval_logits(method, images, NOVEL), t["eval.logits_novel_init"]) <= 1


def test_cli_import_round_trip(tmp_path, trajectory, capsys):
    method, name_map = build_method(trajectory)
    reference_checkpoint(tmp_path / "run", trajectory, method)
    config = method.config
    sets = [f"method_config.{k}={json.dumps(v)}" for k, v in vars(config).items() if k != "text_chunk_size"]
    argv = ["import", str(tmp_path / "run"), "--out", str(tmp_path / "imported"), "--backbone", "golden-mini",
            "--quiet", "--method", method.name, "--classnames", ",".join(trajectory.classnames),
            "--template", method.prompt_template()]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 0, capsys.readouterr().err
    meta, tensors = read_adapter(tmp_path / "imported" / "adapter.safetensors")
    assert meta["method"] == method.name and meta["imported_from"]["epoch"] == 3
    saved = torch.load(tmp_path / "run" / LAYOUTS[method.name].registered_name / "model.pth.tar-3",
                       weights_only=False)["state_dict"]
    for reference, ours in name_map.items():
        assert torch.equal(tensors[ours], saved[reference]), reference


def test_checkpoint_of_the_other_family_member_is_refused(tmp_path):
    if len(METHODS) < 2:
        pytest.skip("one family member's goldens only")
    from promptclip.reference import DasslCheckpointError

    golden = load_golden("mmrl.trajectory")
    method, _ = build_method(golden)
    reference_checkpoint(tmp_path, golden, method)
    other, _ = build_method(load_golden("mmrlpp.trajectory"))
    checkpoint = read_checkpoint(find_checkpoint(tmp_path, LAYOUTS["mmrlpp"].registered_name))
    with pytest.raises(DasslCheckpointError, match="checkpoint of mmrl"):
        load_into_method(checkpoint, other)


# -- the protocols choose the rule ----------------------------------------------------------------------------------


def test_base2novel_run_uses_fused_logits_on_base_and_class_token_logits_on_novel(tmp_path, monkeypatch):
    """``promptclip run base2novel``: every evaluation forward of the base half is fused, every one of the novel half
    class-token only, and the records' accuracies are those of these logits."""
    calls: list[tuple[str, bool, bool]] = []
    real = mmrl_module.MMRL.forward

    def recording(self, batch):
        if not self.training:
            calls.append((self.eval_context.subsample, self.eval_context.source, self.uses_fusion))
        return real(self, batch)

    monkeypatch.setattr(mmrl_module.MMRL, "forward", recording)
    out = tmp_path / "grid"
    argv = ["run", "base2novel", "--methods", "mmrl", "--datasets", "eurosat-sample", "--seeds", "1", "--shots", "1",
            "--backbone", "golden-mini", "--out", str(out), "--no-report", "--quiet",
            "--set", "method_config.rep_layers=[2, 3, 4]", "--set", "train.max_epoch=1"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["split"] for r in records) == ["base", "novel"]
    assert {c for c in calls} == {("base", True, True), ("new", True, False)}


def test_set_eval_context_clears_nothing_learned(golden):
    """Switching rules is a pure choice between two outputs of the same model: cached class features are reused."""
    method, _ = build_method(golden)
    images = golden.images()
    fused = eval_logits(method, images, BASE)
    token = eval_logits(method, images, NOVEL)
    method.eval()
    with torch.no_grad():
        out = method.outputs({"image": images})
    assert torch.equal(fused, out["fusion"]) and torch.equal(token, out["logits"])


def test_mmrlpp_blends_tokens_across_layers(monkeypatch):
    """Mutation (MMRL++): replacing positions 1..N at later layers (MMRL's rule) instead of blending fails the
    logits; so does the frozen ``proj`` without its low-rank term."""
    if "mmrlpp" not in METHODS:
        pytest.skip("no mmrlpp golden")
    from promptclip.methods.mmrlpp import MMRLpp

    golden = load_golden("mmrlpp")
    method, _ = build_method(golden)
    expected = golden.tensors["eval.logits"]
    assert_close_values(eval_logits(method, golden.images(), BASE), expected, "eval.logits")
    assert golden.trainer_cfg["BETA"] < 1  # else blending is replacement and the mutation is no mutation
    monkeypatch.setattr(MMRLpp, "merge_tokens", lambda self, new, previous: new)
    with pytest.raises(AssertionError):
        assert_close_values(eval_logits(method, golden.images(), BASE), expected, "replaced tokens")
    monkeypatch.undo()
    monkeypatch.setattr(MMRLpp, "rep_projection", lambda self: self.clip.visual.proj)
    with pytest.raises(AssertionError):
        assert_close_values(eval_logits(method, golden.images(), BASE), expected, "proj without A @ B")


# -- presets: the reference's per-dataset values ------------------------------------------------------------------

#: yunncheng/MMRL trainers/config.py (B2N and FS): dataset -> values over the trainer yaml.
MMRL_PER_DATASET = {"stanford_cars": {"reg_weight": 7.0}, "fgvc_aircraft": {"reg_weight": 6.0},
                    "sun397": {"reg_weight": 6.0}, "dtd": {"reg_weight": 6.0}, "food101": {"reg_weight": 5.0},
                    "oxford_flowers": {"reg_weight": 4.0}, "ucf101": {"reg_weight": 3.0},
                    "caltech101": {"reg_weight": 0.5}, "oxford_pets": {"reg_weight": 0.2},
                    "eurosat": {"rep_dim": 2048, "reg_weight": 0.01}}
MMRLPP_PER_DATASET = {"fgvc_aircraft": (0.9, 2.0), "ucf101": (0.9, 3.0), "dtd": (0.9, 7.0),
                      "oxford_pets": (0.7, 0.01), "stanford_cars": (0.7, 6.0), "caltech101": (0.6, 3.0),
                      "sun397": (0.5, 3.0), "oxford_flowers": (0.4, 7.0), "eurosat": (0.2, 0.01),
                      "food101": (0.1, 1.0)}


def test_presets_carry_the_per_dataset_values_and_protocols_pick_them():
    from promptclip.presets import default_preset, load_preset

    for protocol, stem, epochs, batch in (("base2novel", "vit_b16", 10, 4), ("fewshot", "vit_b16_few_shot", 50, 32)):
        for dataset, values in MMRL_PER_DATASET.items():
            preset = load_preset(default_preset(protocol, "mmrl", dataset))
            assert preset.name == f"mmrl/{stem}_{dataset}" and preset.source
            assert {**{"rep_dim": 512}, **values}.items() <= preset.method_config.items()
            assert (preset.train.optimizer, preset.train.max_epoch, preset.train.batch_size) == ("adamw", epochs, batch)
    for protocol, stem, lr, epochs in (("base2novel", "vit_b16", 1e-3, 10), ("fewshot", "vit_b16_few_shot", 2e-3, 100)):
        for dataset, (beta, reg) in MMRLPP_PER_DATASET.items():
            preset = load_preset(default_preset(protocol, "mmrlpp", dataset))
            assert preset.name == f"mmrlpp/{stem}_{dataset}"
            assert (preset.method_config["beta"], preset.method_config["reg_weight"]) == (beta, reg)
            assert (preset.train.lr, preset.train.max_epoch) == (lr, epochs)
    assert load_preset(default_preset("base2novel", "mmrl", "imagenet")).method_config["reg_weight"] == 0.5
    assert load_preset(default_preset("fewshot", "mmrlpp", "imagenet")).method_config["reg_weight"] == 0.2
    cross = load_preset(default_preset("cross_dataset", "mmrl", "imagenet"))
    assert (cross.method_config["reg_weight"], cross.method_config["rep_dim"], cross.train.max_epoch,
            cross.train.warmup_epoch) == (0.2, 512, 1, 0)
    assert load_preset(default_preset("domain_generalization", "mmrlpp", "imagenet")).method_config["reg_weight"] == 0.1
    assert default_preset("base2novel", "mmrl", "my_own_data") == "mmrl/vit_b16"  # the trainer yaml's values


def test_reference_options_are_strict():
    from promptclip.errors import ConfigError
    from promptclip.methods.mmrl import MMRL
    from promptclip.methods.mmrlpp import MMRLpp

    with pytest.raises(ConfigError, match="BETA"):
        MMRL.config_from_reference({"BETA": 0.5})
    config = MMRLpp.config_from_reference({"REP_LAYERS": [1, 2, 3], "N_REP_TOKENS": 3, "REP_DIM": 256, "ALPHA": 0.6,
                                           "BETA": 0.5, "REG_WEIGHT": 2.0, "PROJ_LORA_DIM": 16, "RES_LORA_DIM": 2})
    assert (config.rep_layers, config.n_rep_tokens, config.rep_dim, config.alpha, config.beta, config.reg_weight,
            config.proj_lora_dim, config.res_lora_dim) == ([1, 2, 3], 3, 256, 0.6, 0.5, 2.0, 16, 2)
