"""Reading the reference-parity goldens (tests/golden/README.md): metadata, tensors, initial values, tolerances."""

from __future__ import annotations

import dataclasses
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


def dassl_format(meta: object) -> bool:
    """Whether a golden's JSON is in the Dassl trainer format these generic tests read: its ``provenance`` names
    a ``trainer_class``. Goldens of references outside Dassl (e.g. Tip-Adapter's scripts) have their own format and
    their own tests (tests/test_method_<m>.py)."""
    return isinstance(meta, dict) and "trainer_class" in (meta.get("provenance") or {})


def method_golden_names() -> list[str]:
    """Every one-step golden: ``<method>.json`` in the Dassl format (:func:`dassl_format`) with a
    ``trainable_params`` list.

    ``<method>.<kind>.json`` files (layers, trajectory, dassl) are companions of it, not one-step goldens."""
    names = []
    for path in sorted(GOLDEN_DIR.glob("*.json")):
        if "." in path.stem:
            continue
        meta = json.loads(path.read_text())
        if dassl_format(meta) and "trainable_params" in meta:
            names.append(path.stem)
    return names


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
    config = cls.config_from_reference_cfg(golden.meta["cfg"])  # cfg.trainer, plus what the method reads elsewhere
    # The template the method is given: the one the golden records, else the dataset's (as a protocol run passes it).
    template = golden.meta.get("extra", {}).get("template_used") or CUSTOM_TEMPLATES.get(
        golden.meta["cfg"].get("dataset_name"))
    method = create_method(name, golden_backbone(golden), golden.classnames, config, template=template)
    if getattr(cls, "uses_teacher", False) and "teacher" in golden.meta:
        method.set_teacher(golden_teacher(golden))  # before the initial values: it sizes what maps to it
    name_map = method.reference_name_map()
    ours = dict(method.named_trainable())
    with torch.no_grad():
        for entry in golden.meta["trainable_params"]:
            target = ours[name_map[entry["name"]]]
            value = golden.init_value(entry)
            assert tuple(target.shape) == tuple(value.shape), entry["name"]
            target.copy_(value)
    for key in RECORDED_DRAWS:  # the reference's Python-random draws inside its step(s), replayed in order
        if key in golden.tensors:
            method.set_train_draws(golden.tensors[key].reshape(-1).tolist())
    return method, name_map


#: Tensors recording a reference's ``random.randint`` draws inside the training step (one-step, trajectory).
RECORDED_DRAWS = ("train.description_index", "trajectory.description_index")
#: Golden inputs of a second augmented view of each image (methods with ``train_views = 2``).
VIEW2_KEYS = {"input.images": "input.images_view2", "input.train_images": "input.train_images_view2"}


def golden_teacher(golden: Golden):
    """The frozen, prompted teacher of a golden that has one (``teacher`` with ``design_details_hard_coded`` and
    ``tensors``): our method for the reference design it names, on the teacher backbone, with the stored
    ``teacher.*`` tensors. Its prompt depths are the design's, capped at the teacher's towers (the reference prompts
    every block of towers shorter than its depth); its text context length and init words are the golden's."""
    entry = golden.meta["teacher"]
    design = entry["design_details_hard_coded"]
    backbone = golden_backbone(golden, "teacher")
    name = next(n for n in list_methods() if design["trainer"] in get_method_class(n).reference_trainers)
    cfg = golden.trainer_cfg
    trainer = {"N_CTX_TEXT": cfg.get("N_CTX_TEXT", design["language_ctx"]), "N_CTX_VISION": design["vision_ctx"],
               "CTX_INIT": cfg.get("CTX_INIT", ""),
               "PROMPT_DEPTH_TEXT": min(design["language_depth"], len(backbone.text.blocks)),
               "PROMPT_DEPTH_VISION": min(design["vision_depth"], len(backbone.visual.blocks))}
    teacher = create_method(name, backbone, golden.classnames, get_method_class(name).config_from_reference(trainer))
    name_map, ours = teacher.reference_name_map(), dict(teacher.named_trainable())
    assert {t["name"] for t in entry["tensors"]} == set(name_map), "the teacher's tensors and ours differ"
    with torch.no_grad():
        for tensor in entry["tensors"]:
            ours[name_map[tensor["name"]]].copy_(golden.tensors[tensor["key"]])
    teacher.requires_grad_(False)
    return teacher.eval()


def golden_batch(golden: Golden, train: bool) -> dict[str, torch.Tensor]:
    """The batch a one-step golden's reference saw: its images, and in training its labels. Methods with more inputs
    (a second augmented view, ...) read them from the golden here."""
    batch = {"image": golden.images()}
    if train:
        batch["label"] = golden.labels()
        if VIEW2_KEYS["input.images"] in golden.tensors:
            batch["image_view2"] = golden.tensors[VIEW2_KEYS["input.images"]]
    return batch


def assert_close_values(ours: torch.Tensor, golden: torch.Tensor, what: str) -> None:
    """Logits, features, losses: max|ours - golden| <= 1e-4 * max(1, max|golden|)."""
    ours, golden = ours.detach().float(), golden.float()
    assert ours.shape == golden.shape, f"{what}: shape {tuple(ours.shape)} vs golden {tuple(golden.shape)}"
    bound = 1e-4 * max(1.0, golden.abs().max().item())
    err = (ours - golden).abs().max().item()
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


#: A gradient this many times smaller than the step's largest is float noise (zero in exact arithmetic, e.g. the
#: bias of a layer followed by a train-mode BatchNorm): it is compared at the step's scale, not its own.
NOISE_GRADIENT = 1e-5


def assert_close_grad(ours: torch.Tensor | None, golden: torch.Tensor, what: str, largest: float = 0.0) -> None:
    """Gradients: per tensor, max|ours - golden| <= 1e-4 * max|golden| (stored whole, or its first rows of
    ``reshape(shape[0], -1)``). ``largest``: the step's largest gradient element of any tensor; a tensor whose
    gradient is below ``NOISE_GRADIENT`` times it gets the bar 1e-4 * ``largest``."""
    assert ours is not None, f"{what}: no gradient, the reference has one"
    ours = ours.detach().float()
    if ours.shape != golden.shape:
        ours = ours.reshape(ours.shape[0], -1)[: golden.shape[0]] if golden.dim() == 2 else ours[: golden.shape[0]]
    assert ours.shape == golden.shape, f"{what}: shape {tuple(ours.shape)} vs golden {tuple(golden.shape)}"
    bound = 1e-4 * golden.abs().max().item()
    if golden.abs().max().item() < NOISE_GRADIENT * largest:
        bound = 1e-4 * largest
    err = (ours - golden).abs().max().item()
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


# -- trajectory goldens (tests/golden/TRAJECTORY_README.md) -----------------------------------------------------------


def trajectory_golden_names() -> list[str]:
    """Every ``<method>.trajectory.json`` present in the Dassl format (:func:`dassl_format`), as ``<method>``."""
    return sorted(p.name[: -len(".trajectory.json")] for p in GOLDEN_DIR.glob("*.trajectory.json")
                  if dassl_format(json.loads(p.read_text())))


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
    #: Adam-family runs only (else empty): reference name -> per-element movement floor after each epoch / at the end
    #: (:func:`adam_undetermined`), as the whole tensor.
    epoch_floors: list[dict[str, torch.Tensor]] = dataclasses.field(default_factory=list)
    final_floors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: The method's trainable buffers (e.g. BatchNorm statistics) after every optimizer step.
    step_buffers: list[dict[str, torch.Tensor]] = dataclasses.field(default_factory=list)

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
                                     precision="fp32", seed=trajectory["order_seed"], **eps,
                                     method_options=type(method).reference_optim_options)
    logits_init = _eval_logits(method, golden.tensors["input.eval_images"])
    steps: list[dict] = []
    epoch_params: list[dict[str, torch.Tensor]] = []
    adam = config.optimizer in ("adam", "adamw")
    floors = {ref: torch.zeros_like(params[ours]) for ref, ours in name_map.items()} if adam else {}
    epoch_floors: list[dict[str, torch.Tensor]] = []

    step_buffers: list[dict[str, torch.Tensor]] = []

    def on_step(record: dict) -> None:
        steps.append(record)
        for ref, floor in floors.items():  # the step's gradients are still in .grad here
            floor += adam_undetermined(params[name_map[ref]].grad, record["lr"])
        step_buffers.append({n: b.detach().clone() for n, b in method.trainable_buffers()})
        if record["batch"] == record["batches"]:  # after the epoch's last optimizer step, before its epoch-end code
            epoch_params.append({ref: params[ours].detach().clone() for ref, ours in name_map.items()})
            if adam:
                epoch_floors.append({ref: floor.clone() for ref, floor in floors.items()})

    view2 = VIEW2_KEYS["input.train_images"]
    extras = {"image_view2": golden.tensors[view2]} if view2 in golden.tensors else None
    data = TensorDataset(golden.tensors["input.train_images"], golden.tensors["input.train_labels"], extras=extras)
    fit(method, data, config, progress=False, on_step=on_step, batch_order=trajectory["orders"])
    final = {ref: params[ours].detach().clone() for ref, ours in name_map.items()}
    logits = _eval_logits(method, golden.tensors["input.eval_images"])
    return Replay(golden, method, name_map, steps, epoch_params, final, init, logits_init, logits, epoch_floors, floors,
                  step_buffers)


#: A gradient element within this fraction of its tensor's max|grad| is zero to within the one-step gradient bar
#: (``assert_close_grad``): the parity tests do not determine its sign.
UNDETERMINED_GRADIENT = 1e-4


def adam_undetermined(grad: torch.Tensor | None, lr: float) -> torch.Tensor:
    """The movement an Adam(W) step of ``lr`` may take in either direction, per element, where the gradient is zero
    to within the one-step bar: ``2 * lr`` there, 0 elsewhere. Adam's step ``lr * m / (sqrt(v) + eps)`` is
    normalised: for an element whose gradient is at float32 noise level (its sign set by summation order, its size
    comparable to ``eps``) any step in ``[-lr, lr]`` is as exact as the reference's (docs/parity.md)."""
    if grad is None:
        return torch.zeros(())
    band = UNDETERMINED_GRADIENT * grad.detach().abs().max()
    return (grad.detach().abs() <= band).to(grad.dtype) * (2 * lr)


def stored_part(value: torch.Tensor, entry: dict) -> torch.Tensor:
    """What a golden stores of a parameter: the whole tensor, or its first 4 rows of ``reshape(shape[0], -1)``."""
    return value if entry["stored"] else value.reshape(entry["shape"][0], -1)[:4]


def trajectory_param_errors(ours: torch.Tensor, golden: torch.Tensor, init: torch.Tensor, steps: int,
                            floor: torch.Tensor | None = None) -> tuple[float, float, float]:
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
    if floor is not None:  # Adam(W): steps the parity tests leave undetermined (adam_undetermined), per element
        move_bar = torch.maximum(move_bar, floor.double())

    def ratio(bar: float) -> float:
        return err / bar if bar > 0 else (0.0 if err == 0 else float("inf"))

    move_ratio = torch.where(diff == 0, torch.zeros_like(diff), diff / move_bar).max().item()
    return err, ratio(value_bar), move_ratio


def epoch_floors(replay: Replay, epoch: int) -> dict[str, torch.Tensor]:
    """The Adam movement floors after ``epoch`` (empty for other optimizers)."""
    return replay.epoch_floors[epoch] if replay.epoch_floors else {}


def step_lrs(record: dict) -> list[float]:
    """Every parameter group's learning rate in a step record of ``fit`` (``lrs`` when there are several groups)."""
    return list(record.get("lrs", [record["lr"]]))


def moves_by_noise(entry: dict, entries: list[dict]) -> bool:
    """Whether a parameter of a trajectory snapshot moved by float noise only: less than ``NOISE_GRADIENT`` times the
    snapshot's largest movement (e.g. a bias before a train-mode BatchNorm, whose gradient is zero in exact
    arithmetic). Its movement means nothing, so only the value bar applies to it."""
    largest = max((e.get("delta_max_abs", 0.0) for e in entries), default=0.0)
    return "delta_max_abs" in entry and entry["delta_max_abs"] < NOISE_GRADIENT * largest


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
        if "lrs" in ref and len(step_lrs(ours)) != len(ref["lrs"]):  # another number of parameter groups
            errors["lr"] = float("inf")
        elif "lrs" in ref:
            for mine, theirs in zip(step_lrs(ours), ref["lrs"], strict=True):
                errors["lr"] = max(errors["lr"], abs(mine - theirs) / (1e-9 * theirs))
        terms = replay.method.reference_loss_terms(ours) | {"acc": ours["acc"], "loss": ours["loss"]}
        for key, value in ({"loss": ref["loss"]} | ref.get("terms", {})).items():
            errors["loss"] = max(errors["loss"], scalar_error(terms[key], value))

    def params_error(entries, ours_by_name, steps: int, floors: dict[str, torch.Tensor]) -> float:
        worst = 0.0
        for entry in entries:
            init = stored_part(replay.init_params[entry["name"]], entry)
            floor = floors.get(entry["name"])
            _, value_ratio, move_ratio = trajectory_param_errors(
                stored_part(ours_by_name[entry["name"]], entry), replay.golden.tensors[entry["key"]], init, steps,
                None if floor is None else stored_part(floor, entry))
            worst = max(worst, value_ratio, 0.0 if moves_by_noise(entry, entries) else move_ratio)
        return worst

    errors["epoch_params"] = max(params_error(entries, ours, steps_until(replay, e), epoch_floors(replay, e))
                                 for e, (ours, entries) in enumerate(zip(replay.epoch_params,
                                                                         replay.trajectory["epoch_end_params"],
                                                                         strict=True)))
    errors["final_params"] = params_error(replay.trajectory["final_params"], replay.final_params, steps_until(replay),
                                          replay.final_floors)
    errors["logits_init"] = logits_error(replay.logits_init, replay.golden.tensors["eval.logits_init"])
    errors["logits"] = logits_error(replay.logits, replay.golden.tensors["eval.logits"])
    errors["frozen"] = max([(replay.final_params[n].double() - replay.init_params[n].double()).abs().max().item()
                            for n in replay.golden.meta["params_without_grad"]] or [0.0])
    return errors
