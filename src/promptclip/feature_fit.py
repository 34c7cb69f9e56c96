"""Fits on frozen image features: methods that only read the frozen image tower's output (cache models, linear
probes, feature adapters) are fitted by their :meth:`~promptclip.methods.base.PromptMethod.fit_features` instead of
the epoch loop of :func:`promptclip.train.fit`, which dispatches here for methods with ``fits_on_features``.

What the method gets (:class:`FeatureFitData`):

- ``views(start, count)``: raw image features ``[count, N, D]`` of augmented views ``start .. start+count-1`` of
  the training images. View ``v`` of an image is the training transform drawn with a generator seeded from
  (image file, augmentation seed, ``v``) only, so it is the same whatever the shot count, the image's position or
  the method; with a :class:`~promptclip.features.FeatureCache` each (image, seed, view) is encoded once across a
  grid (the view's key is derived from the image's key, the seed and the view index).
- ``labels`` ``[N]``; ``split(name)``: raw features and labels of an evaluation split (``val``, ``test``), encoded
  on first use (cached like evaluation features);
- ``batch_order(epoch, n)``: the batches of an epoch (seeded shuffle or the run's explicit ``batch_order``);
- ``config``: the run's :class:`~promptclip.train.TrainConfig`; ``log_step`` / ``log_record``: the run's metrics.

Whatever the method learns (cache keys and values, searched hyperparameters, weights) is its adapter state, so
evaluation, prediction and adapter files work as for every other method; its ``fit_features`` return value (a JSON
summary, e.g. a hyperparameter search's result) goes into the adapter's JSON (``fit``) and the run's history.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from . import features as feature_cache_api
from .checkpoint import atomic_write_text, save_adapter
from .config import to_dict
from .errors import PromptClipError
from .evaluate import move_batch
from .precision import autocast
from .tracking import RunLog

#: The fit's summary (e.g. a search's result, views encoded vs cached) in the run directory; also in the adapter JSON.
FIT_FILE = "fit.json"


def view_key(image_key: bytes, seed: int, view: int) -> bytes:
    """The 16-byte cache key of view ``view`` of an image under augmentation seed ``seed``."""
    digest = hashlib.blake2b(digest_size=feature_cache_api.KEY_BYTES, person=b"promptclip-view")
    digest.update(image_key)
    digest.update(int(seed).to_bytes(8, "little", signed=True))
    digest.update(int(view).to_bytes(8, "little", signed=False))
    return digest.digest()


def view_generator(key: bytes) -> torch.Generator:
    """The augmentation generator of a view: a function of its key only."""
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & 0x7FFFFFFFFFFFFFFF)


@dataclass
class ViewStats:
    encoded: int = 0
    cached: int = 0

    def __str__(self) -> str:
        return f"{self.encoded} encoded, {self.cached} from the cache"


class TrainViews:
    """Augmented views of a training dataset, encoded by a frozen image tower, through a feature cache.

    ``dataset``: an :class:`~promptclip.data.ImageDataset` (records + transform); any other dataset of batch dicts
    with ``image`` has a single view per image (its items as they are)."""

    def __init__(self, model, dataset: Dataset, seed: int, batch_size: int, device: torch.device,
                 precision: str = "fp32", cache: feature_cache_api.FeatureCache | None = None,
                 fingerprint: str = "unknown"):
        self.model, self.dataset, self.seed = model, dataset, int(seed)
        self.batch_size, self.device, self.precision = batch_size, device, precision
        self.cache = cache
        self.stats = ViewStats()
        self.augmented = hasattr(dataset, "records") and hasattr(dataset, "transform")
        self.space = (feature_cache_api.namespace(fingerprint, dataset.transform, precision, device)
                      if self.augmented and cache is not None else None)
        self._image_keys: list[bytes] | None = None
        self._memo: dict[int, torch.Tensor] = {}

    def image_keys(self) -> list[bytes]:
        if self._image_keys is None:
            self._image_keys = [feature_cache_api.image_key(r.path) for r in self.dataset.records]
        return self._image_keys

    def labels(self) -> torch.Tensor:
        if hasattr(self.dataset, "records"):
            return torch.tensor([r.label for r in self.dataset.records], dtype=torch.long)
        return torch.tensor([int(self.dataset[i]["label"]) for i in range(len(self.dataset))], dtype=torch.long)

    def __call__(self, start: int, count: int) -> torch.Tensor:
        return torch.stack([self.view(v) for v in range(start, start + count)])

    def view(self, v: int) -> torch.Tensor:
        if not self.augmented:
            v = 0
        if v not in self._memo:
            self._memo[v] = self._encode_view(v)
        return self._memo[v]

    def _encode(self, images: list[torch.Tensor]) -> torch.Tensor:
        out = []
        self.model.eval()
        with torch.no_grad(), autocast(self.precision, self.device):
            for i in range(0, len(images), self.batch_size):
                batch = torch.stack(images[i:i + self.batch_size]).to(self.device)
                out.append(self.model.encode_image(batch).float().cpu())
        return torch.cat(out)

    def _encode_view(self, v: int) -> torch.Tensor:
        data = self.dataset
        if not self.augmented:
            feats = self._encode([move_batch(data[i], torch.device("cpu"))["image"] for i in range(len(data))])
            self.stats.encoded += len(data)
            return feats
        from .data.loader import open_image

        keys = [view_key(k, self.seed, v) for k in self.image_keys()]
        found = self.cache.lookup(self.space, set(keys)) if self.space is not None else {}
        todo = [i for i, k in enumerate(keys) if k not in found]
        if todo:
            images = [data.transform(open_image(data.records[i].path), generator=view_generator(keys[i]))
                      for i in todo]
            encoded = self._encode(images)
            if self.space is not None:
                self.cache.store(self.space, [keys[i] for i in todo], encoded)
            found.update({keys[i]: encoded[row] for row, i in enumerate(todo)})
        self.stats.encoded += len(todo)
        self.stats.cached += len(keys) - len(todo)
        return torch.stack([found[k].float() for k in keys])


def encode_split(model, dataset: Dataset, batch_size: int, device: torch.device, precision: str,
                 cache: feature_cache_api.FeatureCache | None, fingerprint: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw frozen features ``[M, D]`` and labels of an evaluation dataset (through the feature cache if given)."""
    if cache is not None and hasattr(dataset, "records"):
        cached = feature_cache_api.frozen_features(model, dataset, cache, fingerprint, batch_size=batch_size,
                                                   device=device, precision=precision, progress=False)
        if cached is not None:
            features = cached[0].features
            labels = torch.tensor([r.label for r in dataset.records], dtype=torch.long)
            return torch.stack([features[i].float() for i in range(len(dataset))]), labels
    items = [dataset[i] for i in range(len(dataset))]
    views = TrainViews(model, dataset, 0, batch_size, device, precision)
    features = views._encode([item["image"] for item in items])
    return features, torch.tensor([int(item["label"]) for item in items], dtype=torch.long)


@dataclass
class FeatureFitData:
    """What :meth:`PromptMethod.fit_features` reads (module docstring). Tests build it from stored features."""

    views: Callable[[int, int], torch.Tensor]
    labels: torch.Tensor
    splits: Mapping[str, Callable[[], tuple[torch.Tensor, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor]]
    config: Any
    explicit_order: Sequence[Sequence[Sequence[int]]] | None = None
    step_log: Callable[[dict[str, Any]], None] | None = None
    epoch_log: Callable[[int, Any], None] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.splits:
            raise PromptClipError(f"this fit needs the {name!r} split's features, and the run has none "
                                  f"(it has: {', '.join(self.splits) or 'none'})")
        value = self.splits[name]
        if callable(value):
            value = value()
            self.splits = {**self.splits, name: value}
        return value

    def batch_order(self, epoch: int, n: int) -> list[list[int]]:
        """Batches of ``epoch``: the explicit order if the run has one, else a shuffle seeded by (seed, epoch);
        the last batch may be smaller (nothing is dropped)."""
        if self.explicit_order is not None:
            return [list(b) for b in self.explicit_order[epoch]]
        from .data.loader import sample_seed

        generator = torch.Generator().manual_seed(sample_seed(self.config.seed, epoch, -1))
        order = torch.randperm(n, generator=generator).tolist()
        size = self.config.batch_size
        return [order[i:i + size] for i in range(0, n, size)]

    def log_step(self, record: dict[str, Any]) -> None:
        if self.step_log is not None:
            self.step_log(record)

    def log_record(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def on_epoch_end(self, epoch: int, method) -> None:
        if self.epoch_log is not None:
            self.epoch_log(epoch, method)


def fit_on_features(method, train_data: Dataset, config, out_dir: str | Path | None = None,
                    device: str | torch.device = "cpu", backbone_name: str = "unknown",
                    backbone_fingerprint: str = "unknown",
                    on_step: Callable[[dict[str, Any]], None] | None = None,
                    batch_order: Sequence[Sequence[Sequence[int]]] | None = None, trackers: Sequence[str] = (),
                    run_name: str | None = None, eval_data: Mapping[str, Dataset] | None = None,
                    feature_cache: feature_cache_api.FeatureCache | None = None,
                    log: Callable[[str], None] | None = None):
    """Fit a ``fits_on_features`` method (module docstring); returns a :class:`promptclip.train.FitResult`."""
    from .checkpoint import ADAPTER_STEM, FitResult
    from .precision import resolve_precision

    device = torch.device(device)
    method.to(device)
    precision = resolve_precision(config.precision, device)
    views = TrainViews(method.clip, train_data, config.seed, config.batch_size, device, precision, feature_cache,
                       backbone_fingerprint)

    def split_loader(dataset):
        return lambda: encode_split(method.clip, dataset, config.batch_size, device, precision, feature_cache,
                                    backbone_fingerprint)

    out = Path(out_dir) if out_dir is not None else None
    run_log = None
    if out is not None:
        run_log = RunLog(out, 0, 0, trackers, run_name or out.name,
                         {"method": method.name, "method_config": to_dict(method.config), "train": to_dict(config)})

    def step_done(record: dict[str, Any]) -> None:
        if run_log is not None:
            run_log.step(record)
        if on_step is not None:
            on_step(record)

    data = FeatureFitData(views, views.labels(), {k: split_loader(v) for k, v in (eval_data or {}).items()},
                          config, batch_order, step_done)
    with contextlib.ExitStack() as stack:
        if run_log is not None:
            stack.enter_context(run_log)
        summary = method.fit_features(data)
        summary = {**summary, "train_views": {"encoded": views.stats.encoded, "cached": views.stats.cached}}
        if log is not None:
            log(f"{method.name}: training views {views.stats}")
        history = [{"epoch": 1, "fit": summary}]
    result = FitResult(history=history)
    if out is not None:
        atomic_write_text(out / FIT_FILE, json.dumps(summary, indent=2) + "\n")
        result.adapter_path = out / f"{ADAPTER_STEM}.safetensors"
        save_adapter(out / ADAPTER_STEM, method, backbone_name, backbone_fingerprint,
                     extra={"train": to_dict(config), "fit": summary, "history": history})
    return result
