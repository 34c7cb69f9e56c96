"""Label leakage of captions: how many mention their image's ground-truth class name, and masking of class names.

A caption "mentions" a class when the class name occurs as a phrase: case-insensitive, "_" / "-" / runs of
spaces treated alike, on word boundaries, with an optional plural "s" / "es". This is a lower bound of leakage
(synonyms and partial names such as "crop" for "annual crop land" are not counted).

Masking replaces mentions of EVERY class name of a label set (not only the ground truth): masking only the true
class would make the caption depend on the label, which is itself a leak at test time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["class_pattern", "mentions", "mask_class_names", "LeakReport", "leak_report", "DEFAULT_MASK"]

DEFAULT_MASK = "something"


def _normalise_name(name: str) -> list[str]:
    return [w for w in re.split(r"[\s_\-]+", name.strip().lower()) if w]


def class_pattern(names: Iterable[str]) -> re.Pattern | None:
    """One regex matching any of ``names`` as a phrase (longest names first, so "sea or lake" wins over "sea")."""
    phrases = []
    for name in sorted({n for n in names if n.strip()}, key=lambda n: -len(n)):
        words = _normalise_name(name)
        if words:
            phrases.append(r"[\s_\-]+".join(re.escape(w) for w in words) + r"(?:e?s)?")
    if not phrases:
        return None
    return re.compile(r"(?<![\w])(?:" + "|".join(phrases) + r")(?![\w])", re.IGNORECASE)


def mentions(caption: str, classname: str) -> bool:
    pattern = class_pattern([classname])
    return bool(pattern and pattern.search(caption))


def mask_class_names(caption: str, classnames: Sequence[str], token: str = DEFAULT_MASK) -> tuple[str, int]:
    """``caption`` with every mention of any of ``classnames`` replaced by ``token``, and the number replaced."""
    pattern = class_pattern(classnames)
    if pattern is None:
        return caption, 0
    return pattern.subn(token, caption)


@dataclass
class LeakReport:
    """Captions checked, how many mention their ground-truth class, how many mention any class of the set."""

    checked: int = 0
    mention_true_class: int = 0
    mention_any_class: int = 0
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (relpath, class, caption)

    @property
    def rate(self) -> float:
        return self.mention_true_class / self.checked if self.checked else 0.0

    def __str__(self) -> str:
        pct = 100 * self.rate
        text = (f"label leak: {self.mention_true_class} of {self.checked} captions ({pct:.1f}%) mention their "
                f"ground-truth class name; {self.mention_any_class} mention some class name of the label set")
        for relpath, name, caption in self.examples:
            text += f"\n  e.g. {relpath} [{name}]: {caption!r}"
        return text


def leak_report(records: Iterable[Any], captions: Any, classnames: Sequence[str], max_examples: int = 3
                ) -> LeakReport:
    """Leakage of the captions of ``records`` (``CaptionSet``), with ``classnames`` the dataset's label set."""
    report = LeakReport()
    any_pattern = class_pattern(classnames)
    patterns: dict[str, re.Pattern | None] = {}
    for rec in records:
        caption = captions.lookup(rec)
        if caption is None:
            continue
        report.checked += 1
        if rec.classname not in patterns:
            patterns[rec.classname] = class_pattern([rec.classname])
        pattern = patterns[rec.classname]
        if pattern is not None and pattern.search(caption):
            report.mention_true_class += 1
            if len(report.examples) < max_examples:
                report.examples.append((rec.relpath, rec.classname, caption))
        if any_pattern is not None and any_pattern.search(caption):
            report.mention_any_class += 1
    return report
