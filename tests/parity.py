"""Reading the reference-parity goldens (tests/golden/README.md): metadata, tensors, initial values, tolerances."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from promptclip.clip.architectures import ARCHITECTURES, build_random, recipe_state_dict, state_dict_sha256
from promptclip.clip.model import CLIP, CLIPConfig
from promptclip.data.templates import CUSTOM_TEMPLATES
from promptclip.methods import create_method, get_method_class, list_methods

GOLDEN_DIR = Path(__file__).parent / "golden"


def method_golden_names() -> list[str]:
    """Every one-step golden of a Dassl reference trainer: ``<method>.json`` with a ``provenance`` naming its
    ``trainer_class`` and a ``trainable_params`` list. Goldens of references with their own loop and format (no
    trainer class, e.g. CLIP-LoRA) have their own tests.

    ``<method>.<kind>.json`` files (layers, trajectory, dassl) are companions of it, not one-step goldens."""
    names = []
    for path in sorted(GOLDEN_DIR.glob("*.json")):
        if "." in path.stem:
            continue
        meta = json.loads(path.read_text())
        if isinstance(meta, dict) and "trainable_params" in meta and _dassl_trainer(meta):
            names.append(path.stem)
    return names


def _dassl_trainer(meta: dict) -> bool:
    """Whether a golden's JSON comes from a Dassl reference trainer (the generic one-step and trajectory formats)."""
    return isinstance(meta.get("provenance"), dict) and "trainer_class" in meta["provenance"]


@dataclass
class Golden:
    name: str
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def trainer_class(self) -> str:
        return self.meta["provenance"]["trainer_class"]

    @property
    def trainer_cfg(self) -> dict:
        return self.meta["cfg"]["trainer"]

    @property
    def classnames(self) -> list[str]:
        return self.meta["inputs"]["classnames"]

    def images(self) -> torch.Tensor:
        if "input.images" in self.tensors:
            return self.tensors["input.images"]
        seed = self.meta["inputs"]["image_seed"]
        size = self.meta["backbone"]["config"]["image_size"]
        return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def labels(self) -> torch.Tensor:
        if "input.labels" in self.tensors:
            return self.tensors["input.labels"]
        return torch.tensor(self.meta["inputs"]["labels"])

    def init_value(self, entry: dict) -> torch.Tensor:
        """The initial value of a reference parameter: stored, or regenerated with the README's recipe."""
        key = f"init.{entry['name']}"
        if key in self.tensors:
            return self.tensors[key]
        match = re.search(r"seed=(\d+)", entry["init"])
        if match is None:
            raise AssertionError(f"{self.name}: {entry['name']} is neither stored nor made by the recipe")
        value = recipe_value(entry["name"], tuple(entry["shape"]), int(match.group(1)))
        assert value.double().sum().item() == _approx(entry["sum"]), f"{entry['name']}: regenerated sum differs"
        assert value.double().abs().sum().item() == _approx(entry["abs_sum"]), f"{entry['name']}: abs_sum differs"
        return value


def _approx(value: float):
    import pytest

    return pytest.approx(value, rel=1e-6, abs=1e-6)


def recipe_value(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The golden README's init rule for overwritten trainable parameters."""
    r = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    if name.endswith("bias"):
        return 0.02 * r
    if name.endswith("weight") and len(shape) == 1:
        return 1 + 0.1 * r
    if name.endswith("weight") and len(shape) == 2:
        return r * shape[1] ** -0.5
    return 0.02 * r


@functools.cache
def load_golden(name: str) -> Golden:
    meta = json.loads((GOLDEN_DIR / f"{name}.json").read_text())
    return Golden(name, meta, load_file(GOLDEN_DIR / f"{name}.safetensors"))


@functools.lru_cache(maxsize=1)
def golden_mini_state() -> dict[str, torch.Tensor]:
    return build_random("golden-mini").state_dict()


def golden_config(config: dict) -> CLIPConfig:
    """The CLIPConfig of a golden's ``backbone.config`` (golden-mini or one of its documented variants: the README's
    recipe with other sizes), read from the file so that any variant works."""
    return CLIPConfig(embed_dim=config["embed_dim"], image_size=config["image_size"],
                      vision_layers=config["vision_layers"], vision_width=config["vision_width"],
                      vision_patch_size=config["patch_size"], vision_heads=config["vision_heads"],
                      context_length=config["context_length"], vocab_size=config["vocab_size"],
                      text_width=config["text_width"], text_heads=config["text_heads"],
                      text_layers=config["text_layers"])


@functools.lru_cache(maxsize=2)
def _variant_state(config: CLIPConfig, sha256: str | None) -> dict[str, torch.Tensor]:
    state = recipe_state_dict(config)
    if sha256 is not None:
        assert state_dict_sha256(state) == sha256, "the regenerated backbone differs from the golden's"
    return state


def golden_backbone(golden: Golden, which: str = "backbone"):
    """The frozen CLIP of a golden (``which``: ``backbone``, or ``teacher`` where a golden has a second model),
    rebuilt with the recipe from the entry's ``config`` and checked against its ``weights_sha256``."""
    entry = golden.meta[which]  # {"name" or "backbone": variant name, "config": {...}, "weights_sha256": ...}
    config, sha = golden_config(entry["config"]), entry.get("weights_sha256")
    if config == ARCHITECTURES["golden-mini"]:
        state = golden_mini_state()
    else:
        state = _variant_state(config, sha)
    model = CLIP(config)
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model


def method_for(golden: Golden) -> str:
    for name in list_methods():
        if golden.trainer_class in get_method_class(name).reference_trainers:
            return name
    raise LookupError(f"no method reproduces the reference trainer {golden.trainer_class!r}")


def build_method(golden: Golden):
    """Our method for a golden: config from the reference's trainer options, the reference's initial values."""
    name = method_for(golden)
    cls = get_method_class(name)
    # The trainer options, and the entries of the golden's cfg outside them that the method reads (reference_cfg_keys).
    options = dict(golden.trainer_cfg)
    options.update({key: golden.meta["cfg"][key] for key in cls.reference_cfg_keys if key in golden.meta["cfg"]})
    config = cls.config_from_reference(options)
    # The template the method is given: the one the golden records, else the dataset's (as a protocol run passes it).
    template = golden.meta.get("extra", {}).get("template_used") or CUSTOM_TEMPLATES.get(
        golden.meta["cfg"].get("dataset_name"))
    method = create_method(name, golden_backbone(golden), golden.classnames, config, template=template)
    name_map = method.reference_name_map()
    ours = dict(method.named_trainable())
    with torch.no_grad():
        for entry in golden.meta["trainable_params"]:
            target = ours[name_map[entry["name"]]]
            value = golden.init_value(entry)
            assert tuple(target.shape) == tuple(value.shape), entry["name"]
            target.copy_(value)
    return method, name_map


def golden_batch(golden: Golden, train: bool) -> dict[str, torch.Tensor]:
    """The batch a one-step golden's reference saw: its images, and in training its labels. Methods with more inputs
    (a second augmented view, ...) read them from the golden here."""
    batch = {"image": golden.images()}
    if train:
        batch["label"] = golden.labels()
    return batch


def assert_close_values(ours: torch.Tensor, golden: torch.Tensor, what: str) -> None:
    """Logits, features, losses: max|ours - golden| <= 1e-4 * max(1, max|golden|)."""
    ours, golden = ours.detach().float(), golden.float()
    assert ours.shape == golden.shape, f"{what}: shape {tuple(ours.shape)} vs golden {tuple(golden.shape)}"
    bound = 1e-4 * max(1.0, golden.abs().max().item())
    err = (ours - golden).abs().max().item()
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def assert_close_grad(ours: torch.Tensor | None, golden: torch.Tensor, what: str) -> None:
    """Gradients: per tensor, max|ours - golden| <= 1e-4 * max|golden|."""
    assert ours is not None, f"{what}: no gradient, the reference has one"
    ours = ours.detach().float()[: golden.shape[0]] if ours.shape != golden.shape else ours.detach().float()
    assert ours.shape == golden.shape, f"{what}: shape {tuple(ours.shape)} vs golden {tuple(golden.shape)}"
    bound = 1e-4 * golden.abs().max().item()
    err = (ours - golden).abs().max().item()
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


# -- trajectory goldens (tests/golden/TRAJECTORY_README.md) -----------------------------------------------------------


def trajectory_golden_names() -> list[str]:
    """Every ``<method>.trajectory.json`` of a Dassl reference trainer present, as ``<method>``."""
    return sorted(p.name[: -len(".trajectory.json")] for p in GOLDEN_DIR.glob("*.trajectory.json")
                  if _dassl_trainer(json.loads(p.read_text())))


@dataclass
class Replay:
    """Our engine's run of a trajectory golden: the same model, config, data and batch order."""

    golden: Golden
    method: object
    name_map: dict[str, str]
    steps: list[dict]  # fit's on_step records
    epoch_params: list[dict[str, torch.Tensor]]  # reference name -> value after the last step of each epoch
    final_params: dict[str, torch.Tensor]  # reference name -> value at the end of training
    init_params: dict[str, torch.Tensor]  # reference name -> initial value (stored or regenerated)
    logits_init: torch.Tensor
    logits: torch.Tensor

    @property
    def trajectory(self) -> dict:
        return self.golden.meta["trajectory"]


def _eval_logits(method, images: torch.Tensor) -> torch.Tensor:
    method.eval()
    with torch.no_grad():
        return method({"image": images}).detach().clone()


@functools.cache
def replay_trajectory(name: str) -> Replay:
    """:func:`run_replay`, once per golden and process."""
    return run_replay(name)


def run_replay(name: str) -> Replay:
    """Build the method from the golden's JSON, then drive promptclip's own ``fit`` over the golden's batch order.

    Everything comes from the files: config (``cfg.trainer``, ``cfg.optim``), class names, inputs, initial values,
    orders. The golden's per-step LRs are never fed into training."""
    from promptclip.data.loader import TensorDataset
    from promptclip.train import fit, train_config_from_dassl

    golden = load_golden(f"{name}.trajectory")
    method, name_map = build_method(golden)
    params = dict(method.named_trainable())
    init = {ref: params[ours].detach().clone() for ref, ours in name_map.items()}
    trajectory, cfg = golden.meta["trajectory"], golden.meta["cfg"]
    # An Adam eps other than torch's default (a reference that edits Dassl's build_optimizer) is recorded in cfg.
    eps = {"adam_eps": float(cfg["adam_eps"])} if "adam_eps" in cfg else {}
    config = train_config_from_dassl(cfg["optim"], trajectory["batch_size"], max_epoch=trajectory["epochs"],
                                     precision="fp32", seed=trajectory["order_seed"], **eps)
    logits_init = _eval_logits(method, golden.tensors["input.eval_images"])
    steps: list[dict] = []
    epoch_params: list[dict[str, torch.Tensor]] = []

    def on_step(record: dict) -> None:
        steps.append(record)
        if record["batch"] == record["batches"]:  # after the epoch's last optimizer step, before its epoch-end code
            epoch_params.append({ref: params[ours].detach().clone() for ref, ours in name_map.items()})

    data = TensorDataset(golden.tensors["input.train_images"], golden.tensors["input.train_labels"])
    fit(method, data, config, progress=False, on_step=on_step, batch_order=trajectory["orders"])
    final = {ref: params[ours].detach().clone() for ref, ours in name_map.items()}
    logits = _eval_logits(method, golden.tensors["input.eval_images"])
    return Replay(golden, method, name_map, steps, epoch_params, final, init, logits_init, logits)


def stored_part(value: torch.Tensor, entry: dict) -> torch.Tensor:
    """What a golden stores of a parameter: the whole tensor, or its first 4 rows of ``reshape(shape[0], -1)``."""
    return value if entry["stored"] else value.reshape(entry["shape"][0], -1)[:4]


def trajectory_param_errors(ours: torch.Tensor, golden: torch.Tensor, init: torch.Tensor, steps: int
                            ) -> tuple[float, float, float]:
    """(max abs error, its ratio to the value bar 1e-4 * max|golden|, the largest ratio of an element's error to its
    movement bar) — both ratios must be <= 1 (TRAJECTORY_README.md). The movement bar is 2e-3 * max|golden - init|,
    but never less than ``steps`` float32 ulps of the element's golden value: ``steps`` optimizer steps (each rounds
    every element to float32 once) may each flip a rounding when the update differs in its last bits, and in a
    warm-up epoch (LR 1e-5) 2e-3 of the movement can be less than one ulp of the value (docs/parity.md). With
    ``steps`` 0 and no movement the parameter must be bit-identical."""
    ours, golden, init = ours.detach().double(), golden.double(), init.double()
    diff = (ours - golden).abs()
    err = diff.max().item()
    value_bar = 1e-4 * golden.abs().max().item()
    magnitude = golden.float().abs()
    ulp = (torch.nextafter(magnitude, torch.tensor(float("inf"))) - magnitude).double()
    move_bar = torch.clamp(steps * ulp, min=2e-3 * (golden - init).abs().max().item())

    def ratio(bar: float) -> float:
        return err / bar if bar > 0 else (0.0 if err == 0 else float("inf"))

    move_ratio = torch.where(diff == 0, torch.zeros_like(diff), diff / move_bar).max().item()
    return err, ratio(value_bar), move_ratio


def steps_until(replay: Replay, epoch: int | None = None) -> int:
    """Optimizer steps of the golden run up to the end of ``epoch`` (None: the whole run)."""
    steps = replay.trajectory["steps"]
    return len(steps) if epoch is None else sum(1 for step in steps if step["epoch"] <= epoch)


def logits_error(ours: torch.Tensor, golden: torch.Tensor) -> float:
    """max|ours - golden| / (3e-4 * max(1, max|golden|)): <= 1 passes (the trajectory bar for eval logits)."""
    return (ours.double() - golden.double()).abs().max().item() / (3e-4 * max(1.0, golden.abs().max().item()))


def scalar_error(ours: float, golden: float) -> float:
    """|ours - golden| / (2e-4 * max(1, |golden|)): <= 1 passes (the trajectory bar for losses and loss terms)."""
    return abs(ours - golden) / (2e-4 * max(1.0, abs(golden)))


def trajectory_errors(replay: Replay) -> dict[str, float]:
    """The worst error of each quantity as a multiple of its bar (<= 1 passes): ``lr``, ``loss`` (loss and terms),
    ``epoch_params``, ``final_params`` (the larger of the value and movement ratios), ``logits_init``, ``logits``, and
    ``frozen`` (the largest change of a gradient-free parameter, which must be 0)."""
    golden_steps = replay.trajectory["steps"]
    errors = {"lr": 0.0, "loss": 0.0}
    for ours, ref in zip(replay.steps, golden_steps, strict=True):
        errors["lr"] = max(errors["lr"], abs(ours["lr"] - ref["lr"]) / (1e-9 * ref["lr"]))
        terms = replay.method.reference_loss_terms(ours) | {"acc": ours["acc"], "loss": ours["loss"]}
        for key, value in ({"loss": ref["loss"]} | ref.get("terms", {})).items():
            errors["loss"] = max(errors["loss"], scalar_error(terms[key], value))

    def params_error(entries, ours_by_name, steps: int) -> float:
        worst = 0.0
        for entry in entries:
            init = stored_part(replay.init_params[entry["name"]], entry)
            _, value_ratio, move_ratio = trajectory_param_errors(stored_part(ours_by_name[entry["name"]], entry),
                                                                 replay.golden.tensors[entry["key"]], init, steps)
            worst = max(worst, value_ratio, move_ratio)
        return worst

    errors["epoch_params"] = max(params_error(entries, ours, steps_until(replay, e)) for e, (ours, entries) in
                                 enumerate(zip(replay.epoch_params, replay.trajectory["epoch_end_params"],
                                               strict=True)))
    errors["final_params"] = params_error(replay.trajectory["final_params"], replay.final_params, steps_until(replay))
    errors["logits_init"] = logits_error(replay.logits_init, replay.golden.tensors["eval.logits_init"])
    errors["logits"] = logits_error(replay.logits, replay.golden.tensors["eval.logits"])
    errors["frozen"] = max([(replay.final_params[n].double() - replay.init_params[n].double()).abs().max().item()
                            for n in replay.golden.meta["params_without_grad"]] or [0.0])
    return errors
