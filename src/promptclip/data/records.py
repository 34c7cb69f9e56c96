"""The two value types every protocol works on: one labelled image (`Record`) and a dataset's three splits."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from .classnames import check_classnames

__all__ = ["Record", "DatasetSplits", "classnames_from_records"]


@dataclass(frozen=True)
class Record:
    """One labelled image.

    ``path`` is the absolute path used to open the image; ``relpath`` is the path relative to the dataset's image
    directory with ``/`` separators (the key used in split files and few-shot caches).
    """

    path: str
    label: int
    classname: str
    relpath: str


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train / val / test records and the class names in label order.

    ``template`` is the dataset's zero-shot template and ``templates`` the ensemble of CoOp's ``ZeroshotCLIP2``.
    ``wnids`` (ImageNet family) gives the WordNet id of every label; ``imagenet_indices`` gives, for datasets whose
    classes are a subset of ImageNet's 1000 (ImageNet-A/-R), the ImageNet label of every label.
    """

    name: str
    train: list[Record]
    val: list[Record]
    test: list[Record]
    classnames: list[str]
    template: str
    templates: tuple[str, ...]
    image_dir: str = ""
    wnids: list[str] | None = None
    imagenet_indices: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.classnames:
            where = f"dataset {self.name}" + (f" ({self.image_dir})" if self.image_dir else "")
            check_classnames(self.classnames, where, DataError)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def nonempty(self, which: str) -> list[Record]:
        """The records of split ``which``, or a DataError when it has none (a command that needs them)."""
        records = self.split(which)
        if not records:
            subsample = self.meta.get("subsample")
            part = f" ({subsample} classes)" if subsample else ""
            raise DataError(f"dataset {self.name}{part} has no {which} images ({self.image_dir or 'no image folder'}; "
                            f"split sizes {self.counts()}): check its split, or use a dataset with {which} images")
        return records

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def replace(self, **changes: Any) -> DatasetSplits:
        return dataclasses.replace(self, **changes)

    def split(self, which: str) -> list[Record]:
        if which not in ("train", "val", "test"):
            raise DataError(f"unknown split {which!r}: use 'train', 'val' or 'test'")
        return getattr(self, which)

    def __repr__(self) -> str:  # the record lists are long; keep the repr readable
        c = self.counts()
        return (
            f"DatasetSplits(name={self.name!r}, classes={self.num_classes}, train={c['train']}, val={c['val']}, "
            f"test={c['test']}, template={self.template!r})"
        )


def classnames_from_records(groups: Iterable[Sequence[Record]], source: str) -> list[str]:
    """Class names in label order, checked: one name per label, labels exactly 0..n-1.

    ``source`` names the file or dataset in error messages.
    """
    names: dict[int, str] = {}
    for records in groups:
        for r in records:
            known = names.setdefault(r.label, r.classname)
            if known != r.classname:
                raise DataError(
                    f"{source}: label {r.label} has two class names, {known!r} and {r.classname!r} "
                    f"(first conflicting entry: {r.relpath!r})"
                )
    if not names:
        return []
    labels = sorted(names)
    if labels[0] < 0 or labels != list(range(len(labels))):
        missing = sorted(set(range(max(labels[-1] + 1, 0))) - set(labels))
        raise DataError(
            f"{source}: labels must be the integers 0..n-1 without gaps; found labels {labels[0]}..{labels[-1]}"
            + (f", missing {missing[:10]}" if missing else "")
        )
    return [names[i] for i in labels]
