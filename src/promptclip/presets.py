"""YAML presets with the papers' hyper-parameters, the default preset of each protocol × method, and strict
``key=value`` overrides.

A preset (``src/promptclip/presets/<method>/<name>.yaml``, shipped inside the package so that a ``pip install``
has them) holds ``method``, ``backbone``, ``method_config`` (the method's config dataclass fields), ``train``
(:class:`promptclip.train.TrainConfig` fields; absent for zero-shot), optional ``eval`` (``batch_size``) and
``source`` (where the numbers come from).

Methods from plugins ship their presets on the class (``PromptMethod.presets``: name -> preset keys or a YAML path),
named ``<method>/<name>`` like the built-in ones; any preset can also be given as the path of a YAML file. A method
class without presets of its own inherits those of the nearest registered method it subclasses (a CoOp variant runs
with ``<variant>/vit_b16_ep50``, CoOp's preset under its own name), and a method with none at all trains with the
engine's defaults (:class:`promptclip.train.TrainConfig`, the preset ``<method>/engine_defaults``), with one warning
that names them.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import from_dict, suggest, to_dict
from .errors import ConfigError
from .train import TrainConfig

PRESETS_DIR = Path(__file__).parent / "presets"
PRESET_KEYS = ("method", "backbone", "method_config", "train", "eval", "source")
#: The preset of a method with no presets, own or inherited: the engine's TrainConfig and the config's defaults.
ENGINE_DEFAULTS = "engine_defaults"


@dataclass
class EvalConfig:
    #: Dassl's test batch (100); CMPA's reference mode is defined with 16.
    batch_size: int = 100

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size!r}")


@dataclass
class Preset:
    name: str
    method: str
    backbone: str = "ViT-B/16"
    method_config: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "method": self.method, "backbone": self.backbone,
            "method_config": dict(self.method_config),
            "train": to_dict(self.train) if self.train is not None else None,
            "eval": to_dict(self.eval), "source": self.source,
        }


def list_presets() -> list[str]:
    """The built-in presets, those shipped by plugin methods (loaded plugins and installed packages) and those
    plugin methods inherit from the method they subclass (:func:`inherited_presets`)."""
    from .methods import list_methods

    names = {f"{p.parent.name}/{p.stem}" for p in PRESETS_DIR.glob("*/*.yaml")}
    for method in list_methods():
        names.update(_own_presets(method))
    return sorted({*names, *inherited_presets()})


def _own_presets(method: str) -> list[str]:
    from .methods import get_method_class

    return [*(f"{method}/{p.stem}" for p in (PRESETS_DIR / method).glob("*.yaml")),
            *(f"{method}/{name}" for name in get_method_class(method).presets)]


def presets_parent(method: str) -> str | None:
    """The registered method whose presets ``method`` inherits: the nearest registered method class it subclasses,
    when it has no presets of its own (no YAML folder, no ``presets`` on its class); else None."""
    from .methods import get_method_class, list_methods

    cls = get_method_class(method)
    if (PRESETS_DIR / method).is_dir() or vars(cls).get("presets"):
        return None
    registered = {get_method_class(name): name for name in list_methods()}
    return next((registered[base] for base in cls.__mro__[1:] if base in registered), None)


def inherited_presets() -> dict[str, str]:
    """Preset name -> the preset it is a copy of, for every method that inherits its parent's presets
    (``mycoop/vit_b16_ep50`` -> ``coop/vit_b16_ep50``)."""
    from .methods import list_methods

    found: dict[str, str] = {}
    for method in list_methods():
        parent = presets_parent(method)
        if parent is None:
            continue
        for name in _own_presets(parent) + inherited_presets_of(parent):
            found.setdefault(f"{method}/{name.partition('/')[2]}", name)
    return found


def inherited_presets_of(method: str) -> list[str]:
    """The presets ``method`` inherits (through every level of subclassing)."""
    parent = presets_parent(method)
    if parent is None:
        return []
    return [f"{method}/{name.partition('/')[2]}" for name in _own_presets(parent) + inherited_presets_of(parent)]


def load_preset(name_or_path: str | Path) -> Preset:
    """A preset by name (``maple/vit_b16_c2_ep5_batch4_2ctx``, ``<plugin method>/<name>``) or by the path of a YAML
    file."""
    path = Path(name_or_path)
    if path.is_file() and path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"preset {path} is not a .yaml file: pass a preset name (`promptclip list presets`) or the "
                          "path of a YAML preset")
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"preset file {path} does not exist")
        return _preset_file(str(path), path)
    builtin = PRESETS_DIR / f"{name_or_path}.yaml"
    if builtin.exists():
        return _preset_file(str(name_or_path), builtin)
    shipped = _shipped_preset(str(name_or_path))
    if shipped is not None:
        return shipped
    names = list_presets()
    raise ConfigError(f"unknown preset {str(name_or_path)!r}{suggest(str(name_or_path), names)}; "
                      f"see `promptclip list presets` ({len(names)} presets)")


def _preset_file(name: str, path: Path, method: str | None = None) -> Preset:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"preset {path} is not valid YAML: {' '.join(str(err).split())}") from None
    except OSError as err:
        raise ConfigError(f"preset {name}: cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} must be a YAML mapping with the keys {', '.join(PRESET_KEYS)}; it holds a "
                          f"{type(data).__name__}")
    if method is not None:
        data.setdefault("method", method)
    try:
        return preset_from_dict(name, data, source_file=str(path))
    except ConfigError as err:
        if str(path) in str(err):
            raise
        raise ConfigError(f"preset {path}: {err}") from None


def _shipped_preset(name: str) -> Preset | None:
    """Preset ``<method>/<name>`` from the method class's ``presets`` (None: the method ships no such preset)."""
    import sys

    from .methods import get_method_class

    method, _, key = name.partition("/")
    if not key:
        return None
    try:
        cls = get_method_class(method)
    except ConfigError:
        return None
    entry = cls.presets.get(key)
    if entry is None:
        parent = presets_parent(method)
        if parent is not None:
            return _inherited_preset(name, method, f"{parent}/{key}")
        if key == ENGINE_DEFAULTS and not _own_presets(method):
            return preset_from_dict(name, {"method": method, "train": {}, "source": _ENGINE_SOURCE})
        return None
    if isinstance(entry, (str, Path)):
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = Path(getattr(sys.modules[cls.__module__], "__file__", ".")).parent / path
        return _preset_file(name, path, method)
    data = {"method": method, **dict(entry)}
    return preset_from_dict(name, data, source_file=f"{name} (presets of {cls.__module__}.{cls.__qualname__})")


_ENGINE_SOURCE = ("promptclip's engine defaults (TrainConfig) and the method config's defaults: the method has no "
                  "presets")


def _inherited_preset(name: str, method: str, parent_name: str) -> Preset | None:
    """The parent's preset ``parent_name`` for ``method``, checked against ``method``'s config."""
    try:
        parent = load_preset(parent_name)
    except ConfigError:
        return None
    data = {**parent.to_dict(), "method": method, "source": f"inherited from {parent_name}"
            + (f" ({parent.source})" if parent.source else "")}
    data.pop("name")
    if data["train"] is None:
        data.pop("train")
    return preset_from_dict(name, data, source_file=f"{name} (inherited from {parent_name})")


def preset_from_dict(name: str, data: dict[str, Any], source_file: str = "") -> Preset:
    where = source_file or name
    unknown = [k for k in data if k not in PRESET_KEYS]
    if unknown:
        raise ConfigError(f"preset {where}: unknown key {unknown[0]!r}{suggest(unknown[0], PRESET_KEYS)}; "
                          f"valid keys: {', '.join(PRESET_KEYS)}")
    if "method" not in data:
        raise ConfigError(f"preset {where}: no 'method' key")
    preset = Preset(
        name=name,
        method=data["method"],
        backbone=data.get("backbone", "ViT-B/16"),
        method_config=dict(data.get("method_config") or {}),
        train=from_dict(TrainConfig, data["train"], "train") if data.get("train") is not None else None,
        eval=from_dict(EvalConfig, data.get("eval") or {}, "eval"),
        source=data.get("source", ""),
    )
    validate_method_config(preset)
    return preset


def validate_method_config(preset: Preset) -> None:
    from .methods import get_method_class

    cls = get_method_class(preset.method)
    from_dict(cls.config_class, preset.method_config, where="method_config")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.max_epoch=2)")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(preset: Preset, overrides: list[str]) -> Preset:
    """``train.max_epoch=2``, ``method_config.depth=3``, ``eval.batch_size=16``, ``backbone=ViT-B/32``: each key is
    checked against the config it belongs to, so a misspelt key is an error that suggests the right one."""
    data = preset.to_dict()
    data.pop("name")
    if data["train"] is None:
        data.pop("train")
    for text in overrides:
        path, value = parse_override(text)
        top = path[0]
        if top not in PRESET_KEYS or top == "source":
            valid = [k for k in PRESET_KEYS if k != "source"]
            raise ConfigError(f"cannot override {'.'.join(path)!r}: unknown section {top!r}{suggest(top, valid)}; "
                              f"use one of {', '.join(valid)}")
        if len(path) == 1:
            if isinstance(data.get(top), dict):
                raise ConfigError(f"override {text!r}: {top} is a section, name one of its keys ({top}.KEY=VALUE)")
            data[top] = value
            continue
        if len(path) != 2:
            raise ConfigError(f"override {text!r}: keys are at most two levels deep (section.key=value)")
        if top == "train" and "train" not in data:
            raise ConfigError(f"override {text!r}: method {preset.method!r} has no training")
        section = dict(data.get(top) or {})
        section[path[1]] = value
        data[top] = section
    try:
        return preset_from_dict(preset.name + (" + overrides" if overrides else ""), data)
    except ConfigError as err:
        named = [text for text in overrides if text.split("=", 1)[0].strip() in str(err)]
        if named:
            raise ConfigError(f"override {named[-1]!r}: {err}") from None
        raise


def with_train_changes(preset: Preset, **changes: Any) -> Preset:
    if preset.train is None:
        return preset
    return dataclasses.replace(preset, train=dataclasses.replace(preset.train, **changes))


#: Datasets whose PromptSRC few-shot runs use GPA mu=30 sigma=30 (SPEC 2.4); the others use mu=45 sigma=5.
_PROMPTSRC_GPA30 = {"imagenet", "caltech101", "oxford_pets", "food101", "ucf101", "sun397"}

_BASE_PRESETS = {
    "zeroshot": "zeroshot/single_template",
    "coop": "coop/vit_b16_ctxv1",
    "cocoop": "cocoop/vit_b16_c4_ep10_batch1_ctxv1",
    "kgcoop": "kgcoop/vit_b16_ep100_ctxv1",
    "maple": "maple/vit_b16_c2_ep5_batch4_2ctx",
    "ivlp": "ivlp/vit_b16_c2_ep5_batch4_2+2ctx",
    "vpt": "vpt/vit_b16_c2_ep5_batch4_4",
    "promptsrc": "promptsrc/vit_b16_c2_ep20_batch4_4+4ctx",
    "dcp": "dcp/vit_b16_c2_ep20_batch4_16ctx",
    "mugcp": "mugcp/inferred_vit_b16_ep5_batch4_4ctx",  # INFERRED design and recipe (docs/mugcp.md)
    # The official base-to-novel recipe (rn50_ep100) on ViT-B/16, as SkipTuning's config; few-shot below.
    "prograd": "prograd/vit_b16_ep100_ctx",
    "mma": "mma/vit_b16_ep5",
    "rpo": "rpo/main_K24",
    "promptkd": "promptkd/vit_b16_c2_ep20_batch8_4+4ctx",
}
#: Datasets whose ProGrad few-shot runs of 8 and 16 shots use LOSS.LAMBDA 0.8 (its README).
_PROGRAD_LAMBDA08 = {"oxford_flowers", "dtd", "eurosat"}


#: Methods whose reference applies per-dataset values over its trainer yaml (MMRL's ``trainers/config.py``): their
#: presets ``<method>/<stem>_<dataset>`` carry them, chosen by dataset (the generic ``<method>/<stem>`` otherwise);
#: ImageNet and the transfer protocols have presets of their own.
_PER_DATASET_PRESETS = {"mmrl": {"base2novel": "vit_b16", "fewshot": "vit_b16_few_shot"},
                        "mmrlpp": {"base2novel": "vit_b16", "fewshot": "vit_b16_few_shot"}}


def _per_dataset_preset(protocol: str, method: str, dataset: str) -> str:
    stems = _PER_DATASET_PRESETS[method]
    if protocol in ("cross_dataset", "domain_generalization"):
        return f"{method}/vit_b16_cross_datasets"
    if dataset == "imagenet":
        return f"{method}/vit_b16_imagenet"
    stem = stems.get(protocol, stems["base2novel"])
    specific = f"{method}/{stem}_{dataset}"
    return specific if dataset and (PRESETS_DIR / f"{specific}.yaml").exists() else f"{method}/{stem}"


def _all_dataset_names() -> list[str]:
    from .data import list_datasets

    return list_datasets()


def _preset_dataset_names(dataset: str) -> list[str]:
    """``dataset`` and the benchmark it samples (``eurosat-sample`` -> ``eurosat``: the same reference dataset)."""
    if not dataset:
        return []
    from .data.specs import get_spec

    try:
        coop_name = get_spec(dataset).coop_name
    except Exception:  # noqa: BLE001 - a folder:/csv: dataset or an unknown name has no benchmark of its own
        return [dataset]
    return [dataset, *(n for n in _all_dataset_names() if n != dataset and get_spec(n).coop_name == coop_name)]

#: Datasets whose PromptKD base-to-novel runs use KD weight 200 (scripts/promptkd/base2new_train.sh); the others 1000.
_PROMPTKD_KD200 = {"fgvc_aircraft", "oxford_flowers", "dtd"}


def default_preset(protocol: str, method: str, dataset: str = "", shots: int = 16) -> str:
    """The official preset of ``method`` for a protocol (SPEC 2.4); ``dataset`` and ``shots`` pick per-dataset and
    per-shot variants (CoOp's epochs by shots, ImageNet's 50-epoch CoOp, PromptSRC's few-shot GPA)."""
    from .methods import get_method_class

    get_method_class(method)
    imagenet = dataset == "imagenet"
    if method == "coop" and protocol == "fewshot":
        if imagenet or shots <= 1:
            return "coop/vit_b16_ep50"
        return "coop/vit_b16_ep100" if shots <= 4 else "coop/vit_b16"
    if method == "coop" and imagenet:
        return "coop/vit_b16_ep50_ctxv1"
    if method == "promptsrc" and protocol == "fewshot":
        gpa = "gpa30_30" if dataset in _PROMPTSRC_GPA30 else "gpa45_5"
        return f"promptsrc/vit_b16_c2_ep50_batch4_4+4ctx_few_shot_{gpa}"
    if method == "promptkd" and protocol == "base2novel" and dataset in _PROMPTKD_KD200:
        return "promptkd/vit_b16_c2_ep20_batch8_4+4ctx_kd200"
    if method == "prograd" and protocol == "fewshot":  # the README's config per shot count (RN50 only)
        if shots <= 1:
            return "prograd/rn50_ep50"
        if shots <= 4:
            return "prograd/rn50_ep100"
        return "prograd/rn50_lambda08" if dataset in _PROGRAD_LAMBDA08 else "prograd/rn50"
    if method == "mma" and imagenet:
        return "mma/vit_b16_ep5_imnet"
    if method == "rpo" and protocol == "domain_generalization":
        return "rpo/imagenet_k24_ep15"
    if method in _PER_DATASET_PRESETS:
        return _per_dataset_preset(protocol, method, dataset)
    if protocol in ("cross_dataset", "domain_generalization") and method in ("maple", "promptsrc", "mugcp",
                                                                             "promptkd"):
        return _BASE_PRESETS[method] + "_cross_datasets"
    if method not in _BASE_PRESETS:
        chosen = get_method_class(method).preset_for(protocol, dataset, shots)
        if chosen is not None:
            return chosen
        shipped = get_method_class(method).presets
        candidates = sorted(p.stem for p in (PRESETS_DIR / method).glob("*.yaml"))
        # Per-dataset presets ``<protocol>_<dataset>`` (a reference's per-dataset values, e.g. CoPrompt's
        # constants.py) come first; the bundled sample counts as its full dataset.
        names = _preset_dataset_names(dataset)
        for key in (*(f"{protocol}_{d}" for d in names), protocol, "default"):
            if key in shipped:
                return f"{method}/{key}"
            if key in candidates:
                return f"{method}/{key}"
        for d in names:  # no preset for the protocol: the dataset's preset of another protocol
            per_dataset = [c for c in candidates if c.endswith(f"_{d}")]
            if per_dataset:
                return f"{method}/{per_dataset[0]}"
        candidates = [c for c in candidates if not any(c.endswith(f"_{d}") for d in _all_dataset_names())]
        if candidates:
            return f"{method}/{candidates[0]}"
        parent = presets_parent(method)
        if parent is not None:
            return f"{method}/{default_preset(protocol, parent, dataset, shots).partition('/')[2]}"
        if not shipped:
            warnings.warn(f"method {method!r} has no presets: it trains with the engine's defaults "
                          f"({_engine_defaults()}) and its config's defaults; give the class a `presets` mapping or "
                          f"pass --preset {method}=FILE.yaml to choose (docs/new-method.md)", stacklevel=2)
            return f"{method}/{ENGINE_DEFAULTS}"
        raise ConfigError(f"method {method!r} has no preset for {protocol!r} and no 'default' one (it has "
                          f"{', '.join(shipped)}): pass --preset {method}=NAME, or add a 'default' entry to its "
                          "`presets` (docs/new-method.md)")
    return _BASE_PRESETS[method]


def _engine_defaults() -> str:
    defaults = TrainConfig()
    return ", ".join(f"{key} {getattr(defaults, key)}" for key in
                     ("batch_size", "lr", "max_epoch", "warmup_epoch", "warmup_lr", "momentum", "weight_decay"))
