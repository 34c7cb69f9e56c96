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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

from ..clip.transforms import to_rgb
from ..errors import DataError
from .records import Record

__all__ = ["ImageDataset", "TensorDataset", "make_loader", "PromptLoader", "SeededShuffleSampler",
           "ExplicitBatchSampler", "SkippedSample", "sample_seed", "collate_samples", "open_image"]

log = logging.getLogger("promptclip.data")

_SKIPPED_KEY = "__skipped__"


def sample_seed(seed: int, epoch: int, index: int, view: int = 0) -> int:
    """A 63-bit seed for one sample, mixed from (seed, epoch, index) with numpy's SeedSequence; ``view`` > 0 (the
    further augmented views of a multi-view dataset) mixes it in too, so view 0 keeps the single-view seed."""
    words = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch) & 0xFFFFFFFFFFFFFFFF, int(index) & 0xFFFFFFFFFFFFFFFF]
    if view:
        words.append(int(view) & 0xFFFFFFFFFFFFFFFF)
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

    Items are dicts: ``image`` (the transform's output), ``label`` (int; absent with ``labels=False``), ``index``
    (position in ``records``), ``path``, plus one entry per key of ``extras``. An extra is either a sequence aligned
    with ``records`` or a mapping keyed by the record's ``path`` or ``relpath`` (e.g. MuGCP captions); a missing key
    is a :class:`DataError`.

    ``views`` > 1 (methods with ``train_views``, e.g. CoPrompt): the image is transformed ``views`` times with
    independent generators seeded from (seed, epoch, index, view); items then also hold ``image_view2`` ..
    ``image_view{views}`` (``image`` is view 1, drawn exactly as in a single-view dataset).
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: Callable[..., Any],
        seed: int = 0,
        extras: Mapping[str, Sequence[Any] | Mapping[str, Any]] | None = None,
        on_error: str = "raise",
        views: int = 1,
        labels: bool = True,
    ) -> None:
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise DataError(f"views must be a positive int, got {views!r}")
        self.views = views
        if on_error not in ("raise", "skip"):
            raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not callable(transform):
            raise DataError("ImageDataset needs a transform: a callable transform(pil_image, generator=None)")
        self.records = list(records)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.on_error = on_error
        #: False: items carry no ``label`` (unlabelled training, ``PromptMethod.train_data``).
        self.labels = bool(labels)
        self.extras: dict[str, Sequence[Any] | Mapping[str, Any]] = dict(extras or {})
        for key, values in self.extras.items():
            if key in ("image", "label", "index", "path", _SKIPPED_KEY) or key.startswith("image_view"):
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

    def generator_for(self, index: int, view: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index, view))

    def _extra(self, key: str, index: int, rec: Record) -> Any:
        values = self.extras[key]
        if isinstance(values, Mapping):
            if rec.path in values:
                return values[rec.path]
            if rec.relpath in values:
                return values[rec.relpath]
            raise DataError(f"extra {key!r} has no entry for image {rec.relpath!r} ({rec.path})")
        return values[index]

    def fields(self, index: int) -> dict[str, Any]:
        """Every entry of item ``index`` except the image (which needs decoding): label, index, path, extras."""
        rec = self.records[index]
        item = {"label": rec.label, "index": index, "path": rec.path} if self.labels else {"index": index,
                                                                                          "path": rec.path}
        for key in self.extras:
            item[key] = self._extra(key, index, rec)
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        try:
            image = open_image(rec.path)
        except DataError as e:
            if self.on_error == "raise":
                raise
            return {_SKIPPED_KEY: SkippedSample(index, rec.path, str(e)), "index": index}
        item = {"image": self.transform(image, generator=self.generator_for(index))}
        for view in range(1, self.views):
            item[f"image_view{view + 1}"] = self.transform(image, generator=self.generator_for(index, view))
        return {**item, **self.fields(index)}


class TensorDataset(Dataset):
    """Images that are already tensors (preprocessed, normalised) with their labels, as batch-dict items:
    ``image``, ``label``, ``index``. For data that does not come from files (replays, features, tests).

    ``extras``: more per-sample tensors ``[N, ...]`` under their own keys, e.g. ``image_view2`` (a second augmented
    view, for methods with ``train_views = 2``)."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int] | torch.Tensor,
                 extras: Mapping[str, torch.Tensor] | None = None) -> None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels):
            raise DataError(f"TensorDataset needs images [N, 3, H, W] and labels [N], got {tuple(images.shape)} and "
                            f"{tuple(labels.shape)}")
        self.images, self.labels = images, labels
        self.extras = dict(extras or {})
        for key, values in self.extras.items():
            if key in ("image", "label", "index") or len(values) != len(labels):
                raise DataError(f"TensorDataset extra {key!r}: needs a key of its own and {len(labels)} rows, got "
                                f"{len(values)}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"image": self.images[index], "label": int(self.labels[index]), "index": index}
        item.update({key: values[index] for key, values in self.extras.items()})
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


class ExplicitBatchSampler(Sampler[list[int]]):
    """Batches given as index lists: ``order[e][k]`` is the list of dataset indices of batch ``k`` of epoch ``e``.

    Replays another run's exact order (e.g. a reference trainer's), or a curriculum. Batch sizes are the lists'
    lengths; nothing is shuffled or dropped. Data-parallel (``rank``/``world_size``): each listed batch is a global
    batch, dealt to the ranks as ``batch[rank::world_size]`` (the same rule as :class:`ShardedSeededSampler`).
    """

    def __init__(self, order: Sequence[Sequence[Sequence[int]]], dataset_size: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.order = check_batch_order(order, dataset_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if not 0 <= epoch < len(self.order):
            raise DataError(f"the batch order has {len(self.order)} epoch(s); epoch {epoch + 1} has no batches")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.order[self.epoch])

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.order[self.epoch]:
            yield list(batch[self.rank::self.world_size])


def check_batch_order(order: Any, dataset_size: int, where: str = "batch order") -> list[list[list[int]]]:
    """``order`` as plain lists, or a :class:`DataError` naming the first bad epoch, batch or index."""
    if not isinstance(order, Sequence) or isinstance(order, str) or not order:
        raise DataError(f"{where}: expected a non-empty list of epochs, each a list of batches of dataset indices")
    checked = []
    for e, epoch in enumerate(order):
        if not isinstance(epoch, Sequence) or isinstance(epoch, str) or not epoch:
            raise DataError(f"{where}: epoch {e + 1} must be a non-empty list of batches")
        batches = []
        for k, batch in enumerate(epoch):
            if not isinstance(batch, Sequence) or isinstance(batch, str) or not batch:
                raise DataError(f"{where}: epoch {e + 1}, batch {k + 1} must be a non-empty list of indices")
            for i in batch:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < dataset_size:
                    raise DataError(f"{where}: epoch {e + 1}, batch {k + 1} has index {i!r}; the dataset has "
                                    f"{dataset_size} samples (indices 0..{dataset_size - 1})")
            batches.append([int(i) for i in batch])
        checked.append(batches)
    return checked


def read_batch_order(path: str | Path) -> list[list[list[int]]]:
    """A batch order from JSON: ``[[[i, ...], ...], ...]`` (epochs of batches of dataset indices), or an object with
    that list under ``orders`` or ``trajectory.orders`` (as the reference trajectory goldens store it)."""
    import json

    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"batch order file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read batch order file {path}: {e}") from None
    if isinstance(value, dict):
        if "orders" not in value and isinstance(value.get("trajectory"), dict):
            value = value["trajectory"]
        if "orders" not in value:
            raise DataError(f"batch order file {path}: an object needs the key 'orders'; it has "
                            f"{', '.join(sorted(value)) or 'no keys'}")
        value = value["orders"]
    if not isinstance(value, list):
        raise DataError(f"batch order file {path}: expected a JSON list of epochs")
    return value


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
        if hasattr(self.batch_sampler, "set_epoch"):  # len(loader) is then the epoch's number of batches
            self.batch_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        for sampler in (self.sampler, self.batch_sampler):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        return self._passes(super().__iter__())

    def _passes(self, it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        skipped: list[SkippedSample] = []
        self.skipped = skipped
        finished = False
        try:
            for batch in it:
                skipped.extend(batch.pop("skipped", []))
                if _empty(batch):  # every sample of the batch was skipped
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


def _empty(batch: dict[str, Any]) -> bool:
    """Whether a collated batch holds no sample (labels are absent in unlabelled training, indices in some datasets)."""
    for key in ("index", "label"):
        if key in batch:
            return batch[key].numel() == 0
    return batch.get("image") is None


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
