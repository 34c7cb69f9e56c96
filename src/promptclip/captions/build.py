"""Building a caption cache (batched, resumable) and verifying one against a dataset."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError, DataError
from .leak import LeakReport, leak_report
from .store import CacheWriter, CaptionSet, load_captions, provenance_key, read_caption_file

__all__ = ["ImageItem", "Captioner", "BuildResult", "build_captions", "dataset_items", "image_items",
           "CoverageReport", "verify_captions", "SPLITS"]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageItem:
    """One image to caption: its cache ``key`` (dataset relpath, or the absolute path), file path, dataset name."""

    key: str
    path: str
    dataset: str = ""


class Captioner(Protocol):
    @property
    def provenance(self) -> dict[str, Any]: ...

    def caption(self, images: Sequence[Any]) -> list[str]: ...


def dataset_items(name: str, root: str | None = None, splits: Sequence[str] = SPLITS) -> list[ImageItem]:
    """Every image of the chosen splits of a dataset (each once), keyed by its dataset-relative path."""
    from ..data import load_splits

    data = load_splits(name, root)
    items, seen = [], set()
    for which in splits:
        for rec in data.split(which):
            if rec.relpath not in seen:
                seen.add(rec.relpath)
                items.append(ImageItem(rec.relpath, rec.path, data.name))
    return items


def image_items(paths: Iterable[str | Path]) -> list[ImageItem]:
    """Image files or folders (recursively) outside a dataset, keyed by absolute path (for ``predict``)."""
    from ..data.files import IMAGE_EXTENSIONS

    items = []
    for item in paths:
        p = Path(item).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                           and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise DataError(f"folder {p} holds no image files")
        elif p.is_file():
            files = [p]
        else:
            raise DataError(f"image {p} does not exist")
        for f in files:
            resolved = str(f.resolve()).replace("\\", "/")
            items.append(ImageItem(resolved, resolved))
    return items


@dataclass
class BuildResult:
    path: Path
    total: int
    already: int
    generated: int
    seconds: float

    def __str__(self) -> str:
        rate = f", {self.generated / self.seconds:.2f} images/s" if self.generated and self.seconds > 0 else ""
        return (f"captions: {self.path}: {self.total} images, {self.already} already cached, {self.generated} "
                f"generated in {self.seconds:.1f} s{rate}")


def _check_provenance(out: Path, expected: dict[str, Any]) -> set[str]:
    """Keys already captioned in ``out`` by the same configuration; an error if the file holds another one."""
    if not out.exists():
        return set()
    entries = read_caption_file(out)
    want = provenance_key(expected)
    other = [e for e in entries if e.provenance != want]
    if other:
        theirs = {k: other[0].meta.get(k) for k in ("model", "instruction_sha256", "prompt_style", "generation")}
        raise ConfigError(
            f"{out} holds {len(other)} captions made with another configuration ({theirs}, first at "
            f"{other[0].origin}); this run uses {({k: expected[k] for k in theirs})}. A cache holds one "
            "configuration: write to another --out (or delete the file to start over)"
        )
    return {e.key for e in entries}


def build_captions(items: Sequence[ImageItem], out: str | Path, captioner: Captioner, batch_size: int = 8,
                   progress: bool = True, on_batch: Callable[[int], None] | None = None) -> BuildResult:
    """Caption every item not yet in ``out`` and append them batch by batch (flushed, fsynced).

    Rerunning after a kill continues where it stopped: finished captions are kept, none is generated twice.
    ``on_batch(n_done)`` runs after each appended batch.
    """
    from tqdm.auto import tqdm

    from ..data.loader import open_image

    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    out = Path(out)
    provenance = dict(captioner.provenance)
    done = _check_provenance(out, provenance)
    unique: dict[str, ImageItem] = {}
    for item in items:
        unique.setdefault(item.key, item)
    todo = [item for key, item in unique.items() if key not in done]
    already = len(unique) - len(todo)
    started = time.perf_counter()
    generated = 0
    bar = tqdm(total=len(todo), desc="captions", unit="img", disable=not progress, leave=False)
    try:
        with CacheWriter(out) as writer:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                captions = captioner.caption([open_image(item.path) for item in chunk])
                if len(captions) != len(chunk):
                    raise RuntimeError(f"the captioner returned {len(captions)} captions for {len(chunk)} images")
                created = time.strftime("%Y-%m-%dT%H:%M:%S")
                writer.append([{"key": item.key, "path": item.path, "dataset": item.dataset, "caption": caption,
                                **provenance, "created": created} for item, caption in zip(chunk, captions,
                                                                                            strict=True)])
                generated += len(chunk)
                bar.update(len(chunk))
                if on_batch is not None:
                    on_batch(generated)
    finally:
        bar.close()
    return BuildResult(out, len(unique), already, generated, round(time.perf_counter() - started, 3))


@dataclass
class CoverageReport:
    dataset: str
    files: list[str]
    #: split -> (captioned, total)
    coverage: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: split -> relpaths of images without a caption (first few)
    missing: dict[str, list[str]] = field(default_factory=dict)
    #: entries of this dataset whose image file does not exist
    absent_images: list[str] = field(default_factory=list)
    #: provenance (model, instruction hash, ...) -> number of entries, over the whole file(s)
    provenances: dict[str, int] = field(default_factory=dict)
    #: entries whose provenance differs from the expected one (or from the majority)
    mismatched: int = 0
    expected: str | None = None
    empty: int = 0
    leak: LeakReport | None = None

    @property
    def complete(self) -> bool:
        return all(c == t for c, t in self.coverage.values())

    @property
    def ok(self) -> bool:
        return self.complete and not self.absent_images and not self.mismatched

    def __str__(self) -> str:
        lines = [f"captions {', '.join(self.files)} for dataset {self.dataset}:"]
        for split, (n, total) in self.coverage.items():
            line = f"  {split:5s} {n}/{total} images captioned"
            if n < total:
                shown = ", ".join(self.missing[split][:3])
                line += f" - MISSING {total - n} (e.g. {shown})"
            lines.append(line)
        if self.absent_images:
            lines.append(f"  {len(self.absent_images)} captioned images do not exist on disk (e.g. "
                         f"{', '.join(self.absent_images[:3])})")
        if self.empty:
            lines.append(f"  {self.empty} empty captions")
        lines.append(f"  provenance: {len(self.provenances)} configuration(s)")
        for prov, count in self.provenances.items():
            lines.append(f"    {count} x {prov}")
        if self.mismatched:
            what = "the expected configuration" if self.expected else "the majority configuration"
            lines.append(f"  PROVENANCE MISMATCH: {self.mismatched} captions differ from {what}")
        if self.leak is not None:
            lines.append("  " + str(self.leak).replace("\n", "\n  "))
        lines.append("  OK" if self.ok else "  NOT OK")
        return "\n".join(lines)


def verify_captions(captions: CaptionSet | str | Path | Sequence[str | Path], dataset: str,
                    root: str | None = None, splits: Sequence[str] = SPLITS,
                    expected: dict[str, Any] | None = None, leak: bool = True) -> CoverageReport:
    """Coverage of a dataset's splits, captioned images missing on disk, provenance mismatches, label leakage.

    ``expected``: the provenance fields the captions must have (e.g. ``{"model": ...}``); unspecified fields are
    not checked. Without it, entries that differ from the most common provenance count as mismatched.
    """
    from ..data import load_splits

    if not isinstance(captions, CaptionSet):
        captions = load_captions(captions)
    data = load_splits(dataset, root)
    report = CoverageReport(dataset=data.name, files=list(captions.files))
    checked = []
    for which in splits:
        records = data.split(which)
        n, missing = captions.covered(records)
        report.coverage[which] = (n, len(records))
        report.missing[which] = [r.relpath for r in missing[:20]]
        checked.extend(records)
    image_dir = Path(data.image_dir) if data.image_dir else None
    for entry in captions.entries.values():
        # Only entries built for this dataset are checked: user files carry no dataset name, and their other
        # entries may belong to other datasets.
        if entry.dataset != data.name:
            continue
        candidates = [Path(entry.path)] if entry.path else []
        if image_dir is not None:
            candidates.append(image_dir / entry.key)
        if not any(c.exists() for c in candidates):
            report.absent_images.append(entry.key)
    report.empty = sum(1 for r in checked if (c := captions.lookup(r)) is not None and not c.strip())
    counts = captions.provenances()
    report.provenances = dict(counts.most_common())
    if expected:
        report.expected = str(expected)
        report.mismatched = sum(
            1 for e in captions.entries.values()
            if any(e.meta.get(k) != v for k, v in expected.items()))
    elif counts:
        report.mismatched = sum(counts.values()) - counts.most_common(1)[0][1]
    if leak:
        report.leak = leak_report(checked, captions, data.classnames)
    return report
