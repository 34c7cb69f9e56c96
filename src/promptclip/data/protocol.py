"""The CoOp benchmark protocol: split files, split generation, few-shot sampling, base/novel subsampling.

Behaviour follows CoOp's dataset classes (``datasets/oxford_pets.py``, ``datasets/dtd.py``) and Dassl's
``DatasetBase.generate_fewshot_dataset``; randomness always comes from an explicit ``random.Random`` instance, never
from the global RNG, and is drawn in the same order as the reference so the selections are identical:

* split generation (``DTD.read_and_split_data``): classes in sorted folder order, per class shuffle then 50/20/30 with
  Python's ``round``; file names are sorted before shuffling so the result does not depend on the directory listing.
* trainval split (``OxfordPets.split_trainval``): per label, in first-appearance order, shuffle the indices and put the
  first ``round(n * 0.2)`` in val.
* few-shot (``generate_fewshot_dataset``): group by label in list order, ``rng.sample(items, K)`` per class, classes
  with fewer than K items keep all of them; CoOp draws train (K) and then val (min(K, 4)) from the same stream.
* base/novel (``OxfordPets.subsample_classes``): labels of the (few-shot) train split, sorted, split at ceil(n/2),
  relabelled 0..m-1, applied after few-shot sampling.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import parse_int
from ..errors import DataError
from .records import DatasetSplits, Record

__all__ = [
    "SPLIT_NAMES",
    "DEFAULT_SPLIT_SEED",
    "read_split",
    "write_split",
    "records_from_entries",
    "split_by_class",
    "split_trainval",
    "fewshot",
    "fewshot_splits",
    "subsample_classes",
    "fewshot_cache_path",
    "save_fewshot_cache",
    "load_fewshot_cache",
    "load_dassl_pickle",
    "import_dassl_fewshot",
    "splits_fingerprint",
]

SPLIT_NAMES = ("train", "val", "test")
#: Seed of generated splits. CoOp generates a missing split inside the first run, after ``set_random_seed(cfg.SEED)``,
#: which is 1 in all of its scripts.
DEFAULT_SPLIT_SEED = 1


# --------------------------------------------------------------------------------------------------------------------
# Split files (CoOp's split_zhou_*.json)
# --------------------------------------------------------------------------------------------------------------------


def _abspath(image_dir: str, relpath: str) -> str:
    if os.path.isabs(relpath):
        return relpath
    return os.path.join(image_dir, *relpath.split("/"))


def records_from_entries(entries: Any, image_dir: str, source: str, key: str) -> list[Record]:
    """Turn ``[[relpath, label, classname], ...]`` into records, validating every entry."""
    if not isinstance(entries, list):
        raise DataError(
            f"{source}: '{key}' must be a list of [relpath, label, classname], got {type(entries).__name__}"
        )
    out: list[Record] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise DataError(f"{source}: entry {i} of '{key}' is not [relpath, label, classname]: {entry!r}")
        relpath, label, classname = entry
        if not isinstance(relpath, str) or not relpath:
            raise DataError(f"{source}: entry {i} of '{key}' has an invalid path {relpath!r}")
        try:
            label_int = parse_int(label)
        except ValueError:
            raise DataError(f"{source}: entry {i} of '{key}' ({relpath!r}) has a non-integer label {label!r}") from None
        if not isinstance(classname, str):
            raise DataError(f"{source}: entry {i} of '{key}' ({relpath!r}) has a non-string class name {classname!r}")
        rel = relpath.replace("\\", "/")
        out.append(Record(path=_abspath(image_dir, rel), label=label_int, classname=classname, relpath=rel))
    return out


def read_split(
    path: str | os.PathLike, image_dir: str | os.PathLike
) -> tuple[list[Record], list[Record], list[Record]]:
    """Read a CoOp split file (``{"train"|"val"|"test": [[relpath, label, classname], ...]}``), list order kept.

    Image paths are joined to ``image_dir``; the images are not opened.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise DataError(f"split file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"split file {path} must hold a JSON object with keys 'train', 'val', 'test'")
    missing = [k for k in SPLIT_NAMES if k not in data]
    if missing:
        raise DataError(f"split file {path} has no key(s) {missing}; expected 'train', 'val' and 'test'")
    image_dir = os.path.abspath(os.fspath(image_dir))
    train, val, test = (records_from_entries(data[k], image_dir, str(path), k) for k in SPLIT_NAMES)
    return train, val, test


def write_split(
    path: str | os.PathLike, train: Sequence[Record], val: Sequence[Record], test: Sequence[Record]
) -> Path:
    """Write a CoOp split file (same layout as CoOp's ``save_split``: indent 4, relpaths relative to the image dir).

    The file is written to a temporary name and renamed, so an interrupted write never leaves a truncated split.
    """
    path = Path(path)
    data = {
        k: [[r.relpath, r.label, r.classname] for r in recs]
        for k, recs in zip(SPLIT_NAMES, (train, val, test), strict=True)
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=4, separators=(",", ": "))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Split generation
# --------------------------------------------------------------------------------------------------------------------


def split_by_class(
    files_by_class: Mapping[str, Sequence[str]],
    rng: random.Random,
    image_dir: str,
    *,
    p_train: float = 0.5,
    p_val: float = 0.2,
    renames: Mapping[str, str] | None = None,
    strict: bool = True,
    source: str = "dataset",
) -> tuple[list[Record], list[Record], list[Record]]:
    """CoOp's ``read_and_split_data`` on an explicit listing ``{folder: [file names]}``.

    Labels follow the sorted folder names; file names are sorted, then shuffled with ``rng`` class by class in label
    order; ``round(n * p_train)`` go to train, ``round(n * p_val)`` to val, the rest to test. Class names are the
    folder names, renamed through ``renames``. ``strict`` (CoOp's assert) requires every part to be non-empty; without
    it (custom datasets) val gives way so that a class of >= 2 images keeps one test image.
    """
    renames = renames or {}
    train: list[Record] = []
    val: list[Record] = []
    test: list[Record] = []
    for label, folder in enumerate(sorted(files_by_class)):
        names = sorted(files_by_class[folder])
        if not names:
            raise DataError(f"{source}: class folder {os.path.join(image_dir, folder)} contains no images")
        relpaths = [f"{folder}/{n}" for n in names]
        rng.shuffle(relpaths)
        n_total = len(relpaths)
        n_train = round(n_total * p_train)
        n_val = round(n_total * p_val)
        if not strict and n_total - n_train - n_val <= 0:
            n_val = max(0, n_total - n_train - 1)  # small custom classes: keep one test image, val may be empty
        n_test = n_total - n_train - n_val
        if n_train <= 0 or n_test <= 0 or (strict and n_val <= 0):
            raise DataError(
                f"{source}: class folder {folder!r} has only {n_total} image(s), too few to split "
                f"{p_train:.0%}/{p_val:.0%}/{1 - p_train - p_val:.0%} into train/val/test"
            )
        classname = renames.get(folder, folder)

        def make(rels: list[str], label: int = label, classname: str = classname) -> list[Record]:
            return [Record(_abspath(image_dir, r), label, classname, r) for r in rels]

        train += make(relpaths[:n_train])
        val += make(relpaths[n_train : n_train + n_val])
        test += make(relpaths[n_train + n_val :])
    return train, val, test


def split_trainval(
    trainval: Sequence[Record], rng: random.Random, p_val: float = 0.2, source: str = "dataset"
) -> tuple[list[Record], list[Record]]:
    """CoOp's ``OxfordPets.split_trainval``: per label (first-appearance order) shuffle, first round(n*p_val) to val."""
    tracker: dict[int, list[int]] = defaultdict(list)
    for idx, item in enumerate(trainval):
        tracker[item.label].append(idx)
    train: list[Record] = []
    val: list[Record] = []
    for label, idxs in tracker.items():
        n_val = round(len(idxs) * p_val)
        if n_val <= 0:
            raise DataError(f"{source}: label {label} has {len(idxs)} trainval image(s), too few for a val split")
        rng.shuffle(idxs)
        for n, idx in enumerate(idxs):
            (val if n < n_val else train).append(trainval[idx])
    return train, val


# --------------------------------------------------------------------------------------------------------------------
# Few-shot sampling and base/novel subsampling
# --------------------------------------------------------------------------------------------------------------------


def _rng_from(seed: int | None, rng: random.Random | None) -> random.Random:
    if (seed is None) == (rng is None):
        raise TypeError("pass exactly one of seed= or rng=")
    if rng is not None:
        return rng
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"few-shot seed must be an integer, got {seed!r}")
    return random.Random(seed)


def fewshot(
    records: Sequence[Record], num_shots: int, seed: int | None = None, *, rng: random.Random | None = None
) -> list[Record]:
    """Dassl's ``generate_fewshot_dataset(records, num_shots)`` after ``set_random_seed(seed)``.

    Records are grouped by label in list order; each class contributes ``rng.sample(items, num_shots)`` (all its
    items when it has fewer). ``num_shots < 1`` returns all records. Pass ``seed`` for a fresh stream or ``rng`` to
    continue one (CoOp samples train and then val from the same stream; see :func:`fewshot_splits`).
    """
    r = _rng_from(seed, rng)
    if num_shots < 1:
        return list(records)
    tracker: dict[int, list[Record]] = defaultdict(list)
    for item in records:
        tracker[item.label].append(item)
    out: list[Record] = []
    for items in tracker.values():
        out.extend(r.sample(items, num_shots) if len(items) >= num_shots else items)
    return out


def splits_fingerprint(splits: DatasetSplits) -> str:
    """sha256 over the full train and val lists (relpath, label) the few-shot selection is drawn from."""
    h = hashlib.sha256()
    for key in ("train", "val"):
        h.update(key.encode())
        for r in splits.split(key):
            h.update(f"\0{r.relpath}\0{r.label}".encode())
    return h.hexdigest()


def fewshot_cache_path(cache_dir: str | os.PathLike, num_shots: int, seed: int) -> Path:
    """``<cache_dir>/shot_{K}-seed_{S}.json`` (the JSON twin of CoOp's ``split_fewshot/shot_{K}-seed_{S}.pkl``)."""
    return Path(cache_dir) / f"shot_{num_shots}-seed_{seed}.json"


def fewshot_splits(
    splits: DatasetSplits,
    num_shots: int,
    seed: int,
    *,
    sample_val: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> DatasetSplits:
    """The few-shot step of CoOp's dataset classes, returning new splits (test unchanged).

    One ``random.Random(seed)`` stream: train gets ``num_shots`` per class, then val ``min(num_shots, 4)`` per class
    (``sample_val=False`` leaves val untouched, as CoOp's ImageNet class does). With ``cache_dir``, the selection is
    read from ``shot_{K}-seed_{S}.json`` when present; otherwise a Dassl ``shot_{K}-seed_{S}.pkl`` in the same folder
    is imported (safely); otherwise it is sampled; the JSON cache is written in the last two cases.
    """
    if num_shots < 1 or not splits.train:
        return splits
    if cache_dir is not None:
        json_path = fewshot_cache_path(cache_dir, num_shots, seed)
        if json_path.is_file():
            return load_fewshot_cache(json_path, splits)
        pkl_path = Path(cache_dir) / f"shot_{num_shots}-seed_{seed}.pkl"
        if pkl_path.is_file():
            train, val = import_dassl_fewshot(pkl_path, splits)
            out = splits.replace(train=train, val=val if val is not None else splits.val)
            out = _with_fewshot_meta(out, num_shots, seed, f"dassl-pickle:{pkl_path.name}")
            save_fewshot_cache(json_path, out, num_shots, seed, source=f"dassl-pickle:{pkl_path.name}", full=splits)
            return out
    rng = random.Random(seed)
    train = fewshot(splits.train, num_shots, rng=rng)
    val = fewshot(splits.val, min(num_shots, 4), rng=rng) if sample_val else list(splits.val)
    out = _with_fewshot_meta(splits.replace(train=train, val=val), num_shots, seed, "sampled")
    if cache_dir is not None:
        try:
            save_fewshot_cache(fewshot_cache_path(cache_dir, num_shots, seed), out, num_shots, seed, full=splits)
        except OSError:
            pass  # a read-only dataset folder must not stop training; the selection is reproducible anyway
    return out


def _with_fewshot_meta(splits: DatasetSplits, num_shots: int, seed: int, source: str) -> DatasetSplits:
    return splits.replace(meta={**splits.meta, "num_shots": num_shots, "fewshot_seed": seed, "fewshot_source": source})


def subsample_classes(splits: DatasetSplits, subsample: str = "all") -> DatasetSplits:
    """CoCoOp's base/novel split: labels present in train (sorted), first ceil(n/2) = base, rest = new; relabel.

    Apply after few-shot sampling. Test-only datasets (empty train) take their labels from test.
    """
    if subsample not in ("all", "base", "new"):
        raise DataError(f"subsample must be 'all', 'base' or 'new', got {subsample!r}")
    if subsample == "all":
        return splits
    reference = splits.train if splits.train else splits.test
    labels = sorted({r.label for r in reference})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(selected)}

    def keep(records: Iterable[Record]) -> list[Record]:
        return [
            Record(r.path, relabel[r.label], r.classname, r.relpath) for r in records if r.label in relabel
        ]

    return splits.replace(
        train=keep(splits.train),
        val=keep(splits.val),
        test=keep(splits.test),
        classnames=[splits.classnames[y] for y in selected],
        wnids=[splits.wnids[y] for y in selected] if splits.wnids is not None else None,
        imagenet_indices=(
            [splits.imagenet_indices[y] for y in selected] if splits.imagenet_indices is not None else None
        ),
        meta={**splits.meta, "subsample": subsample, "subsample_labels": selected},
    )


# --------------------------------------------------------------------------------------------------------------------
# Few-shot selection cache (JSON)
# --------------------------------------------------------------------------------------------------------------------

_CACHE_FORMAT = "promptclip-fewshot/1"


def save_fewshot_cache(
    path: str | os.PathLike,
    fewshot: DatasetSplits,
    num_shots: int,
    seed: int,
    *,
    source: str = "sampled",
    full: DatasetSplits | None = None,
) -> Path:
    """Write a few-shot selection as JSON: the train/val entries in order plus the fingerprint of the full split."""
    path = Path(path)
    data = {
        "format": _CACHE_FORMAT,
        "dataset": fewshot.name,
        "num_shots": num_shots,
        "seed": seed,
        "source": source,
        "split_fingerprint": splits_fingerprint(full) if full is not None else None,
        "train": [[r.relpath, r.label, r.classname] for r in fewshot.train],
        "val": [[r.relpath, r.label, r.classname] for r in fewshot.val],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return path


def _match(entries: list[Record], pool: Sequence[Record], source: str, key: str) -> list[Record]:
    by_rel = {r.relpath: r for r in pool}
    out = []
    for e in entries:
        r = by_rel.get(e.relpath)
        if r is None:
            raise DataError(
                f"{source}: '{key}' entry {e.relpath!r} is not in the dataset's {key} split; the cache does not belong "
                "to this split file; delete it to sample again"
            )
        if r.label != e.label:
            raise DataError(
                f"{source}: '{key}' entry {e.relpath!r} has label {e.label} but the split file says {r.label}; "
                "delete the cache to sample again"
            )
        out.append(r)
    return out


def load_fewshot_cache(path: str | os.PathLike, splits: DatasetSplits) -> DatasetSplits:
    """Read a JSON few-shot selection and map it onto the records of the full ``splits``."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:  # unreadable, not JSON, or not UTF-8
        raise DataError(f"few-shot cache {path} cannot be read: {e}") from None
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
        raise DataError(f"few-shot cache {path} is not a promptclip few-shot file (format {_CACHE_FORMAT!r})")
    fp = data.get("split_fingerprint")
    if fp is not None and fp != splits_fingerprint(splits):
        raise DataError(
            f"few-shot cache {path} was drawn from a different split file than the one loaded now; delete it to "
            "sample again"
        )
    train = _match(records_from_entries(data.get("train"), splits.image_dir, str(path), "train"), splits.train,
                   str(path), "train")
    val = _match(records_from_entries(data.get("val"), splits.image_dir, str(path), "val"), splits.val,
                 str(path), "val")
    return _with_fewshot_meta(
        splits.replace(train=train, val=val), int(data["num_shots"]), int(data["seed"]), f"cache:{path.name}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Dassl pickles, read without arbitrary unpickling
# --------------------------------------------------------------------------------------------------------------------


class PickledDatum:
    """Inert stand-in for Dassl's ``Datum``: holds the four plain attributes, runs no code."""

    __slots__ = ("impath", "label", "domain", "classname")

    def __init__(self) -> None:
        self.impath = ""
        self.label = 0
        self.domain = 0
        self.classname = ""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected Datum state of type {type(state).__name__}")
        impath = state.get("_impath", "")
        label = state.get("_label", 0)
        domain = state.get("_domain", 0)
        classname = state.get("_classname", "")
        if not isinstance(impath, str) or not isinstance(classname, str):
            raise pickle.UnpicklingError("Datum with a non-string path or class name")
        if isinstance(label, bool) or not isinstance(label, int) or isinstance(domain, bool) or not isinstance(
            domain, int
        ):
            raise pickle.UnpicklingError("Datum with a non-integer label or domain")
        self.impath, self.label, self.domain, self.classname = impath, label, domain, classname


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # copyreg._reconstructor, as protocols 0 and 1 use it, restricted to the stand-in class.
    if cls is not PickledDatum or base is not object or state is not None:
        raise pickle.UnpicklingError("refusing copyreg._reconstructor for anything but Dassl's Datum")
    return PickledDatum.__new__(PickledDatum)


_DATUM_GLOBALS = {
    ("dassl.data.datasets.base_dataset", "Datum"),
    ("dassl.data.datasets", "Datum"),
}
_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "object"}


class _DasslUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DATUM_GLOBALS:
            return PickledDatum
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return {"dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset,
                    "object": object}[name]
        if module in ("copyreg", "copy_reg") and name == "_reconstructor":
            return _safe_reconstructor
        if module == "collections" and name == "OrderedDict":
            return dict
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def load_dassl_pickle(path: str | os.PathLike) -> Any:
    """Load a Dassl/CoOp pickle (``shot_K-seed_S.pkl``, ``preprocessed.pkl``) without running arbitrary code.

    Only Dassl's ``Datum`` (mapped to the inert :class:`PickledDatum`) and builtin containers may appear; any other
    global (e.g. ``os.system``) is refused with a :class:`DataError`.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read Dassl pickle {path}: {e}") from None
    try:
        return _DasslUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"refused to load {path}: {e}; only Dassl Datum lists can be imported") from None
    except Exception as e:  # malformed stream: EOFError, ValueError, KeyError, ...
        raise DataError(f"cannot load Dassl pickle {path}: {type(e).__name__}: {e}") from None


def _match_impaths(items: Any, pool: Sequence[Record], source: str, key: str) -> list[Record]:
    if not isinstance(items, list) or not all(isinstance(x, PickledDatum) for x in items):
        raise DataError(f"{source}: '{key}' is not a list of Dassl Datum objects")
    by_rel = {r.relpath: r for r in pool}
    out = []
    for d in items:
        parts = [p for p in d.impath.replace("\\", "/").split("/") if p]
        rec = None
        for i in range(len(parts)):  # longest suffix of the original absolute path that is a known relpath
            rec = by_rel.get("/".join(parts[i:]))
            if rec is not None:
                break
        if rec is None:
            raise DataError(f"{source}: '{key}' image {d.impath!r} is not in the current {key} split")
        if rec.label != d.label:
            raise DataError(
                f"{source}: '{key}' image {d.impath!r} has label {d.label} in the pickle but {rec.label} in the split"
            )
        out.append(rec)
    return out


def import_dassl_fewshot(
    path: str | os.PathLike, splits: DatasetSplits
) -> tuple[list[Record], list[Record] | None]:
    """Import CoOp's ``shot_K-seed_S.pkl`` (``{"train": [Datum], "val": [Datum]}``; ImageNet's has no val).

    Each pickled absolute path is matched to a record of the full split by its longest suffix that is a relpath, so
    pickles made on another machine import correctly.
    """
    data = load_dassl_pickle(path)
    if not isinstance(data, dict) or "train" not in data:
        raise DataError(f"{path}: expected a dict with 'train' (and 'val'), got {type(data).__name__}")
    train = _match_impaths(data["train"], splits.train, str(path), "train")
    val = _match_impaths(data["val"], splits.val, str(path), "val") if "val" in data else None
    return train, val

