"""Records -> ``torch.utils.data.Dataset`` -> ``DataLoader``, with explicit, worker-independent randomness.

* Every sample gets its own ``torch.Generator`` seeded from ``(seed, epoch, index)``; the transform is called as
  ``transform(pil_image, generator=g)``. Augmentation therefore depends neither on the number of workers nor on the
  order in which samples are fetched, and the global RNGs are never touched.
* Shuffling uses a permutation drawn from a generator seeded from ``(seed, epoch)``, so epoch ``e`` has the same
  order whether or not earlier epochs ran (resume-safe).
* A missing or undecodable image raises :class:`DataError` naming the file. With ``on_error="skip"`` the sample is
  dropped inside the batch's collate function (its label goes with it, so labels never shift), counted, and reported
  at the end of the pass (``loader.skipped`` and a warning).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

from ..clip.transforms import to_rgb
from ..errors import DataError
from .records import Record

__all__ = ["ImageDataset", "make_loader", "PromptLoader", "SeededShuffleSampler", "SkippedSample", "sample_seed",
           "collate_samples", "open_image"]

log = logging.getLogger("promptclip.data")

_SKIPPED_KEY = "__skipped__"


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample, mixed from (seed, epoch, index) with numpy's SeedSequence."""
    words = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch) & 0xFFFFFFFFFFFFFFFF, int(index) & 0xFFFFFFFFFFFFFFFF]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & 0x7FFFFFFFFFFFFFFF


def open_image(path: str) -> Image.Image:
    """Open and fully decode an image as RGB; :class:`DataError` naming the file on any failure."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class SkippedSample:
    index: int
    path: str
    reason: str


class ImageDataset(Dataset):
    """A map-style dataset over records.

    Items are dicts: ``image`` (the transform's output), ``label`` (int), ``index`` (position in ``records``),
    ``path``, plus one entry per key of ``extras``. An extra is either a sequence aligned with ``records`` or a
    mapping keyed by the record's ``path`` or ``relpath`` (e.g. MuGCP captions); a missing key is a :class:`DataError`.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: Callable[..., Any],
        seed: int = 0,
        extras: Mapping[str, Sequence[Any] | Mapping[str, Any]] | None = None,
        on_error: str = "raise",
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not callable(transform):
            raise DataError("ImageDataset needs a transform: a callable transform(pil_image, generator=None)")
        self.records = list(records)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.on_error = on_error
        self.extras: dict[str, Sequence[Any] | Mapping[str, Any]] = dict(extras or {})
        for key, values in self.extras.items():
            if key in ("image", "label", "index", "path", _SKIPPED_KEY):
                raise DataError(f"extra key {key!r} clashes with a built-in field")
            if not isinstance(values, Mapping) and len(values) != len(self.records):
                raise DataError(
                    f"extra {key!r} has {len(values)} values for {len(self.records)} records; pass a sequence aligned "
                    "with the records or a mapping keyed by path or relpath"
                )

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def generator_for(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))

    def _extra(self, key: str, index: int, rec: Record) -> Any:
        values = self.extras[key]
        if isinstance(values, Mapping):
            if rec.path in values:
                return values[rec.path]
            if rec.relpath in values:
                return values[rec.relpath]
            raise DataError(f"extra {key!r} has no entry for image {rec.relpath!r} ({rec.path})")
        return values[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        try:
            image = open_image(rec.path)
        except DataError as e:
            if self.on_error == "raise":
                raise
            return {_SKIPPED_KEY: SkippedSample(index, rec.path, str(e)), "index": index}
        item = {
            "image": self.transform(image, generator=self.generator_for(index)),
            "label": rec.label,
            "index": index,
            "path": rec.path,
        }
        for key in self.extras:
            item[key] = self._extra(key, index, rec)
        return item


def collate_samples(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images, labels and indices; keep paths and non-tensor extras as lists; drop skipped samples."""
    skipped = [it[_SKIPPED_KEY] for it in items if _SKIPPED_KEY in it]
    kept = [it for it in items if _SKIPPED_KEY not in it]
    batch: dict[str, Any] = {"skipped": skipped}
    if not kept:
        batch.update(image=None, label=torch.empty(0, dtype=torch.long), index=torch.empty(0, dtype=torch.long),
                     path=[])
        return batch
    for key in kept[0]:
        values = [it[key] for it in kept]
        if key in ("label", "index"):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = torch.stack(values)
        elif key != "path" and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class SeededShuffleSampler(Sampler[int]):
    """A fresh random permutation per epoch from a generator seeded with (seed, epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        return iter(torch.randperm(self.n, generator=g).tolist())


class PromptLoader(DataLoader):
    """A ``DataLoader`` that drives epochs explicitly and reports skipped images.

    Each pass uses the epoch last given to :meth:`set_epoch`, or one more than the previous pass.
    ``skipped`` lists the samples dropped in the last pass (``on_error="skip"``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_epoch = 0
        self.epoch = 0
        self.skipped: list[SkippedSample] = []

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        return self._passes(super().__iter__())

    def _passes(self, it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        skipped: list[SkippedSample] = []
        self.skipped = skipped
        finished = False
        try:
            for batch in it:
                skipped.extend(batch.pop("skipped", []))
                if batch["label"].numel() == 0:
                    continue
                yield batch
            finished = True
        finally:
            if not finished:
                # An error (or an abandoned pass) would otherwise leave the worker processes to the cyclic garbage
                # collector, which can tear their queues down first and then wait seconds for them to exit.
                shutdown = getattr(it, "_shutdown_workers", None)
                if callable(shutdown):
                    shutdown()
        if skipped:
            shown = "; ".join(f"{s.path} ({s.reason})" for s in skipped[:5])
            more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
            msg = f"skipped {len(skipped)} of {len(self.dataset)} images in epoch {self.epoch}: {shown}{more}"
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    **kwargs: Any,
) -> PromptLoader:
    """A loader whose order and augmentation depend only on ``seed`` and the epoch, never on ``num_workers``."""
    sampler: Sampler[int] = SeededShuffleSampler(len(dataset), seed) if shuffle else SequentialSampler(dataset)
    return PromptLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_samples,
        generator=torch.Generator().manual_seed(sample_seed(seed, 0, -2)),
        **kwargs,
    )
