"""The order of rows: datasets as in the papers' tables, then variants; methods in a fixed order, then others."""

from __future__ import annotations

from ..published import DG_TARGETS, STANDARD_DATASETS, canonical_dataset

#: Variant / extra datasets, listed after the 11 standard ones.
VARIANT_DATASETS: tuple[str, ...] = DG_TARGETS + ("eurosat-sample",)
#: Methods in table order; others follow alphabetically.
METHOD_ORDER: tuple[str, ...] = (
    "zeroshot", "coop", "cocoop", "kgcoop", "vpt", "ivlp", "maple", "promptsrc", "dcp", "mugcp",
)


def dataset_sort_key(name: str) -> tuple:
    """The 11 standard datasets in the papers' order, then the variants (ImageNet shifts, eurosat-sample), then
    others alphabetically."""
    canon = canonical_dataset(name)
    if canon in STANDARD_DATASETS:
        return (0, STANDARD_DATASETS.index(canon), name)
    if canon in VARIANT_DATASETS:
        return (1, VARIANT_DATASETS.index(canon), name)
    return (2, 0, name.lower(), name)


def method_sort_key(method: str, label: str = "") -> tuple:
    """Methods in :data:`METHOD_ORDER`, then others alphabetically; labels alphabetically within a method."""
    m = method.lower()
    rank = METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, m, label)
