"""Importing the reference repositories' own Dassl checkpoints (promptclip.reference), driven by the Dassl checkpoint
goldens (tests/golden/DASSL_CHECKPOINT_README.md): every ``<m>.dassl.json`` with its file(s) must reproduce the
trajectory golden's ``eval.logits`` once imported. DCP/CMPA's file is not shipped; its fixture is built here in the
reference's layout from ``cmpa.trajectory.*``.
"""

import io
import json
import os
import pickle
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from parity import GOLDEN_DIR, build_method, golden_backbone, load_golden, method_for
from promptclip.checkpoint import read_adapter
from promptclip.cli import main
from promptclip.clip.architectures import build_random
from promptclip.data import load_splits, subsample_classes
from promptclip.methods import create_method
from promptclip.methods.coop import CoOpConfig
from promptclip.methods.ivlp import IVLPConfig
from promptclip.methods.maple import MaPLeConfig
from promptclip.reference import (
    LAYOUTS,
    DasslCheckpointError,
    ForbiddenGlobalError,
    FrozenWeightsWarning,
    find_checkpoint,
    load_into_method,
    load_torch_file,
    read_checkpoint,
)
from promptclip.reference.dassl import check_config
from promptclip.reference.unpickle import Inert

DASSL_GOLDENS = sorted(p.name.removesuffix(".dassl.json") for p in GOLDEN_DIR.glob("*.dassl.json"))
#: Checkpoint goldens too large to ship (``<m>.dassl-skipped.json``): the method's own tests build the file in the
#: reference's layout (e.g. tests/test_method_dept.py for dept_maple).
DASSL_SKIPPED = sorted(p.name.removesuffix(".dassl-skipped.json") for p in GOLDEN_DIR.glob("*.dassl-skipped.json"))
#: (config, variant): the fp32 file of every golden, and the fp16 copy where one is shipped.
VARIANTS = [(name, variant) for name in DASSL_GOLDENS
            for variant in ("fp32", "fp16")
            if variant == "fp32" or "fp16" in json.loads((GOLDEN_DIR / f"{name}.dassl.json").read_text())[
                "registered_model"]]
#: Bar for an fp16 copy against the fp32 training's logits, relative to max(1, max|logits|): 2^-10, twice fp16's
#: unit roundoff (the prompts are rounded to fp16; measured 1.6e-4 for maple, 0.9e-4 for coop_ctx4_init).
FP16_BAR = 2.0 ** -10
#: CMPA's trainer registers its whole model as "MultiModalPromptLearner" (GingL/CMPA trainers/cmpa.py,
#: ``self.register_model("MultiModalPromptLearner", self.model, ...)``).
CMPA_REGISTERED_NAME = "MultiModalPromptLearner"
#: Methods without a checkpoint golden whose Dassl file is built in their own test (in the reference's layout).
def dassl_meta(name: str) -> dict:
    return json.loads((GOLDEN_DIR / f"{name}.dassl.json").read_text())


def trajectory_of(meta: dict):
    return load_golden(meta["trajectory_golden"]["json"].removesuffix(".json"))


def eval_logits(method, images: torch.Tensor) -> torch.Tensor:
    method.eval()
    with torch.no_grad():
        return method({"image": images})


def golden_file(name: str, variant: str = "fp32") -> Path:
    registered = dassl_meta(name)["registered_model"]
    return GOLDEN_DIR / (registered if variant == "fp32" else registered["fp16"])["file"]


#: Methods whose reference checkpoint golden is not shipped (too large): their import is tested on a checkpoint built in
#: the reference's layout (DCP's here, the others in tests/test_method_<method>.py).
BUILT_FIXTURES = {"dcp", "tcp", "mmrl", "mmrlpp", "promptkd"}


def golden_config(name: str):
    """Our method config of a golden's reference run (its trainer options, through ``config_from_reference``)."""
    return build_method(trajectory_of(dassl_meta(name)))[0].config


def saved_shape(name: str, *keys: str) -> list[int]:
    """The shape of the first of ``keys`` saved in a golden's Dassl file (from its .dassl.json)."""
    entries = {e["key"]: e["shape"] for e in dassl_meta(name)["registered_model"]["state_dict"]}
    return next(entries[key] for key in keys if key in entries)


def yaml_bool(value: bool) -> str:
    return str(bool(value)).lower()


def test_every_method_with_a_reference_trainer_has_a_shipped_golden_or_a_built_fixture():
    covered = {method_for(trajectory_of(dassl_meta(name))) for name in DASSL_GOLDENS} | BUILT_FIXTURES
    # A checkpoint golden skipped for size (``<m>.dassl-skipped.json``): the method's own test builds the fixture.
    covered |= {method_for(trajectory_of(json.loads((GOLDEN_DIR / f"{name}.dassl-skipped.json").read_text())))
                for name in DASSL_SKIPPED}
    assert covered == set(LAYOUTS)


# -- the goldens -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_imported_golden_reproduces_the_reference_logits(name, variant, one_torch_thread):
    meta = dassl_meta(name)
    registered = meta["registered_model"]
    saved = registered if variant == "fp32" else registered["fp16"]
    golden = trajectory_of(meta)
    method, name_map = build_method(golden)  # the reference's initial values: the import has to replace them
    layout = LAYOUTS[method.name]
    assert layout.registered_name == registered["name"]

    output_folder = GOLDEN_DIR / saved["file"].split("/")[0]
    path = find_checkpoint(output_folder, layout.registered_name)
    assert path == GOLDEN_DIR / saved["file"]
    checkpoint = read_checkpoint(path)
    assert checkpoint.sha256 == saved["sha256"] and checkpoint.epoch == registered["epoch"]
    report = load_into_method(checkpoint, method, "golden-mini")

    entries = registered["state_dict"]
    assert set(report.tensors) == set(name_map) == {layout.key_prefix + e["key"] for e in entries
                                                    if e["kind"] == "trainable"}
    assert set(report.dropped_buffers) | set(report.skipped_unused) == {layout.key_prefix + e["key"] for e in entries
                                                                        if e["kind"] != "trainable"}
    assert report.saved_dtypes == (["float32"] if variant == "fp32" else ["float16"])
    params = dict(method.named_trainable())
    for reference, ours in name_map.items():
        assert params[ours].dtype == torch.float32
        final = golden.tensors.get(f"final.{reference}")
        if final is not None:  # stored whole: the file holds the values the reference tested with
            stored = checkpoint.state_dict[reference.removeprefix(layout.key_prefix)].dtype
            assert torch.equal(params[ours].detach(), final.to(stored).float()), reference

    expected = golden.tensors["eval.logits"]
    scale = max(1.0, expected.abs().max().item())
    bar = 3e-4 * scale if variant == "fp32" else FP16_BAR * scale
    assert (golden.tensors["eval.logits_init"] - expected).abs().max().item() > bar  # the test can fail
    logits = eval_logits(method, golden.tensors["input.eval_images"])
    assert (logits - expected).abs().max().item() <= bar
    if variant == "fp16":  # the reference's own reload of the same fp16 file: the fp32 bar
        reference_logits = torch.tensor(saved["reference_reload"]["logits"])
        assert (logits - reference_logits).abs().max().item() <= 3e-4 * scale


def test_reader_matches_torch_load_on_every_golden_file():
    for name, variant in VARIANTS:
        path = golden_file(name, variant)
        ours = load_torch_file(path)
        trusted = torch.load(path, weights_only=False, map_location="cpu")  # our own test file: trusted
        assert list(ours) == list(trusted) and ours["epoch"] == trusted["epoch"]
        assert list(ours["state_dict"]) == list(trusted["state_dict"])
        for key, value in trusted["state_dict"].items():
            assert ours["state_dict"][key].dtype == value.dtype and torch.equal(ours["state_dict"][key], value), key
        if "successor" in ours["scheduler"]:  # a warm-up wrapper: its CosineAnnealingLR object, never rebuilt
            assert isinstance(ours["scheduler"]["successor"], Inert)


def test_weights_only_torch_load_cannot_read_them():
    with pytest.raises(pickle.UnpicklingError, match="CosineAnnealingLR"):
        torch.load(golden_file("coop_ctx16"), weights_only=True)


# -- DCP / CMPA: a fixture in the reference's layout -------------------------------------------------------------------


def cmpa_checkpoint(folder: Path, golden, differ_block: int | None = None) -> Path:
    """What CMPA's trainer saves (Dassl ``save_model``), with the trajectory golden's initial values (its final values
    are stored whole only for small tensors): ``state_dict()`` of the whole model, which repeats a shared CMPA block
    (``PS``) under every layer, the class buffers, SGD and the scheduler with its ``CosineAnnealingLR`` object."""
    values = {entry["name"]: golden.init_value(entry).clone() for entry in golden.meta["trainable_params"]}
    n_cls, (n_ctx, width) = len(golden.classnames), values["prompt_learner.prompts_text"].shape
    state = OrderedDict(values)
    state["prompt_learner.token_prefix"] = torch.randn(n_cls, 1, width)
    context = golden.meta["backbone"]["config"]["context_length"]
    state["prompt_learner.token_suffix"] = torch.randn(n_cls, context - 1 - n_ctx, width)
    if golden.trainer_cfg.get("PS", True):
        for layer in range(1, golden.meta["backbone"]["config"]["vision_layers"]):
            for name, value in values.items():
                if name.startswith("encoder.resblocks.0.prompt_attn."):
                    copy = value.clone() + (0.01 if layer == differ_block else 0.0)
                    state[name.replace("resblocks.0.", f"resblocks.{layer}.")] = copy
    params = [torch.nn.Parameter(v.clone()) for v in values.values()]  # the optimizer's own copies
    sgd = torch.optim.SGD(params, lr=0.0035, momentum=0.9, weight_decay=5e-4)
    for p in params:
        p.grad = torch.ones_like(p)
    sgd.step()
    scheduler = {"cons_lr": 1e-5, "successor": torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=3),
                 "warmup_epoch": 1, "base_lrs": [0.0035], "last_epoch": 2}
    path = folder / CMPA_REGISTERED_NAME / "model.pth.tar-3"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "epoch": 3, "optimizer": sgd.state_dict(), "scheduler": scheduler,
                "val_result": None}, path)
    return path


@pytest.fixture(scope="module")
def cmpa_golden():
    return load_golden("cmpa.trajectory")


def test_dcp_import_reproduces_the_reference_logits(tmp_path, cmpa_golden, one_torch_thread):
    cmpa_checkpoint(tmp_path, cmpa_golden)
    method, name_map = build_method(cmpa_golden)
    with torch.no_grad():  # forget the initial values: only the import may bring them back
        for i, (_, p) in enumerate(method.named_trainable()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    report = load_into_method(read_checkpoint(find_checkpoint(tmp_path, LAYOUTS["dcp"].registered_name)), method)
    assert set(report.tensors) == set(name_map)
    assert report.inferred["shared"] is bool(cmpa_golden.trainer_cfg.get("PS", True)) and report.frozen.saved == 0
    expected = cmpa_golden.tensors["eval.logits_init"]  # the reference's logits with exactly these values
    logits = eval_logits(method, cmpa_golden.tensors["input.eval_images"])
    assert (logits - expected).abs().max().item() <= 3e-4 * max(1.0, expected.abs().max().item())


def test_dcp_checkpoint_with_one_block_per_layer_is_not_a_shared_config(tmp_path, cmpa_golden):
    if not cmpa_golden.trainer_cfg.get("PS", True):
        pytest.skip("the CMPA golden has one block per layer (PS False): nothing shared to break")
    checkpoint = read_checkpoint(cmpa_checkpoint(tmp_path, cmpa_golden, differ_block=2))
    method, _ = build_method(cmpa_golden)
    with pytest.raises(DasslCheckpointError, match=r"shared=false \(the config has true\).*"
                                                   r"--set method_config\.shared=false"):
        load_into_method(checkpoint, method)


# -- frozen CLIP tensors in released files ------------------------------------------------------------------------


def with_extra_tensors(folder: Path, name: str, extra: dict[str, torch.Tensor]) -> Path:
    """A golden file with more state-dict entries (released files carry the whole frozen CLIP)."""
    source = golden_file(name)
    saved = torch.load(source, weights_only=False)  # our own golden: trusted
    saved["state_dict"].update(extra)
    path = folder / source.parent.name / source.name
    path.parent.mkdir(parents=True)
    torch.save(saved, path)
    return path


def frozen_clip(golden, dtype=torch.float32, perturb: str | None = None) -> dict[str, torch.Tensor]:
    """Some of the golden's backbone tensors under MaPLe's names (``image_encoder.*``, ``text_encoder.*``)."""
    state = golden_backbone(golden).state_dict()
    names = {"image_encoder.conv1.weight": "visual.conv1.weight", "text_encoder.ln_final.weight": "ln_final.weight",
             "text_encoder.transformer.resblocks.0.attn.in_proj_weight": "transformer.resblocks.0.attn.in_proj_weight",
             "logit_scale": "logit_scale"}
    frozen = {ours: state[theirs].to(dtype).clone() for ours, theirs in names.items()}
    if perturb:
        frozen[perturb] = frozen[perturb] + 0.05 * torch.randn(frozen[perturb].shape,
                                                               generator=torch.Generator().manual_seed(0))
    return frozen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_frozen_clip_equal_to_the_backbone_is_accepted_silently(tmp_path, dtype):
    golden = trajectory_of(dassl_meta("maple"))
    method, _ = build_method(golden)
    checkpoint = read_checkpoint(with_extra_tensors(tmp_path, "maple", frozen_clip(golden, dtype)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_into_method(checkpoint, method, golden.meta["backbone"]["name"])
    assert report.frozen.saved == 4 and report.frozen.matches and not report.warnings


def test_frozen_clip_of_other_weights_warns_clearly(tmp_path):
    golden = trajectory_of(dassl_meta("maple"))
    method, _ = build_method(golden)
    backbone = golden.meta["backbone"]
    beyond = f"image_encoder.transformer.resblocks.{backbone['config']['vision_layers']}.ln_1.weight"
    other = {**frozen_clip(golden, perturb="image_encoder.conv1.weight"),
             beyond: torch.ones(backbone["config"]["vision_width"])}  # a deeper tower than the golden's
    checkpoint = read_checkpoint(with_extra_tensors(tmp_path, "maple", other))
    with pytest.warns(FrozenWeightsWarning, match=rf"trained on other CLIP weights than {backbone['name']}: 2 of 5"):
        report = load_into_method(checkpoint, method, backbone["name"])
    assert dict(report.frozen.differing).keys() == {"image_encoder.conv1.weight", beyond}
    deeper = dict(report.frozen.differing)[beyond]
    assert deeper == "absent from the backbone"


def test_promptsrc_teacher_tower_is_frozen_clip_and_marks_the_file_as_promptsrc(tmp_path):
    golden = trajectory_of(dassl_meta("promptsrc"))
    method, _ = build_method(golden)
    teacher = {"prompt_learner.ZS_image_encoder.conv1.weight": method.clip.state_dict()["visual.conv1.weight"].clone()}
    path = with_extra_tensors(tmp_path, "promptsrc", teacher)
    report = load_into_method(read_checkpoint(path), method)
    assert report.frozen.saved == 1 and report.frozen.matches
    config = method.config  # IVLP prompts of the same sizes: only the teacher tower tells the files apart
    same_prompts = IVLPConfig(n_ctx_text=config.n_ctx_text, n_ctx_vision=config.n_ctx_vision,
                              depth_text=config.depth_text, depth_vision=config.depth_vision)
    ivlp = create_method("ivlp", method.clip, golden.classnames, same_prompts)
    with pytest.raises(DasslCheckpointError, match="ZS_image_encoder.*looks like a checkpoint of promptsrc"):
        load_into_method(read_checkpoint(path), ivlp)


# -- what the shapes say -----------------------------------------------------------------------------------------


def test_shapes_are_checked_against_the_config_before_building():
    maple = read_checkpoint(golden_file("maple"))
    n_ctx, depth = golden_config("maple").n_ctx, golden_config("maple").depth  # what the run had (its cfg)
    assert check_config(maple, "maple", MaPLeConfig(n_ctx=n_ctx, depth=depth)) == {"n_ctx": n_ctx, "depth": depth}
    with pytest.raises(DasslCheckpointError, match=rf"depth={depth} \(the config has {depth + 6}\).*"
                                                   rf"--set method_config\.depth={depth}"):
        check_config(maple, "maple", MaPLeConfig(n_ctx=n_ctx, depth=depth + 6))
    coop = read_checkpoint(golden_file("coop_ctx16"))
    config = golden_config("coop_ctx16")
    csc, n_ctx = config.csc, context_length("coop_ctx16")
    assert csc == (len(saved_shape("coop_ctx16", "ctx", "prompt_learner.ctx")) == 3)
    with pytest.raises(DasslCheckpointError, match=rf"csc={yaml_bool(csc)} \(the config has {yaml_bool(not csc)}\)"):
        check_config(coop, "coop", CoOpConfig(n_ctx=n_ctx, csc=not csc))
    with pytest.raises(DasslCheckpointError, match=rf"n_ctx={n_ctx} \(the config has {n_ctx + 3}\)"):
        check_config(coop, "coop", CoOpConfig(n_ctx=n_ctx + 3, csc=csc))
    # With init words, the words set CoOp's context length, not n_ctx (the shape check after building does).
    init = golden_config("coop_ctx4_init")
    assert init.ctx_init.strip(), "coop_ctx4_init is a run with init words"
    words = context_length("coop_ctx4_init")
    assert check_config(read_checkpoint(golden_file("coop_ctx4_init")), "coop",
                        CoOpConfig(n_ctx=words + 12, ctx_init=init.ctx_init))["n_ctx"] == words


def test_width_mismatch_names_tensor_shapes_and_backbone():
    golden = trajectory_of(dassl_meta("ivlp"))
    config = golden_config("ivlp")  # the file's prompt counts and depths, on a backbone of other widths
    tiny = build_random("tiny")
    method = create_method("ivlp", tiny, golden.classnames, config)
    saved = saved_shape("ivlp", "prompt_learner.ctx")
    expected = [*saved[:-1], tiny.text.width]
    assert saved != expected, "the golden's text width must differ from tiny's for this test"
    shapes = rf"prompt_learner\.ctx has shape \[{', '.join(map(str, saved))}\], the method expects "
    shapes += rf"\[{', '.join(map(str, expected))}\]"
    with pytest.raises(DasslCheckpointError, match=rf"{shapes}.*tiny: text {tiny.text.width}, vision "
                                                   rf"{tiny.visual.width}"):
        load_into_method(read_checkpoint(golden_file("ivlp")), method, "tiny")


def shared_context_golden() -> str:
    """A golden whose file keeps class buffers and whose context is shared by the classes (so the class set can
    change): which one depends on the configurations shipped."""
    for name in DASSL_GOLDENS:
        keys = {e["key"].rsplit(".", 1)[-1] for e in dassl_meta(name)["registered_model"]["state_dict"]}
        if "token_prefix" in keys and not getattr(golden_config(name), "csc", False):
            return name
    pytest.skip("no Dassl golden with class buffers and a shared context")


def test_class_count_differing_from_the_checkpoint_is_warned():
    name = shared_context_golden()
    golden = trajectory_of(dassl_meta(name))
    method, _ = build_method(golden)
    saved = len(golden.classnames)
    assert saved == saved_shape(name, "token_prefix", "prompt_learner.token_prefix")[0]
    method.set_classnames(golden.classnames[: saved - 1])
    with pytest.warns(UserWarning, match=rf"trained on {saved} classes.*--subsample base"):
        report = load_into_method(read_checkpoint(golden_file(name)), method)
    assert report.saved_classes == saved


def context_length(name: str) -> int:
    """The length of the learned text context in a golden's Dassl file (from its .dassl.json)."""
    entries = dassl_meta(name)["registered_model"]["state_dict"]
    return next(e["shape"][-2] for e in entries if e["key"] in ("ctx", "prompt_learner.ctx"))


@pytest.mark.parametrize("name,method,needle", [
    ("maple", "dcp", "no tensor prompt_learner.prompts_text.*checkpoint of maple"),
    ("cocoop", "coop", "meta_net.linear2.*checkpoint of cocoop"),
    ("kgcoop", "coop", "bias_vectors.*checkpoint of kgcoop"),
    ("coop_ctx16", "kgcoop", "which every kgcoop checkpoint saves"),
    ("vpt", "coop", "no tensor prompt_learner.ctx.*checkpoint of vpt"),
])
def test_checkpoint_of_another_method_is_refused(name, method, needle):
    golden = trajectory_of(dassl_meta(name))
    # A config whose context length (and class-specific context) fits the file, so that only the tensors tell the
    # methods apart.
    config = {"ctx_init": ""} if name == "vpt" else {"ctx_init": "", "n_ctx": context_length(name)}
    if method in ("coop", "kgcoop") and name != "vpt":
        config["csc"] = len(saved_shape(name, "ctx", "prompt_learner.ctx")) == 3
    if method == "dcp":
        config["depth"] = min(2, golden.meta["backbone"]["config"]["vision_layers"])
    other = create_method(method, golden_backbone(golden), golden.classnames, config)
    with pytest.raises(DasslCheckpointError, match=needle):
        load_into_method(read_checkpoint(golden_file(name)), other)


# -- finding files -----------------------------------------------------------------------------------------------


def test_find_checkpoint_picks_the_latest_epoch_or_the_one_asked_for(tmp_path):
    folder = tmp_path / "prompt_learner"
    folder.mkdir()
    for epoch in (2, 10, 9):
        (folder / f"model.pth.tar-{epoch}").write_bytes(b"x")
    assert find_checkpoint(tmp_path, "prompt_learner") == folder / "model.pth.tar-10"  # numeric, not lexical
    assert find_checkpoint(folder, "prompt_learner", epoch=9) == folder / "model.pth.tar-9"
    with pytest.raises(DasslCheckpointError, match=r"no checkpoint of epoch 7 .*available: 2, 9, 10$"):
        find_checkpoint(tmp_path, "prompt_learner", epoch=7)
    with pytest.raises(DasslCheckpointError, match="has no model-best.pth.tar"):
        find_checkpoint(tmp_path, "prompt_learner", epoch="best")
    assert find_checkpoint(folder / "model.pth.tar-9", "prompt_learner", epoch=9) == folder / "model.pth.tar-9"
    with pytest.raises(DasslCheckpointError, match="is not the checkpoint of epoch 2"):
        find_checkpoint(folder / "model.pth.tar-9", "prompt_learner", epoch=2)
    (folder / "model-best.pth.tar").write_bytes(b"x")
    assert find_checkpoint(tmp_path, "prompt_learner", epoch="best") == folder / "model-best.pth.tar"
    for epoch in (2, 10, 9):
        (folder / f"model.pth.tar-{epoch}").unlink()
    assert find_checkpoint(tmp_path, "prompt_learner") == folder / "model-best.pth.tar"


def test_find_checkpoint_names_the_folder_of_another_trainer(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DasslCheckpointError, match="no Dassl checkpoint in"):
        find_checkpoint(tmp_path / "empty", "prompt_learner")
    with pytest.raises(DasslCheckpointError, match=r"under MultiModalPromptLearner/.*saves under VLPromptLearner/"):
        find_checkpoint(GOLDEN_DIR / "maple.dassl", "VLPromptLearner")
    saving = ", ".join(m for m, layout in LAYOUTS.items() if layout.registered_name == "MultiModalPromptLearner")
    with pytest.raises(DasslCheckpointError, match=rf"registered as 'MultiModalPromptLearner' \({saving}\)"):
        find_checkpoint(GOLDEN_DIR / "maple.dassl" / "MultiModalPromptLearner", "prompt_learner")


# -- reading files safely ------------------------------------------------------------------------------------------


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Evaluates:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload,global_name", [(_RunsShell, "system"), (_Evaluates, "builtins.eval")])
def test_a_file_whose_pickle_runs_code_is_refused_without_running_it(tmp_path, payload, global_name):
    marker = tmp_path / "ran"
    path = tmp_path / "prompt_learner" / "model.pth.tar-1"
    path.parent.mkdir()
    # As a released file might hide it: inside the scheduler entry, next to a real state dict.
    torch.save({"state_dict": {"ctx": torch.zeros(2, 512)}, "epoch": 1,
                "scheduler": {"successor": payload(marker)}}, path)
    with pytest.raises(ForbiddenGlobalError, match=rf"{global_name}.*nothing from the file was run"):
        load_torch_file(path)
    with pytest.raises(DasslCheckpointError, match="refused"):
        read_checkpoint(path)
    assert not marker.exists()


def torch_archive(path: Path, data_pkl: bytes) -> Path:
    """A zip in torch.save's layout around a hand-written pickle."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
    return path


def test_placeholders_record_and_never_call_the_class(tmp_path, monkeypatch):
    calls = []
    for hook in ("__init__", "__setstate__"):  # what REDUCE and BUILD would run on the real class
        monkeypatch.setattr(torch.optim.SGD, hook, lambda *a, **k: calls.append(a))
    # SGD(1, 2) via REDUCE, then BUILD with a state dict, then SETITEMS: what the real unpickler would run.
    data = (b"\x80\x02ctorch.optim.sgd\nSGD\n(K\x01K\x02tR"  # GLOBAL, MARK, ints, TUPLE, REDUCE
            b"}X\x05\x00\x00\x00stateK\x07sb"  # EMPTY_DICT, 'state': 7, SETITEM, BUILD
            b"(X\x01\x00\x00\x00kK\x08u.")  # MARK, 'k': 8, SETITEMS, STOP
    loaded = load_torch_file(torch_archive(tmp_path / "x.pt", data))
    assert isinstance(loaded, Inert) and loaded.qualname == "torch.optim.sgd.SGD"
    assert loaded.args == (1, 2) and loaded.state == {"state": 7} and loaded.items == {"k": 8}
    assert calls == []


def test_tensor_views_beyond_their_storage_are_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save({"state_dict": {"ctx": torch.zeros(4)}}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        entries = {n: archive.read(n) for n in archive.namelist()}
    pkl_name = next(n for n in entries if n.endswith("data.pkl"))
    entries[pkl_name] = entries[pkl_name].replace(b"K\x04\x85", b"K\x40\x85")  # size (4,) -> (64,)
    path = tmp_path / "model.pth.tar-1"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for n, data in entries.items():
            archive.writestr(n, data)
    with pytest.raises(DasslCheckpointError, match="cannot read"):
        read_checkpoint(path)


def test_empty_truncated_and_legacy_files_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.pth.tar"
    empty.write_bytes(b"")
    with pytest.raises(DasslCheckpointError, match="is empty"):
        read_checkpoint(empty)
    data = golden_file("coop_ctx16").read_bytes()
    for cut in (len(data) // 2, len(data) - 30):
        truncated = tmp_path / f"cut{cut}.pth.tar"
        truncated.write_bytes(data[:cut])
        with pytest.raises(DasslCheckpointError, match="truncated or corrupt"):
            read_checkpoint(truncated)
    legacy = tmp_path / "legacy.pth.tar"
    legacy.write_bytes(pickle.dumps({"state_dict": {}}, protocol=2))
    with pytest.raises(DasslCheckpointError, match="legacy"):
        read_checkpoint(legacy)


# -- the command line ------------------------------------------------------------------------------------------------


def classnames_of(name: str) -> str:
    return ",".join(trajectory_of(dassl_meta(name)).classnames)


def maple_settings() -> list[str]:
    """``--set`` options giving the maple golden's prompt sizes (the preset's are the official run's)."""
    config = golden_config("maple")
    return ["--set", f"method_config.n_ctx={config.n_ctx}", "--set", f"method_config.depth={config.depth}",
            "--set", f"method_config.ctx_init={config.ctx_init}"]


def import_args(source, out, *extra) -> list[str]:
    return ["import", str(source), "--out", str(out), "--backbone", "golden-mini", "--quiet", *extra]


@pytest.fixture(scope="module")
def imported_maple(tmp_path_factory) -> Path:
    """`promptclip import` of the maple golden (a Dassl output folder) on golden-mini."""
    out = tmp_path_factory.mktemp("imported") / "maple"
    argv = import_args(GOLDEN_DIR / "maple.dassl", out, "--method", "maple", "--classnames", classnames_of("maple"),
                       *maple_settings())
    assert main(argv) == 0
    return out


def test_cli_import_eval_predict_round_trip(imported_maple, capsys):
    meta, tensors = read_adapter(imported_maple / "adapter.safetensors")
    source = dassl_meta("maple")["registered_model"]
    assert meta["method"] == "maple" and meta["backbone"]["name"] == "golden-mini"
    assert meta["imported_from"]["sha256"] == source["sha256"] and meta["imported_from"]["epoch"] == source["epoch"]
    saved = load_torch_file(GOLDEN_DIR / source["file"])["state_dict"]
    name_map = build_method(trajectory_of(dassl_meta("maple")))[1]
    for reference, ours in name_map.items():
        assert torch.equal(tensors[ours], saved[reference].float()), reference
    capsys.readouterr()

    assert main(["eval", "--adapter", str(imported_maple), "--dataset", "eurosat-sample", "--subsample", "base",
                 "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    base = subsample_classes(load_splits("eurosat-sample"), "base")
    assert summary["method"] == "maple" and summary["num_samples"] == len(base.test) and 0 <= summary["accuracy"] <= 100

    images = [str(r.path) for r in load_splits("eurosat-sample").test[:3]]
    assert main(["predict", *images, "--adapter", str(imported_maple), "--top-k", "2", "--format", "json",
                 "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {n.replace("_", " ") for n in classnames_of("maple").split(",")}
    assert [r["path"] for r in rows] == images
    assert all(len(r["predictions"]) == 2 and {p["label"] for p in r["predictions"]} <= names for r in rows)


def test_cli_run_evaluates_an_imported_adapter_in_a_protocol(imported_maple, tmp_path):
    out = tmp_path / "grid"
    argv = ["run", "base2novel", "--methods", "maple", "--datasets", "eurosat-sample", "--seeds", "1",
            "--adapter", f"maple={imported_maple}", "--backbone", "golden-mini", "--out", str(out), "--no-report",
            "--quiet"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["split"] for r in records) == ["base", "novel"]
    assert all(r["method_label"] == "maple [adapter]" and r["adapter"].endswith("adapter.safetensors")
               for r in records)
    assert not list(out.rglob("train_state*.json"))  # nothing was trained


def test_cli_train_starts_from_an_imported_adapter(imported_maple, tmp_path):
    out = tmp_path / "finetune"
    argv = ["train", "--method", "maple", "--dataset", "eurosat-sample", "--shots", "1", "--backbone", "golden-mini",
            "--init-adapter", str(imported_maple), "--out", str(out), "--quiet", "--precision", "fp32",
            *maple_settings(), "--set", "train.max_epoch=1", "--set", "train.warmup_epoch=0",
            "--set", "train.lr=0.000000001", "--set", "train.weight_decay=0"]
    assert main(argv) == 0
    _, start = read_adapter(imported_maple / "adapter.safetensors")
    _, trained = read_adapter(out / "adapter.safetensors")
    assert start.keys() == trained.keys()
    for key, value in start.items():  # an lr of 1e-9 keeps the values where the import put them
        assert (trained[key] - value).abs().max().item() < 1e-6, key


def test_cli_import_errors_are_one_paragraph(tmp_path, capsys):
    (tmp_path / "no_checkpoint").mkdir()
    empty = tmp_path / "empty.pth.tar"
    empty.write_bytes(b"")
    truncated = tmp_path / "cut.pth.tar"
    truncated.write_bytes(golden_file("coop_ctx16").read_bytes()[:5000])
    absent_epoch = dassl_meta("coop_ctx16")["registered_model"]["epoch"] + 4
    evil = tmp_path / "evil" / "prompt_learner" / "model.pth.tar-1"
    evil.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "epoch": 1, "scheduler": _RunsShell(tmp_path / "ran")}, evil)
    savers = ", ".join(m for m, layout in LAYOUTS.items() if layout.registered_name == "MultiModalPromptLearner")
    cases = [
        (GOLDEN_DIR / "maple.dassl", ["--method", "dcp"], "looks like a checkpoint of maple"),
        (GOLDEN_DIR / "maple.dassl", ["--method", "ivlp"], f"is where {savers} save"),
        (tmp_path / "no_checkpoint", ["--method", "coop"], "no Dassl checkpoint in"),
        (empty, ["--method", "coop"], "is empty"),
        (truncated, ["--method", "coop"], "truncated or corrupt"),
        (evil.parent.parent, ["--method", "coop"], "refused"),
        (GOLDEN_DIR / "coop_ctx16.dassl", ["--method", "coop", "--epoch", str(absent_epoch)],
         f"no checkpoint of epoch {absent_epoch}"),
        (GOLDEN_DIR / "coop_ctx16.dassl", ["--method", "zeroshot"], "has no reference Dassl trainer"),
    ]
    for source, extra, needle in cases:
        code = main(import_args(source, tmp_path / "out", *extra, "--classnames", "a,b"))
        err = capsys.readouterr().err
        assert code == 2, (source, extra, err)
        assert err.startswith("error: ") and needle in " ".join(err.split()) and "Traceback" not in err, err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()
