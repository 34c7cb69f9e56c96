"""TCP (promptclip.methods.tcp): what the generic golden tests do not cover -- mutation checks of its mechanisms
(class-aware injection, Adam's eps 1e-3), the reference's ignored ``W``, templates, and the import of a reference
checkpoint built here in the layout tests/golden/methods/tcp.md describes (the checkpoint golden is not shipped).
"""

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from parity import (
    build_method,
    golden_batch,
    load_golden,
    logits_error,
    run_replay,
)
from promptclip.checkpoint import read_adapter
from promptclip.cli import main
from promptclip.errors import ConfigError
from promptclip.methods import create_method
from promptclip.methods.tcp import TCP, TCPConfig
from promptclip.reference import LAYOUTS, find_checkpoint, load_into_method, read_checkpoint
from promptclip.testing import contract_backbone


@pytest.fixture(scope="module")
def golden():
    return load_golden("tcp")


@pytest.fixture(scope="module")
def trajectory():
    return load_golden("tcp.trajectory")


def value_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    """The one-step error as a multiple of its bar (1e-4 * max(1, max|golden|))."""
    return (ours.detach() - expected).abs().max().item() / (1e-4 * max(1.0, expected.abs().max().item()))


def test_the_golden_injection_layer_and_loss_weight_come_from_the_files(golden):
    method, _ = build_method(golden)
    assert method.config.injection_layer == golden.meta["cfg"]["tcp_injection_layer"]
    assert method.config.loss_weight == golden.meta["cfg"].get("tcp_consistency_weight_effective", 8.0)
    _, losses = method.training_step(golden_batch(golden, train=True))
    total = losses["loss_ce"].item() + method.config.loss_weight * losses["score"].item()
    assert losses["loss"].item() == pytest.approx(total, rel=1e-6)
    for ours, key in ((losses["loss_ce"], "train.loss_ce"), (losses["score"], "train.score")):
        assert value_error(ours, golden.tensors[key]) <= 1, key


def test_reference_weight_w_has_no_effect():
    base = {"N_CTX": 4, "CSC": False, "CTX_INIT": False, "CLASS_TOKEN_POSITION": "end"}
    assert TCP.config_from_reference({**base, "W": 1.0}) == TCP.config_from_reference({**base, "W": 3.0})
    assert TCP.config_from_reference(base).loss_weight == 8.0
    assert TCP.config_from_reference({**base, "CTX_INIT": True}).n_ctx == 4
    with pytest.raises(ConfigError, match="CSC"):
        TCP.config_from_reference({**base, "CSC": True})
    with pytest.raises(ConfigError, match="no mapping"):
        TCP.config_from_reference({**base, "GAMMA": 1})


def test_class_aware_tokens_match_the_reference(golden):
    method, _ = build_method(golden)
    method.eval()
    with torch.no_grad():
        tokens = method.class_aware_tokens()
        frozen = method.frozen_text_features
    assert value_error(tokens, golden.tensors["eval.class_aware_tokens"]) <= 1
    assert value_error(frozen, golden.tensors["eval.kg_text_features"]) <= 1


def test_mutation_without_injection_the_golden_comparison_fails(golden):
    """Mechanism check: with the class-aware tokens never injected, the logits leave the one-step bar."""
    method, _ = build_method(golden)
    method.config.injection_layer = -1  # no block has this index: the tokens are never injected
    method.eval()
    with torch.no_grad():
        logits = method(golden_batch(golden, train=False))
    ratio = value_error(logits, golden.tensors["eval.logits"])
    print(f"tcp without injection: eval logits {ratio:.3g}x the bar")
    assert ratio > 10


def test_mutation_injection_one_block_late_fails(golden):
    method, _ = build_method(golden)
    method.config.injection_layer += 1
    method.eval()
    with torch.no_grad():
        logits = method(golden_batch(golden, train=False))
    assert value_error(logits, golden.tensors["eval.logits"]) > 10


def test_mutation_torch_default_adam_eps_fails_the_trajectory(monkeypatch):
    """Mechanism check: Adam with torch's eps 1e-8 (the unedited Dassl) instead of the golden's 1e-3."""
    import promptclip.train as train

    original = train.train_config_from_dassl

    def default_eps(*args, **kwargs):
        kwargs.pop("adam_eps", None)
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "train_config_from_dassl", default_eps)
    replay = run_replay("tcp")
    assert replay.method.name == "tcp"
    ratio = logits_error(replay.logits, replay.golden.tensors["eval.logits"])
    print(f"tcp with Adam eps 1e-8: final eval logits {ratio:.3g}x the bar")
    assert ratio > 1


def test_templates_map_from_the_datasets_coop_template():
    backbone = contract_backbone()
    names = ["forest", "annual crop"]

    def made(template, **config):
        return create_method("tcp", backbone, names, TCPConfig(**config), template=template)

    eurosat = made("a centered satellite photo of {}.")
    assert (eurosat.prompt_template, eurosat.frozen_template) == ("X X X X {}.", "a centered satellite photo of {}.")
    dtd = made("{} texture.")
    assert (dtd.prompt_template, dtd.frozen_template) == ("X X X X {} texture.", "a photo of a {}, a type of texture.")
    ucf = made("a photo of a person doing {}.")
    assert ucf.prompt_template == "a photo of a person doing {}."
    shared = made("a photo of a {}.")  # StanfordCars, SUN397, Caltech101, ImageNet: SUN397's and Caltech101's prompt
    assert (shared.prompt_template, shared.frozen_template) == ("X X X X {}.", "a photo of a {}.")
    cars = made("a photo of a {}.", prompt_template="X X X X {}, a type of car")
    assert cars.prompt_template == "X X X X {}, a type of car"
    other = made("a blurry photo of {}.")
    assert (other.prompt_template, other.frozen_template) == ("X X X X {}.", "a blurry photo of {}.")
    other.set_classnames(["sea"], template="{} texture.")  # a cross-dataset target brings its own sentences
    assert other.frozen_template == "a photo of a {}, a type of texture."


def test_injection_layer_must_be_a_text_block():
    backbone = contract_backbone()
    with pytest.raises(ConfigError, match="injection_layer"):
        create_method("tcp", backbone, ["a", "b"], TCPConfig(injection_layer=len(backbone.text.blocks)))


# -- the reference checkpoint (not shipped: built here as the card describes) ---------------------------------------


def tcp_checkpoint(folder: Path, golden) -> Path:
    """What TCP's trainer saves (Dassl ``save_model`` of the registered ``prompt_learner``): ``ctx``, the class
    buffers, the meta-net, Adam (eps 1e-3) with its moments and the scheduler with its ``CosineAnnealingLR`` object.
    The values are the trajectory golden's initial ones (its final ``linear2.weight`` is stored as rows only)."""
    values = {entry["name"].removeprefix("prompt_learner."): golden.init_value(entry).clone()
              for entry in golden.meta["trainable_params"]}
    n_cls, (n_ctx, width) = len(golden.classnames), values["ctx"].shape
    context = golden.meta["backbone"]["config"]["context_length"]
    state = OrderedDict([("ctx", values["ctx"]), ("token_prefix", torch.randn(n_cls, 1, width)),
                         ("token_suffix", torch.randn(n_cls, context - 1 - n_ctx, width))])
    state.update((k, v) for k, v in values.items() if k != "ctx")
    params = [torch.nn.Parameter(v.clone()) for v in values.values()]
    adam = torch.optim.Adam(params, lr=0.002, eps=1e-3, weight_decay=5e-4)
    for p in params:
        p.grad = torch.ones_like(p)
    adam.step()
    scheduler = {"cons_lr": 1e-5, "successor": torch.optim.lr_scheduler.CosineAnnealingLR(adam, T_max=3),
                 "warmup_epoch": 1, "base_lrs": [0.002], "last_epoch": 2}
    path = folder / "prompt_learner" / "model.pth.tar-3"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "epoch": 3, "optimizer": adam.state_dict(), "scheduler": scheduler,
                "val_result": None}, path)
    return path


def test_import_of_a_reference_checkpoint_reproduces_the_reference_logits(tmp_path, trajectory, one_torch_thread):
    tcp_checkpoint(tmp_path, trajectory)
    method, name_map = build_method(trajectory)
    with torch.no_grad():  # forget the initial values: only the import may bring them back
        for i, (_, p) in enumerate(method.named_trainable()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    checkpoint = read_checkpoint(find_checkpoint(tmp_path, LAYOUTS["tcp"].registered_name))
    report = load_into_method(checkpoint, method, "golden-mini")
    assert set(report.tensors) == set(name_map)
    assert sorted(report.dropped_buffers) == ["prompt_learner.token_prefix", "prompt_learner.token_suffix"]
    assert report.saved_classes == len(trajectory.classnames) and report.inferred == {
        "n_ctx": trajectory.trainer_cfg["N_CTX"]}
    expected = trajectory.tensors["eval.logits_init"]  # the reference's logits with exactly these values
    method.eval()
    with torch.no_grad():
        logits = method({"image": trajectory.tensors["input.eval_images"]})
    assert logits_error(logits, expected) <= 1
    assert logits_error(logits, trajectory.tensors["eval.logits"]) > 1  # the values matter: the test can fail


def test_cli_import_of_a_reference_checkpoint(tmp_path, trajectory):
    tcp_checkpoint(tmp_path / "run", trajectory)
    out = tmp_path / "imported"
    layer = trajectory.meta["cfg"]["tcp_injection_layer"]
    argv = ["import", str(tmp_path / "run"), "--out", str(out), "--backbone", "golden-mini", "--quiet",
            "--method", "tcp", "--classnames", ",".join(trajectory.classnames),
            "--set", f"method_config.injection_layer={layer}",
            "--set", f"method_config.n_ctx={trajectory.trainer_cfg['N_CTX']}"]
    assert main(argv) == 0
    meta, tensors = read_adapter(out / "adapter.safetensors")
    assert meta["method"] == "tcp" and meta["imported_from"]["epoch"] == 3
    for entry in trajectory.meta["trainable_params"]:
        ours = tensors[entry["name"].removeprefix("prompt_learner.")]
        assert torch.equal(ours, trajectory.init_value(entry)), entry["name"]
