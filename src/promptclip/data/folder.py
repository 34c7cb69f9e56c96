"""Custom datasets: an image folder or a CSV file, usable by every protocol (``folder:PATH`` / ``csv:PATH``).

Folder layouts:

* ``ROOT/<class>/*.jpg`` — a split is generated (per class: sorted, shuffled with ``random.Random(split_seed)``,
  50/20/30 like CoOp) and saved as ``ROOT/split_promptclip.json`` so later runs see the same split;
* ``ROOT/train/<class>/*``, ``ROOT/test/<class>/*`` and optionally ``ROOT/val/<class>/*`` — used as given.

CSV: a header row with ``path`` and ``label`` and optionally ``split`` (train / val / test) and ``classname``.
Paths are relative to the CSV's folder (or absolute). Labels are integers 0..n-1 — class names then come from
``<csv stem>.classnames.txt`` or ``classnames.txt`` beside the CSV (one per line, in label order) or from the
``classname`` column — or class names themselves (labels then follow ``classnames.txt`` or sorted names). Without a
``split`` column the split is generated per class as for folders; with one, an empty val split is allowed.
"""

from __future__ import annotations

import csv
import os
import random
import re
import warnings
from collections import defaultdict
from pathlib import Path

from ..errors import DataError
from ..utf8names import check_utf8_path
from .files import list_images, subdirs
from .protocol import DEFAULT_SPLIT_SEED, read_split, split_by_class
from .protocol import write_split as save_split_file
from .records import DatasetSplits, Record, classnames_from_records
from .templates import DEFAULT_TEMPLATE, ensemble_templates

__all__ = ["load_folder_dataset", "load_csv_dataset", "FOLDER_SPLIT_FILE"]

FOLDER_SPLIT_FILE = "split_promptclip.json"
_RESERVED = {"split_fewshot"}  # our own cache folder inside a custom dataset is never a class


def _make_splits(name: str, image_dir: Path, train, val, test, classnames, template: str, meta: dict,
                 cache_dir: Path | None = None) -> DatasetSplits:
    cache_dir = cache_dir or image_dir / "split_fewshot"
    return DatasetSplits(
        name=name, train=train, val=val, test=test, classnames=classnames, template=template,
        templates=ensemble_templates(template), image_dir=str(image_dir),
        meta={**meta, "fewshot_val": True, "fewshot_cache_dir": str(cache_dir)},
    )


def load_folder_dataset(
    path: str | os.PathLike,
    *,
    split_seed: int = DEFAULT_SPLIT_SEED,
    write_split: bool = True,
    p_train: float = 0.5,
    p_val: float = 0.2,
    template: str = DEFAULT_TEMPLATE,
) -> DatasetSplits:
    """An image-folder dataset (see the module docstring for the layouts)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"custom dataset folder {root} not found (expected ROOT/<class>/*.jpg)")
    root = root.resolve()
    check_utf8_path(root, "custom dataset folder")
    name = root.name
    split_path = root / FOLDER_SPLIT_FILE
    if split_path.is_file():
        train, val, test = read_split(split_path, root)
        classnames = classnames_from_records((train, val, test), str(split_path))
        return _make_splits(name, root, train, val, test, classnames, template,
                            {"split_file": str(split_path), "split_source": "file"})
    top = [d for d in subdirs(root) if d not in _RESERVED]
    if "train" in top and "test" in top:
        return _load_presplit(root, template)
    listing: dict[str, list[str]] = {}
    for folder in top:
        files = list_images(root / folder)
        if not files:
            raise DataError(f"custom dataset {root}: class folder {root / folder} contains no images")
        listing[folder] = files
    if not listing:
        raise DataError(
            f"custom dataset {root}: no class folders found; expected ROOT/<class>/*.jpg or "
            "ROOT/train|val|test/<class>/*.jpg"
        )
    rng = random.Random(split_seed)
    train, val, test = split_by_class(
        listing, rng, str(root), p_train=p_train, p_val=p_val, strict=False, source=f"custom dataset {root}"
    )
    meta = {"split_file": str(split_path), "split_source": "generated", "split_seed": split_seed}
    splits = _make_splits(name, root, train, val, test, sorted(listing), template, meta)  # checks the class names
    if write_split:  # only a valid dataset gets a split file
        try:
            save_split_file(split_path, train, val, test)
            return splits.replace(meta={**splits.meta, "split_source": "generated+saved"})
        except OSError as e:
            warnings.warn(f"could not save the generated split to {split_path}: {e}", stacklevel=2)
    return splits


def _load_presplit(root: Path, template: str) -> DatasetSplits:
    parts = {p: root / p for p in ("train", "val", "test") if (root / p).is_dir()}
    classes = sorted({c for d in parts.values() for c in subdirs(d)})
    if not classes:
        raise DataError(f"custom dataset {root}: train/ and test/ contain no class folders")
    label = {c: i for i, c in enumerate(classes)}
    out: dict[str, list[Record]] = {"train": [], "val": [], "test": []}
    for part, d in parts.items():
        for c in subdirs(d):
            files = list_images(d / c)
            if not files:
                raise DataError(f"custom dataset {root}: class folder {d / c} contains no images")
            out[part] += [Record(str(d / c / f), label[c], c, f"{part}/{c}/{f}") for f in files]
    return _make_splits(root.name, root, out["train"], out["val"], out["test"], classes, template,
                        {"split_source": "train/val/test folders"})


# --------------------------------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------------------------------

_SPLIT_VALUES = {"train": "train", "val": "val", "test": "test"}


def _read_classnames_file(csv_path: Path) -> tuple[list[str], Path] | None:
    for cand in (csv_path.with_name(csv_path.stem + ".classnames.txt"), csv_path.with_name("classnames.txt")):
        if cand.is_file():
            try:
                with open(cand, encoding="utf-8") as f:
                    names = [line.strip() for line in f if line.strip()]
            except UnicodeDecodeError as err:
                raise DataError(f"class-name file {cand} is not UTF-8 text ({err.reason} at byte {err.start})")\
                    from None
            if not names:
                raise DataError(f"class-name file {cand} is empty")
            if len(set(names)) != len(names):
                dup = sorted({n for n in names if names.count(n) > 1})
                raise DataError(f"class-name file {cand} lists {dup[:5]} more than once")
            return names, cand
    return None


def load_csv_dataset(
    path: str | os.PathLike,
    *,
    split_seed: int = DEFAULT_SPLIT_SEED,
    p_train: float = 0.5,
    p_val: float = 0.2,
    template: str = DEFAULT_TEMPLATE,
) -> DatasetSplits:
    """A CSV dataset (see the module docstring for the format)."""
    csv_path = Path(path).expanduser()
    if not csv_path.is_file():
        raise DataError(f"CSV dataset file {csv_path} not found")
    csv_path = csv_path.resolve()
    check_utf8_path(csv_path, "CSV dataset")
    base = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = [(n, row) for n, row in enumerate(csv.reader(f), 1) if any(cell.strip() for cell in row)]
    except UnicodeDecodeError as err:
        raise DataError(f"CSV dataset {csv_path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as "
                        "UTF-8 (or plain ASCII) CSV with a header 'path,label[,split][,classname]'") from None
    except csv.Error as err:
        raise DataError(f"CSV dataset {csv_path} cannot be parsed as CSV: {err}") from None
    if not rows:
        raise DataError(f"CSV dataset {csv_path} is empty; expected a header 'path,label[,split][,classname]'")
    header = [h.strip().lower() for h in rows[0][1]]
    if "path" not in header or "label" not in header:
        raise DataError(
            f"CSV dataset {csv_path}: the first row must be a header with columns 'path' and 'label' "
            f"(optional 'split', 'classname'); got {rows[0][1]}"
        )
    col = {h: i for i, h in enumerate(header)}
    entries = []
    seen: dict[str, int] = {}
    for n, row in rows[1:]:
        if len(row) < len(header):
            raise DataError(f"CSV dataset {csv_path} line {n}: expected {len(header)} columns, got {len(row)}: {row}")
        rel = row[col["path"]].strip()
        if not rel:
            raise DataError(f"CSV dataset {csv_path} line {n}: empty path")
        rel = rel.replace("\\", "/")
        if rel in seen:
            raise DataError(f"CSV dataset {csv_path} line {n}: {rel!r} is already listed on line {seen[rel]}")
        seen[rel] = n
        full = Path(rel) if os.path.isabs(rel) else base.joinpath(*rel.split("/"))
        if not full.is_file():
            raise DataError(f"CSV dataset {csv_path} line {n}: image not found: {full}")
        split = None
        if "split" in col:
            value = row[col["split"]].strip().lower()
            if value not in _SPLIT_VALUES:
                raise DataError(
                    f"CSV dataset {csv_path} line {n}: split {row[col['split']]!r} is not one of train, val, test"
                )
            split = _SPLIT_VALUES[value]
        cname = row[col["classname"]].strip() if "classname" in col else None
        label = row[col["label"]].strip()
        if not label:
            raise DataError(f"CSV dataset {csv_path} line {n}: {rel!r} has an empty label; give every row a class "
                            "name or an integer label (or remove the row)")
        entries.append((n, rel, str(full), label, split, cname))
    if not entries:
        raise DataError(f"CSV dataset {csv_path} has a header but no rows")

    labels, classnames = _resolve_labels(csv_path, entries)
    records = [Record(full, y, classnames[y], rel) for (_, rel, full, _, _, _), y in zip(entries, labels, strict=True)]
    meta: dict = {"csv": str(csv_path)}
    if "split" in col:
        parts: dict[str, list[Record]] = {"train": [], "val": [], "test": []}
        for rec, e in zip(records, entries, strict=True):
            parts[e[4]].append(rec)
        train, val, test = parts["train"], parts["val"], parts["test"]
        meta["split_source"] = "csv split column"
    else:
        train, val, test = _split_records(records, random.Random(split_seed), p_train, p_val, csv_path)
        meta.update(split_source="generated", split_seed=split_seed)
    # One cache folder per CSV: several CSV datasets may share a folder (and their images).
    return _make_splits(csv_path.stem, base, train, val, test, classnames, template, meta,
                        cache_dir=base / "split_fewshot" / csv_path.stem)


_INT = re.compile(r"-?\d+")


def _resolve_labels(csv_path: Path, entries: list) -> tuple[list[int], list[str]]:
    names_file = _read_classnames_file(csv_path)
    raw = [e[3] for e in entries]
    if all(_INT.fullmatch(v) for v in raw):
        ints = [int(v) for v in raw]
        if names_file is not None:
            classnames, source = names_file
            where = f"{len(classnames)} classes in {source.name}"
        elif entries[0][5] is not None:
            by_label: dict[int, str] = {}
            for (n, _, _, _, _, cname), y in zip(entries, ints, strict=True):
                if not cname:
                    raise DataError(f"CSV dataset {csv_path} line {n}: label {y} has an empty 'classname'")
                if y >= 0 and by_label.setdefault(y, cname) != cname:
                    raise DataError(
                        f"CSV dataset {csv_path} line {n}: label {y} is named {cname!r} here but "
                        f"{by_label[y]!r} earlier"
                    )
            n_cls = len(by_label)
            classnames = [by_label.get(i, "") for i in range(n_cls)]
            where = f"{n_cls} distinct class names in the 'classname' column"
        else:
            raise DataError(
                f"CSV dataset {csv_path}: integer labels need class names; add a 'classname' column or a "
                f"classnames.txt (one name per line, in label order) next to the CSV"
            )
        for (n, *_), y in zip(entries, ints, strict=True):
            if not 0 <= y < len(classnames):
                raise DataError(
                    f"CSV dataset {csv_path} line {n}: label {y} is out of range 0..{len(classnames) - 1} ({where})"
                )
        if names_file is not None and entries[0][5] is not None:
            for (n, _, _, _, _, cname), y in zip(entries, ints, strict=True):
                if cname != classnames[y]:
                    raise DataError(
                        f"CSV dataset {csv_path} line {n}: classname {cname!r} disagrees with {names_file[1].name}, "
                        f"which names label {y} {classnames[y]!r}"
                    )
        missing = [i for i, c in enumerate(classnames) if not c]
        if missing:
            raise DataError(f"CSV dataset {csv_path}: label(s) {missing[:10]} have no class name")
        return ints, classnames
    # Labels are class names.
    if names_file is not None:
        classnames, source = names_file
        index = {c: i for i, c in enumerate(classnames)}
        for n, _, _, v, _, _ in entries:
            if v not in index:
                raise DataError(f"CSV dataset {csv_path} line {n}: class {v!r} is not listed in {source.name}")
    else:
        classnames = sorted(set(raw))
        index = {c: i for i, c in enumerate(classnames)}
    return [index[v] for v in raw], classnames


def _split_records(
    records: list[Record], rng: random.Random, p_train: float, p_val: float, source: Path
) -> tuple[list[Record], list[Record], list[Record]]:
    by_label: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        by_label[r.label].append(r)
    train: list[Record] = []
    val: list[Record] = []
    test: list[Record] = []
    for label in sorted(by_label):
        items = sorted(by_label[label], key=lambda r: r.relpath)
        rng.shuffle(items)
        n = len(items)
        n_train, n_val = round(n * p_train), round(n * p_val)
        if n - n_train - n_val <= 0:
            n_val = max(0, n - n_train - 1)
        if n_train <= 0 or n - n_train - n_val <= 0:
            raise DataError(
                f"CSV dataset {source}: class {items[0].classname!r} has only {n} image(s), too few to generate a "
                "train/test split; add a 'split' column"
            )
        train += items[:n_train]
        val += items[n_train : n_train + n_val]
        test += items[n_train + n_val :]
    return train, val, test
