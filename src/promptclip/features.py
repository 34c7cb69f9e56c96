"""Frozen image features, cached on disk: each test image goes through a frozen image tower once per backbone,
transform and precision, however many methods, seeds and commands evaluate on it.

It serves the methods that declare ``frozen_image_features`` (zero-shot, CoOp, CoCoOp, KgCoOp, and any plugin that
says so): their image features are ``clip.encode_image(image)``, untouched by anything learned, so evaluation gives
them ``image_features`` from here instead of images (CoCoOp still runs its own image-conditioned text path on them).
Protocol grids and ``promptclip eval`` use it unless it is turned off (``--feature-cache off``,
``RunOptions(feature_cache=None)``).

Keys — a cached feature is never stale:

- the **namespace** (one directory, described by its ``namespace.json``): backbone fingerprint, the evaluation
  transform (its dataclass ``repr``), the resolved precision, the device type and CPU matmul kernel, the torch and
  promptclip versions, and this module's ``FORMAT``; a dataset whose transform is not a dataclass is not cached;
- the **image**: BLAKE2b-128 of the file's bytes. A changed file is a new key and is encoded again; a copied or
  moved one still hits. Hashing reads each file but decodes nothing: far cheaper than decoding and encoding it.

Layout: ``ROOT/<namespace>/<chunk>.safetensors`` with ``keys`` (uint8 ``[N, 16]``) and ``features`` (``[N, D]`` in
the dtype the tower produced, so a hit returns the very values an encoding would); the file's metadata holds the
chunk ``format`` and a BLAKE2b-128 ``checksum`` of the keys and features (dtype, shape and bytes), verified on every
read. A chunk whose checksum does not match (flipped bytes that still parse) or that cannot be read is damaged: it
is a miss, warned about once and removed, and its images are encoded again. A chunk of another format (written by
another version) is a miss. Each evaluation pass writes the images it had to encode as one new chunk, atomically (a
temporary file renamed into place) under a unique name. Chunks are written once and never modified, so concurrent
grid workers, cluster jobs and torchrun ranks need no lock: two processes that encode the same image at the same
time both store it, and readers take either copy.

A cache directory promptclip cannot write (a lab's shared copy on a read-only cluster file system) still serves its
hits; one warning says that new features will not be stored.

Bounded: after each write, the chunks of all namespaces beyond ``max_bytes`` in total are deleted, least recently
used first (serving a hit refreshes a chunk's modification time). A reader keeps its chunk open while it reads, so
a deletion by another process cannot tear it; a chunk deleted before it is opened is simply a miss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import atomic_save_tensors, atomic_write_text, check_output_location
from .clip.kernels import resolved_backend
from .data import make_loader
from .errors import ConfigError, DataError
from .evaluate import move_batch
from .precision import autocast, resolve_precision

#: 2: each chunk carries its format and a checksum of its keys and features in the safetensors metadata.
FORMAT = 2
KEY_BYTES = 16
DEFAULT_MAX_BYTES = 4 * 1024**3
#: Temporary files older than this are crash leftovers (a write takes milliseconds) and are removed on eviction.
STALE_TEMP_SECONDS = 3600


def image_key(path: str | os.PathLike) -> bytes:
    """The cache key of an image file: BLAKE2b-128 of its bytes (:class:`DataError` naming a missing file)."""
    digest = hashlib.blake2b(digest_size=KEY_BYTES)
    try:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}") from None
    return digest.digest()


def namespace(fingerprint: str, transform: Any, precision: str, device: str | torch.device) -> dict[str, Any] | None:
    """Everything besides the image that determines its features; None when ``transform`` cannot be identified
    (not a dataclass: a custom callable whose parameters are unknown)."""
    if not dataclasses.is_dataclass(transform) or isinstance(transform, type):
        return None
    device_type = torch.device(device).type
    return {
        "format": FORMAT, "backbone_fingerprint": fingerprint, "transform": repr(transform),
        "precision": resolve_precision(precision, device), "device": device_type,
        "cpu_linear": resolved_backend() if device_type == "cpu" else None,
        "torch": torch.__version__, "promptclip": __version__,
    }


def namespace_id(space: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(space, sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class FeatureCache:
    """An on-disk cache of frozen image features under ``root``, at most ``max_bytes`` in total."""

    root: Path
    max_bytes: int = DEFAULT_MAX_BYTES
    #: What this cache object has found out while in use: damaged chunks already warned about, whether the root
    #: is writable (None: not checked yet). Per object, so that a grid warns once, not once per pass.
    seen: dict[str, Any] = field(default_factory=lambda: {"damaged": set(), "writable": None}, compare=False,
                                 repr=False)

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser())
        if self.max_bytes < 0:
            raise ValueError(f"feature cache max_bytes must be >= 0, got {self.max_bytes}")

    @classmethod
    def default(cls) -> FeatureCache:
        """``<promptclip cache>/features`` (``$PROMPTCLIP_CACHE``, else ``~/.cache/promptclip``)."""
        from .clip.weights import cache_dir

        return cls(cache_dir() / "features")

    def chunks(self, space: dict[str, Any] | None = None) -> list[Path]:
        """Chunk files of one namespace (default: of all namespaces)."""
        pattern = f"{namespace_id(space)}/*.safetensors" if space is not None else "*/*.safetensors"
        return sorted(self.root.glob(pattern))

    def lookup(self, space: dict[str, Any], keys: set[bytes]) -> dict[bytes, torch.Tensor]:
        """The cached features of those ``keys`` that are in namespace ``space``."""
        found: dict[bytes, torch.Tensor] = {}
        for chunk in self.chunks(space):
            wanted = keys - found.keys()
            if not wanted:
                break
            try:
                with safe_open(chunk, framework="pt") as handle:
                    metadata = handle.metadata() or {}
                    if metadata.get("format") != str(FORMAT):
                        continue  # written by another version: a miss
                    keys_tensor = handle.get_tensor("keys")
                    chunk_keys = keys_tensor.numpy()
                    rows = {row.tobytes(): i for i, row in enumerate(chunk_keys)}
                    hits = [(key, rows[key]) for key in wanted if key in rows]
                    if not hits:
                        continue
                    features = handle.get_tensor("features")
            except FileNotFoundError:
                continue  # evicted by another process since the listing
            except (SafetensorError, OSError, KeyError, TypeError) as err:
                self._drop_damaged(chunk, f"it cannot be read ({err})")
                continue
            if metadata.get("checksum") != chunk_checksum(keys_tensor, features):
                self._drop_damaged(chunk, "its checksum does not match its keys and features")
                continue
            for key, row in hits:
                found[key] = features[row].clone()
            _touch(chunk)
        return found

    def _drop_damaged(self, chunk: Path, why: str) -> None:
        """A damaged chunk: warned about once (per cache object) and removed (where the cache is writable)."""
        if chunk not in self.seen["damaged"]:
            self.seen["damaged"].add(chunk)
            warnings.warn(f"feature cache: chunk {chunk} is damaged ({why}); its features are encoded again",
                          stacklevel=3)
        with contextlib.suppress(OSError):  # already gone, or a read-only cache
            chunk.unlink()

    def writable(self) -> bool:
        """Whether new chunks can be stored under ``root``; the first time it is not, one warning says so."""
        if self.seen["writable"] is None:
            try:
                check_output_location(self.root)
                self.seen["writable"] = True
            except ConfigError as err:
                self.seen["writable"] = False
                warnings.warn(f"feature cache: {err}; its features are used, new features will not be stored",
                              stacklevel=3)
        return self.seen["writable"]

    def store(self, space: dict[str, Any], keys: Sequence[bytes], features: torch.Tensor) -> Path | None:
        """Write one new chunk with ``features[i]`` for ``keys[i]``, then evict beyond ``max_bytes``. A cache that
        cannot be written (read-only, disk full) warns and is left as it is: evaluation goes on without it."""
        if not keys or not self.writable():
            return None
        directory = self.root / namespace_id(space)
        chunk = directory / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:12]}.safetensors"
        try:
            description = directory / "namespace.json"
            if not description.exists():
                atomic_write_text(description, json.dumps(space, indent=2, sort_keys=True) + "\n")
            key_tensor = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).view(len(keys), KEY_BYTES)
            metadata = {"format": str(FORMAT), "checksum": chunk_checksum(key_tensor, features)}
            atomic_save_tensors({"keys": key_tensor, "features": features}, chunk, metadata=metadata)
        except OSError as err:
            warnings.warn(f"feature cache: could not write {chunk}: {err}", stacklevel=2)
            return None
        self.evict()
        return chunk

    def size_bytes(self) -> int:
        return sum(_size(chunk) for chunk in self.chunks())

    def evict(self) -> None:
        """Delete least recently used chunks until the cache holds at most ``max_bytes``; drop crash leftovers."""
        now = time.time()
        for temp in self.root.glob("*/.*.tmp"):
            with contextlib.suppress(FileNotFoundError):  # deleted by another process
                if now - temp.stat().st_mtime > STALE_TEMP_SECONDS:
                    temp.unlink()
        entries = []
        for chunk in self.chunks():
            with contextlib.suppress(FileNotFoundError):  # deleted by another process
                stat = chunk.stat()
                entries.append((stat.st_mtime, stat.st_size, chunk))
        total = sum(size for _, size, _ in entries)
        for _, size, chunk in sorted(entries):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):  # deleted by another process
                chunk.unlink()
            total -= size


def chunk_checksum(keys: torch.Tensor, features: torch.Tensor) -> str:
    """BLAKE2b-128 (hex) of a chunk's keys and features: dtype, shape and bytes of each."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in (keys, features):
        digest.update(f"{tensor.dtype}{list(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache still serves hits; only its eviction order is not refreshed


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@dataclass
class CacheStats:
    """One evaluation pass: images served from the cache, and images run through the image tower."""

    hits: int = 0
    encoded: int = 0

    def __str__(self) -> str:
        return f"{self.hits} from the cache, {self.encoded} encoded"


class FeatureDataset(Dataset):
    """The items of an :class:`~promptclip.data.ImageDataset` with ``image_features`` in place of ``image``."""

    def __init__(self, dataset, features: dict[int, torch.Tensor]):
        self.dataset = dataset
        self.features = features

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index not in self.features:
            raise IndexError(f"no image features for item {index} (it was not part of the cached pass)")
        return {"image_features": self.features[index], **self.dataset.fields(index)}


def frozen_features(model, dataset, cache: FeatureCache, fingerprint: str, *, batch_size: int,
                    device: str | torch.device = "cpu", precision: str = "auto", indices: Sequence[int] | None = None,
                    progress: bool = True, desc: str = "encode") -> tuple[FeatureDataset, CacheStats] | None:
    """Image features of ``dataset`` (items ``indices``, default all) through ``model``'s image tower, from
    ``cache`` where it has them; the others are encoded in ``batch_size`` batches in dataset order (each distinct
    file once) and stored. None when the dataset's transform cannot be part of a key (then nothing is cached)."""
    space = namespace(fingerprint, dataset.transform, precision, device)
    if space is None:
        return None
    indices = list(range(len(dataset))) if indices is None else list(indices)
    keys = {i: image_key(dataset.records[i].path) for i in indices}
    cache.writable()  # a read-only cache says so once, before it serves its hits
    found = cache.lookup(space, set(keys.values()))
    first_of: dict[bytes, int] = {}
    for i in indices:
        if keys[i] not in found:
            first_of.setdefault(keys[i], i)
    to_encode = list(first_of.values())
    if to_encode:
        loader = make_loader(Subset(dataset, to_encode), batch_size=batch_size, shuffle=False, seed=0)
        encoded = []
        model.eval()
        with torch.no_grad(), autocast(precision, device):
            for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
                images = move_batch(batch, device)["image"]
                encoded.append((batch["index"].tolist(), model.encode_image(images).cpu()))
        done = {i: feats[row] for rows, feats in encoded for row, i in enumerate(rows)}
        missing = sorted(set(to_encode) - done.keys())
        if missing:
            raise DataError(f"could not encode {len(missing)} image(s), e.g. {dataset.records[missing[0]].path}")
        new_keys = [keys[i] for i in to_encode]
        cache.store(space, new_keys, torch.stack([done[i] for i in to_encode]))
        found.update(zip(new_keys, (done[i] for i in to_encode), strict=True))
    features = {i: found[keys[i]] for i in indices}
    return FeatureDataset(dataset, features), CacheStats(hits=len(indices) - len(to_encode), encoded=len(to_encode))
