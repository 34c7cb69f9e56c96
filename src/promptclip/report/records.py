"""Result records: reading and validating the runner's JSONL files, and the per-protocol view the tables use."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import PromptClipError
from ..tracking import METRICS_FILE

PROTOCOLS: tuple[str, ...] = ("base2novel", "fewshot", "cross_dataset", "domain_generalization")
SPLITS: tuple[str, ...] = ("base", "novel", "all")

# Fields every record must carry, with the accepted types. ``eval_dataset`` falls back to ``dataset``.
_REQUIRED: dict[str, tuple[type, ...]] = {
    "protocol": (str,),
    "method": (str,),
    "dataset": (str,),
    "split": (str,),
    "seed": (int,),
    "shots": (int,),
    "accuracy": (int, float),
}


#: ``status`` of the record of a grid cell that was not run because its method does not apply to the protocol.
NOT_APPLICABLE = "not_applicable"


def not_applicable(record: dict) -> bool:
    return record.get("status") == NOT_APPLICABLE


class RecordWarning(UserWarning):
    """A problem in the records that the report works around (truncated line, duplicate, incomplete seed)."""


# --------------------------------------------------------------------------------------------------------------------
# Reading records


def _expand(path_or_paths: str | PathLike | Iterable[str | PathLike]) -> list[Path]:
    if isinstance(path_or_paths, (str, PathLike)):
        items = [path_or_paths]
    else:
        items = list(path_or_paths)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.jsonl") if f.name != METRICS_FILE)  # runs' training metrics
            if not found:
                raise PromptClipError(f"no *.jsonl record files under {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise PromptClipError(f"record file {p} does not exist")
    return files


def validate_record(record: Any, where: str) -> None:
    """Raise :class:`PromptClipError` (naming ``where``) unless ``record`` has the required fields and types."""
    if not isinstance(record, dict):
        raise PromptClipError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if record.get("status") == NOT_APPLICABLE:  # a cell not run (the method does not apply): no accuracy
        required = {k: v for k, v in _REQUIRED.items() if k != "accuracy"}
    else:
        required = _REQUIRED
    missing = [k for k in required if k not in record]
    if missing:
        raise PromptClipError(f"{where}: record lacks the field(s) {', '.join(missing)}")
    for key, types in required.items():
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise PromptClipError(f"{where}: field {key!r} has the wrong type ({value!r})")
    if record["protocol"] not in PROTOCOLS:
        raise PromptClipError(f"{where}: unknown protocol {record['protocol']!r} (expected one of {PROTOCOLS})")
    if record["split"] not in SPLITS:
        raise PromptClipError(f"{where}: unknown split {record['split']!r} (expected one of {SPLITS})")


#: Marks the rows of runs that trained on the novel classes' unlabelled images (``unlabeled_novel_images``).
UNLABELED_NOVEL_MARK = "†"


def record_label(record: dict) -> str:
    """The row label: ``method_label`` when set, else ``method``; marked with :data:`UNLABELED_NOVEL_MARK` when the
    run trained on unlabelled images of the novel classes (never in the same row as labelled runs)."""
    label = str(record.get("method_label") or record["method"])
    return f"{label} {UNLABELED_NOVEL_MARK}" if record.get("unlabeled_novel_images") is True else label


def _identity(record: dict) -> tuple:
    return (
        record["protocol"], record_label(record), record["dataset"], record.get("eval_dataset") or record["dataset"],
        record["split"], record["shots"], record["seed"], record.get("config_hash", ""),
    )


def read_records(path_or_paths: str | PathLike | Iterable[str | PathLike]) -> list[dict]:
    """Records from one or more JSONL files (a directory means every ``*.jsonl`` under it, sorted, except the runs'
    ``metrics.jsonl``).

    - Blank lines are ignored.
    - A last line that is not valid JSON (a write cut short by a crash) is skipped with a :class:`RecordWarning`.
    - Any other malformed line, or a record without the required fields, raises :class:`PromptClipError` naming the
      file and line number.
    - Records with the same (protocol, method_label, dataset, eval_dataset, split, shots, seed, config_hash) are
      duplicates: the last one read wins (files in the given order) and a :class:`RecordWarning` says so.
    """
    by_identity: dict[tuple, tuple[dict, str]] = {}
    for path in _expand(path_or_paths):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PromptClipError(f"cannot read record file {path}: {e}") from e
        lines = text.split("\n")
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            where = f"{path}:{i + 1}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if i == last:
                    warnings.warn(f"{where}: skipping a truncated last line (an interrupted write?): {e.msg}",
                                  RecordWarning, stacklevel=2)
                    continue
                raise PromptClipError(f"{where}: malformed record line (not valid JSON: {e.msg})") from e
            validate_record(record, where)
            key = _identity(record)
            if key in by_identity:
                warnings.warn(f"{where}: duplicate of the record at {by_identity[key][1]} (same protocol, method, "
                              "dataset, eval_dataset, split, shots, seed and config_hash); keeping the later one",
                              RecordWarning, stacklevel=2)
                del by_identity[key]  # re-insert so the order follows the kept record
            by_identity[key] = (record, where)
    return [record for record, _ in by_identity.values()]


# --------------------------------------------------------------------------------------------------------------------
# Normalised records


class Rec(NamedTuple):
    """One record with the fields the tables use, types normalised."""

    protocol: str
    method: str
    label: str
    dataset: str
    eval_dataset: str
    split: str
    seed: int
    shots: int
    accuracy: float
    macro_f1: float | None
    backbone: str
    random_weights: bool


def prepare(records: Iterable[dict], protocol: str, notes: list[str]) -> list[Rec]:
    """The records of one protocol, with display labels, and one record per (cell, seed).

    When the protocol's records use more than one backbone, labels get a ``[backbone]`` suffix so different backbones
    never share a row. When a (label, dataset, eval_dataset, split, shots, seed) occurs more than once (e.g. two
    config hashes), the later record is used and a note + warning say so.
    """
    chosen = [r for r in records if r.get("protocol") == protocol]
    backbones = {str(r.get("backbone", "")) for r in chosen}
    out: dict[tuple, Rec] = {}
    for r in chosen:
        label = record_label(r)
        if len(backbones) > 1:
            label = f"{label} [{r.get('backbone', '?')}]"
        f1 = r.get("macro_f1")
        rec = Rec(
            protocol, str(r["method"]), label, str(r["dataset"]), str(r.get("eval_dataset") or r["dataset"]),
            str(r["split"]), int(r["seed"]), int(r["shots"]), float(r["accuracy"]),
            float(f1) if isinstance(f1, (int, float)) and not isinstance(f1, bool) else None,
            str(r.get("backbone", "")), bool(r.get("random_weights", False)),
        )
        key = (rec.label, rec.dataset, rec.eval_dataset, rec.split, rec.shots, rec.seed)
        if key in out:
            msg = (f"{protocol}: {rec.label} on {rec.dataset}→{rec.eval_dataset} ({rec.split}, K={rec.shots}) has "
                   f"several records for seed {rec.seed} (different config_hash?); using the last one")
            notes.append(msg)
            warnings.warn(msg, RecordWarning, stacklevel=3)
        out[key] = rec
    return list(out.values())
