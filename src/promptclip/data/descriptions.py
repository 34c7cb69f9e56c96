"""Class descriptions written by an LLM, as method input (CoPrompt's ``gpt_file/<dataset>_prompt.json``).

A description file is a JSON object: class name -> list of descriptions (strings). Class names are matched after the
reference's ``_`` -> space (``Industrial_Buildings`` finds ``Industrial Buildings``), exactly first, then ignoring
case. Every class a run uses needs at least one description; :meth:`DescriptionSet.check` raises a
:class:`~promptclip.errors.DataError` naming the file and the classes without one, and the CLI runs it before any
weight loads (``--descriptions FILE``).

Bundled sets (``promptclip/data/assets/descriptions/``, MIT, from ShuvenduRoy/CoPrompt at a2a6c12; provenance in
that folder's README): ``caltech``, ``dtd``, ``eurosat``, ``fgvc``, ``food101``, ``oxford_flowers``, ``oxford_pets``,
``stanford_cars``, ``sun397``, ``ucf101`` — the reference's file stems. ImageNet's file (and those of its variants) is
too large to bundle: pass it with ``--descriptions`` (docs/methods/coprompt.md says where to get it).

A method reads descriptions through a config field naming a bundled set or a file (``PromptMethod.
description_field``); with None it looks every class up in all bundled sets (an error when a class has different
descriptions in two sets: then name the set).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .classnames import normalize_classname

DESCRIPTIONS_DIR = Path(__file__).parent / "assets" / "descriptions"
#: The reference's dataset name (``DATASET.NAME``, our specs' ``coop_name``) -> bundled set (its file stem).
REFERENCE_SETS = {
    "Caltech101": "caltech", "DescribableTextures": "dtd", "EuroSAT": "eurosat", "FGVCAircraft": "fgvc",
    "Food101": "food101", "OxfordFlowers": "oxford_flowers", "OxfordPets": "oxford_pets",
    "StanfordCars": "stanford_cars", "SUN397": "sun397", "UCF101": "ucf101",
}
#: Reference sets that are not bundled (too large): where users get them.
UNBUNDLED = {
    "ImageNet": "imagenet", "ImageNetA": "imagenet_a", "ImageNetR": "imagenet_r",
    "ImageNetSketch": "imagenet_sketch", "ImageNetV2": "imagenetv2",
}
UNBUNDLED_HINT = ("the ImageNet description files (gpt_file/imagenet*_prompt.json of github.com/ShuvenduRoy/CoPrompt, "
                  "MIT) are too large to bundle: download one and pass it with --descriptions FILE")


def bundled_sets() -> list[str]:
    return sorted(p.name[: -len("_prompt.json")] for p in DESCRIPTIONS_DIR.glob("*_prompt.json"))


@dataclass(frozen=True)
class DescriptionSet:
    """Descriptions by class name, and where they come from (``source``: a file path or ``bundled:<set>``)."""

    source: str
    entries: Mapping[str, tuple[str, ...]]

    def lookup(self, classname: str) -> tuple[str, ...] | None:
        """The descriptions of a class: exact key (after ``_`` -> space), else the one key equal ignoring case."""
        name = normalize_classname(classname)
        if name in self.entries:
            return self.entries[name]
        folded = [k for k in self.entries if k.casefold() == name.casefold()]
        return self.entries[folded[0]] if len(folded) == 1 else None

    def missing(self, classnames: Sequence[str]) -> list[str]:
        return [c for c in classnames if not self.lookup(c)]

    def check(self, classnames: Sequence[str], what: str = "the classes") -> None:
        """A :class:`DataError` naming the file and every class of ``classnames`` without a description."""
        missing = self.missing(classnames)
        if missing:
            shown = ", ".join(repr(c) for c in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10
                                                                  else "")
            raise DataError(f"class descriptions {self.source}: {len(missing)} of {len(classnames)} {what} have no "
                            f"description: {shown} (keys are class names, '_' read as a space; each needs a non-empty "
                            "list of strings)")

    def for_classes(self, classnames: Sequence[str]) -> list[tuple[str, ...]]:
        self.check(classnames)
        return [self.lookup(c) for c in classnames]  # type: ignore[misc]


def read_description_file(path: str | Path) -> DescriptionSet:
    """A description file (JSON: class name -> list of strings); :class:`DataError` naming it when unusable."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"class descriptions file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read class descriptions file {path}: {e}") from None
    return _from_json(value, str(path))


def _from_json(value: object, source: str) -> DescriptionSet:
    if not isinstance(value, dict):
        raise DataError(f"class descriptions {source}: expected a JSON object mapping class names to lists of "
                        f"descriptions, got {type(value).__name__}")
    entries: dict[str, tuple[str, ...]] = {}
    for key, texts in value.items():
        if isinstance(texts, str) or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise DataError(f"class descriptions {source}: the entry of {key!r} must be a list of strings")
        entries[normalize_classname(key)] = tuple(t for t in texts if t.strip())
    return DescriptionSet(source, entries)


@functools.cache
def bundled_set(name: str) -> DescriptionSet:
    path = DESCRIPTIONS_DIR / f"{name}_prompt.json"
    if not path.exists():
        hint = f"; {UNBUNDLED_HINT}" if name in UNBUNDLED.values() else ""
        raise DataError(f"no bundled class descriptions named {name!r}; bundled: {', '.join(bundled_sets())}{hint}")
    found = read_description_file(path)
    return DescriptionSet(f"bundled:{name}", found.entries)


@functools.cache
def _all_bundled() -> DescriptionSet:
    """Every bundled set in one; a class name whose descriptions differ between sets is left out (ambiguous)."""
    merged: dict[str, tuple[str, ...]] = {}
    ambiguous: set[str] = set()
    for name in bundled_sets():
        for key, texts in bundled_set(name).entries.items():
            if key in merged and merged[key] != texts:
                ambiguous.add(key)
            merged.setdefault(key, texts)
    return DescriptionSet("bundled:* (every bundled set; classes in several sets must be given a set: " +
                          ", ".join(sorted(ambiguous)) + ")", {k: v for k, v in merged.items() if k not in ambiguous})


def load_descriptions(spec: str | Path | None) -> DescriptionSet:
    """A bundled set by name, a JSON file by path, or (None) every bundled set at once."""
    if spec is None:
        return _all_bundled()
    text = str(spec)
    if text in bundled_sets() or text in UNBUNDLED.values():
        return bundled_set(text)
    if text.startswith("bundled:"):
        return bundled_set(text[len("bundled:"):])
    return read_description_file(text)


def reference_set(coop_name: str | None) -> str | None:
    """The bundled set the reference reads for its dataset name (``EuroSAT`` -> ``eurosat``), if bundled."""
    return REFERENCE_SETS.get(coop_name or "")
