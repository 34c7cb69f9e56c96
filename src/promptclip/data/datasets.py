"""Readers: a dataset spec (or a custom folder / CSV) + a data root -> :class:`DatasetSplits`.

Nothing here opens an image; ``verify`` (:mod:`promptclip.data.prepare`) and the loader do.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path

from ..errors import DataError
from ..utf8names import check_utf8_path
from .files import IMAGE_EXTENSIONS, list_images, subdirs
from .folder import load_csv_dataset, load_folder_dataset
from .protocol import DEFAULT_SPLIT_SEED, fewshot_splits, read_split, split_by_class, split_trainval, subsample_classes
from .protocol import write_split as save_split_file
from .records import DatasetSplits, Record, classnames_from_records
from .specs import (
    SAMPLE_DIR,
    DatasetSpec,
    get_spec,
    imagenet_a_wnids,
    imagenet_r_wnids,
    imagenet_subset_indices,
    imagenet_wnid_to_name,
    imagenet_wnids,
)

__all__ = ["load_splits", "protocol_splits"]


def _class_listing(image_dir: Path, ignored: tuple[str, ...] = (), source: str = "dataset") -> dict[str, list[str]]:
    listing = {}
    for folder in subdirs(image_dir):
        if folder in ignored:
            continue
        files = list_images(image_dir / folder)
        if not files:
            raise DataError(f"{source}: class folder {image_dir / folder} contains no images "
                            f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
        listing[folder] = files
    if not listing:
        raise DataError(f"{source}: no class folders with images found in {image_dir}")
    return listing


# --------------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------------


def load_splits(
    name_or_path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    split_seed: int = DEFAULT_SPLIT_SEED,
    write_split: bool = True,
) -> DatasetSplits:
    """Full train/val/test splits of a benchmark dataset, the bundled sample or a custom dataset.

    ``name_or_path``: a name from :func:`list_datasets` (with ``root`` = the data root that holds the dataset's
    folder, e.g. ``ROOT/eurosat/2750``); ``"eurosat-sample"`` (no root); ``"folder:PATH"`` (one sub-folder per
    class, or ``train/``, ``val/``, ``test/`` each with class sub-folders); ``"csv:PATH"`` (columns
    ``path,label[,split][,classname]``); or a path to such a folder / ``.csv`` file.

    When a split file is missing and CoOp has a generator for the dataset, the split is generated with CoOp's procedure
    from ``random.Random(split_seed)`` and saved (``write_split=False`` keeps it in memory only).
    """
    text = os.fspath(name_or_path)
    check_utf8_path(text, "dataset")
    if root is not None:
        check_utf8_path(root, "data root")
    if text.startswith("folder:"):
        return load_folder_dataset(text[len("folder:"):], split_seed=split_seed, write_split=write_split)
    if text.startswith("csv:"):
        return load_csv_dataset(text[len("csv:"):], split_seed=split_seed)
    try:
        spec = get_spec(text)
    except DataError:
        p = Path(text).expanduser()
        if p.is_dir():
            return load_folder_dataset(p, split_seed=split_seed, write_split=write_split)
        if p.is_file() and p.suffix.lower() == ".csv":
            return load_csv_dataset(p, split_seed=split_seed)
        raise
    return load_benchmark(spec, root, split_seed=split_seed, write_split=write_split)


def protocol_splits(
    name_or_path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    num_shots: int = 16,
    seed: int = 1,
    subsample: str = "all",
    cache: bool = True,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> DatasetSplits:
    """The full CoOp data pipeline: load → few-shot (train K, val min(K, 4), one stream) → base/new subsampling.

    With ``cache``, few-shot selections are kept as JSON in ``<dataset folder>/split_fewshot/`` (where CoOp keeps its
    pickles; an existing ``shot_K-seed_S.pkl`` there is imported). The bundled sample is never written to.
    """
    splits = load_splits(name_or_path, root, split_seed=split_seed)
    cache_dir = splits.meta.get("fewshot_cache_dir") if cache else None
    fewshot_val = splits.meta.get("fewshot_val", True)
    fs = fewshot_splits(splits, num_shots, seed, sample_val=fewshot_val, cache_dir=cache_dir)
    return subsample_classes(fs, subsample)


def _finish(
    spec_name: str,
    template: str,
    templates: tuple[str, ...],
    train: list[Record],
    val: list[Record],
    test: list[Record],
    image_dir: Path,
    source: str,
    **extra,
) -> DatasetSplits:
    classnames = classnames_from_records((train, val, test), source)
    meta = extra.pop("meta", {})
    return DatasetSplits(
        name=spec_name, train=train, val=val, test=test, classnames=classnames, template=template,
        templates=templates, image_dir=str(image_dir), meta=meta, **extra,
    )


def load_benchmark(
    spec: DatasetSpec | str,
    root: str | os.PathLike | None,
    *,
    split_seed: int = DEFAULT_SPLIT_SEED,
    write_split: bool = True,
) -> DatasetSplits:
    spec = get_spec(spec) if isinstance(spec, str) else spec
    if spec.bundled:
        root_path = SAMPLE_DIR
        write_split = False
    else:
        if root is None:
            raise DataError(
                f"dataset {spec.name!r} needs a data root: pass root=DIR where DIR contains the folder "
                f"'{spec.dataset_dir}/' (layout: see docs/datasets.md, or run "
                f"`promptclip data prepare {spec.name} --root DIR`)"
            )
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise DataError(f"data root {root_path} does not exist or is not a directory")
    dataset_dir = spec.dataset_path(root_path)
    if not dataset_dir.is_dir():
        raise DataError(
            f"dataset folder {dataset_dir} not found for {spec.title}. Expected layout under the root:\n{spec.layout}\n"
            f"Run `promptclip data prepare {spec.name} --root {root_path}` or see docs/datasets.md"
        )
    image_dir = spec.image_path(root_path).resolve()
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} not found for {spec.title}. Expected layout:\n{spec.layout}")
    reader = {
        "split": _read_split_dataset,
        "fgvc": _read_fgvc,
        "imagenet": _read_imagenet,
        "imagenet_v2": _read_imagenet_v2,
        "imagenet_folders": _read_imagenet_folders,
        "imagenet_subset": _read_imagenet_folders,
    }[spec.reader]
    splits = reader(spec, dataset_dir.resolve(), image_dir, split_seed=split_seed, write_split=write_split)
    meta = {
        **splits.meta,
        "dataset": spec.name,
        "root": str(root_path),
        "fewshot_val": spec.fewshot_val,
        "fewshot_cache_dir": None if spec.bundled else str(dataset_dir.resolve() / "split_fewshot"),
    }
    return splits.replace(meta=meta)


# --------------------------------------------------------------------------------------------------------------------
# Split-file datasets and their generators
# --------------------------------------------------------------------------------------------------------------------


def _read_split_dataset(
    spec: DatasetSpec, dataset_dir: Path, image_dir: Path, *, split_seed: int, write_split: bool
) -> DatasetSplits:
    assert spec.split_file is not None
    split_path = dataset_dir / spec.split_file
    meta: dict = {"split_file": str(split_path)}
    if split_path.is_file():
        train, val, test = read_split(split_path, image_dir)
        meta["split_source"] = "file"
    elif spec.generator is not None:
        rng = random.Random(split_seed)
        train, val, test = _generate(spec, dataset_dir, image_dir, rng)
        meta.update(split_source="generated", split_seed=split_seed)
        if write_split:
            try:
                save_split_file(split_path, train, val, test)
                meta["split_source"] = "generated+saved"
            except OSError as e:
                warnings.warn(f"could not save the generated split to {split_path}: {e}", stacklevel=3)
    else:
        where = f" Download it from {spec.split_url} and put it in {dataset_dir}." if spec.split_url else ""
        raise DataError(
            f"split file {split_path} not found, and promptclip cannot generate the {spec.title} split "
            f"({spec.notes or 'no generator'}).{where}"
        )
    return _finish(spec.name, spec.template, spec.templates, train, val, test, image_dir, str(split_path), meta=meta)


def _generate(
    spec: DatasetSpec, dataset_dir: Path, image_dir: Path, rng: random.Random
) -> tuple[list[Record], list[Record], list[Record]]:
    if spec.generator == "folder":
        listing = _class_listing(image_dir, spec.ignored, spec.title)
        return split_by_class(listing, rng, str(image_dir), renames=spec.renames, source=spec.title)
    if spec.generator == "pets":
        trainval = _read_pets_list(dataset_dir / "annotations" / "trainval.txt", image_dir)
        test = _read_pets_list(dataset_dir / "annotations" / "test.txt", image_dir)
        train, val = split_trainval(trainval, rng, source=spec.title)
        return train, val, test
    if spec.generator == "sun397":
        names = _read_lines(dataset_dir / "ClassName.txt")
        cname2lab = {n.strip()[1:]: i for i, n in enumerate(names)}
        trainval = _read_sun397_list(dataset_dir / "Training_01.txt", cname2lab, image_dir)
        test = _read_sun397_list(dataset_dir / "Testing_01.txt", cname2lab, image_dir)
        train, val = split_trainval(trainval, rng, source=spec.title)
        return train, val, test
    if spec.generator == "ucf101":
        cname2lab = {}
        class_file = dataset_dir / "ucfTrainTestlist" / "classInd.txt"
        for n, line in enumerate(_read_lines(class_file), 1):
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                raise DataError(f"{class_file} line {n}: expected '<index> <ActionName>', got {line!r}")
            cname2lab[parts[1]] = int(parts[0]) - 1
        trainval = _read_ucf_list(dataset_dir / "ucfTrainTestlist" / "trainlist01.txt", cname2lab, image_dir)
        test = _read_ucf_list(dataset_dir / "ucfTrainTestlist" / "testlist01.txt", cname2lab, image_dir)
        train, val = split_trainval(trainval, rng, source=spec.title)
        return train, val, test
    raise AssertionError(spec.generator)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _rec(image_dir: Path, relpath: str, label: int, classname: str) -> Record:
    return Record(os.path.join(str(image_dir), *relpath.split("/")), label, classname, relpath)


def _read_pets_list(path: Path, image_dir: Path) -> list[Record]:
    out = []
    for n, line in enumerate(_read_lines(path), 1):
        parts = line.split(" ")
        if len(parts) != 4 or not parts[1].isdigit():
            raise DataError(f"{path} line {n}: expected 'IMAGE CLASS-ID SPECIES BREED-ID', got {line!r}")
        imname, label = parts[0], int(parts[1]) - 1
        breed = "_".join(imname.split("_")[:-1]).lower()
        out.append(_rec(image_dir, imname + ".jpg", label, breed))
    return out


def _read_sun397_list(path: Path, cname2lab: dict[str, int], image_dir: Path) -> list[Record]:
    out = []
    for n, line in enumerate(_read_lines(path), 1):
        imname = line[1:]  # drop the leading "/"
        folder = os.path.dirname(imname)
        if folder not in cname2lab:
            raise DataError(f"{path} line {n}: class {folder!r} is not in ClassName.txt")
        classname = " ".join(folder.split("/")[1:][::-1])  # drop the letter folder; "indoor"/"outdoor" first
        out.append(_rec(image_dir, imname, cname2lab[folder], classname))
    return out


def _read_ucf_list(path: Path, cname2lab: dict[str, int], image_dir: Path) -> list[Record]:
    out = []
    for n, line in enumerate(_read_lines(path), 1):
        video = line.split(" ")[0]
        if "/" not in video:
            raise DataError(f"{path} line {n}: expected 'Action/video.avi', got {line!r}")
        action, filename = video.split("/", 1)
        if action not in cname2lab:
            raise DataError(f"{path} line {n}: action {action!r} is not in classInd.txt")
        renamed = "_".join(re.findall("[A-Z][^A-Z]*", action))
        out.append(_rec(image_dir, f"{renamed}/{filename.replace('.avi', '.jpg')}", cname2lab[action], renamed))
    return out


def _read_fgvc(
    spec: DatasetSpec, dataset_dir: Path, image_dir: Path, *, split_seed: int, write_split: bool
) -> DatasetSplits:
    variants = _read_lines(dataset_dir / "variants.txt")
    cname2lab = {c: i for i, c in enumerate(variants)}
    parts = []
    for split in ("train", "val", "test"):
        path = dataset_dir / f"images_variant_{split}.txt"
        records = []
        for n, line in enumerate(_read_lines(path), 1):
            image_id, _, classname = line.partition(" ")
            if classname not in cname2lab:
                raise DataError(f"{path} line {n}: variant {classname!r} is not in variants.txt")
            records.append(_rec(image_dir, image_id + ".jpg", cname2lab[classname], classname))
        parts.append(records)
    train, val, test = parts
    # Labels and names come from variants.txt (CoOp's cname2lab), not from the records.
    return DatasetSplits(
        name=spec.name, train=train, val=val, test=test, classnames=list(variants), template=spec.template,
        templates=spec.templates, image_dir=str(image_dir), meta={"split_source": "fgvc txt files"},
    )


# --------------------------------------------------------------------------------------------------------------------
# ImageNet family
# --------------------------------------------------------------------------------------------------------------------


def _wnid_names(wnids: list[str], source: str) -> list[str]:
    table = imagenet_wnid_to_name()
    unknown = [w for w in wnids if w not in table]
    if unknown:
        raise DataError(f"{source}: folder(s) {unknown[:5]} are not ImageNet wnids")
    return [table[w] for w in wnids]


def _list_class_folders(image_dir: Path, folders: list[str], labels: list[int], names: list[str]) -> list[Record]:
    out = []
    for folder, label, name in zip(folders, labels, names, strict=True):
        files = list_images(image_dir / folder)
        if not files:
            raise DataError(f"class folder {image_dir / folder} contains no images")
        for f in files:
            out.append(Record(os.path.join(str(image_dir), folder, f), label, name, f"{folder}/{f}"))
    return out


def _read_imagenet(
    spec: DatasetSpec, dataset_dir: Path, image_dir: Path, *, split_seed: int, write_split: bool
) -> DatasetSplits:
    index_path = dataset_dir / "split_promptclip_ImageNet.json"
    if index_path.is_file():
        train, _, test = read_split(index_path, image_dir)
        source = "listing cache"
    else:
        folders = {}
        for part in ("train", "val"):
            if not (image_dir / part).is_dir():
                raise DataError(f"ImageNet: folder {image_dir / part} not found (expected images/train and images/val)")
            folders[part] = subdirs(image_dir / part)
        if folders["train"] != folders["val"]:
            diff = sorted(set(folders["train"]) ^ set(folders["val"]))
            raise DataError(f"ImageNet: images/train and images/val have different class folders, e.g. {diff[:5]}")
        wnids = folders["train"]
        names = _wnid_names(wnids, str(image_dir / "train"))
        labels = list(range(len(wnids)))
        train = _list_class_folders(image_dir / "train", wnids, labels, names)
        test = _list_class_folders(image_dir / "val", wnids, labels, names)
        train = [Record(r.path, r.label, r.classname, "train/" + r.relpath) for r in train]
        test = [Record(r.path, r.label, r.classname, "val/" + r.relpath) for r in test]
        source = "folder listing"
        if write_split:
            try:
                save_split_file(index_path, train, [], test)
            except OSError as e:
                warnings.warn(f"could not cache the ImageNet listing to {index_path}: {e}", stacklevel=3)
    splits = _finish(spec.name, spec.template, spec.templates, train, [], test, image_dir, str(dataset_dir),
                     meta={"split_source": source})
    wn = [r.relpath.split("/")[1] for r in _first_per_label(splits.train or splits.test, splits.num_classes)]
    return splits.replace(wnids=wn)


def _first_per_label(records: list[Record], n: int) -> list[Record]:
    first: dict[int, Record] = {}
    for r in records:
        first.setdefault(r.label, r)
    return [first[i] for i in range(n)]


def _read_imagenet_v2(
    spec: DatasetSpec, dataset_dir: Path, image_dir: Path, *, split_seed: int, write_split: bool
) -> DatasetSplits:
    wnids = imagenet_wnids()
    names = _wnid_names(wnids, "ImageNet-V2")
    missing = [str(i) for i in range(len(wnids)) if not (image_dir / str(i)).is_dir()]
    if missing:
        raise DataError(f"ImageNet-V2: class folder(s) {missing[:5]} missing in {image_dir} (expected 0 ... 999)")
    test = _list_class_folders(image_dir, [str(i) for i in range(len(wnids))], list(range(len(wnids))), names)
    splits = _finish(spec.name, spec.template, spec.templates, [], [], test, image_dir, str(image_dir),
                     meta={"split_source": "folder listing"})
    return splits.replace(classnames=names, wnids=wnids)


def _read_imagenet_folders(
    spec: DatasetSpec, dataset_dir: Path, image_dir: Path, *, split_seed: int, write_split: bool
) -> DatasetSplits:
    """ImageNet-Sketch / -A / -R: labels = sorted wnid folders present (CoOp's behaviour)."""
    wnids = subdirs(image_dir)
    if not wnids:
        raise DataError(f"{spec.title}: no class folders in {image_dir}")
    names = _wnid_names(wnids, str(image_dir))
    test = _list_class_folders(image_dir, wnids, list(range(len(wnids))), names)
    splits = _finish(spec.name, spec.template, spec.templates, [], [], test, image_dir, str(image_dir),
                     meta={"split_source": "folder listing"})
    splits = splits.replace(classnames=names, wnids=wnids)
    if spec.reader == "imagenet_subset":
        expected = imagenet_a_wnids() if spec.subset_wnids == "a" else imagenet_r_wnids()
        splits = splits.replace(
            imagenet_indices=imagenet_subset_indices(wnids),
            meta={**splits.meta, "matches_fixed_wnid_list": wnids == expected},
        )
    return splits
