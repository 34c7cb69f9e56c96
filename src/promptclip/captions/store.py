"""Caption files: the JSONL cache written by ``captions build``, user-supplied JSONL / CSV files, and lookup of the
caption of a dataset record.

Cache lines (one JSON object per image, appended batch by batch)::

    {"key": "Forest/Forest_12.jpg", "path": "/abs/.../Forest_12.jpg", "dataset": "eurosat-sample",
     "caption": "...", "source": "generated", "model": "Qwen/Qwen2-VL-2B-Instruct",
     "instruction_sha256": "...", "prompt_style": "chat", "generation": {...}, "created": "..."}

``key`` is the record's ``relpath`` (the path relative to the dataset's image folder, portable across machines), or
the absolute path for images captioned outside a dataset. A cache holds the captions of ONE captioner
configuration (model, instruction hash, prompt style, generation settings): that is its provenance.

User files: JSONL with ``caption`` plus one of ``key`` / ``path`` / ``image``, or CSV with the columns
``path,caption`` (header optional). Paths may be dataset-relative (``relpath``) or absolute.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..jsonl import cut_torn_tail, write_json_lines

__all__ = ["CaptionEntry", "CaptionSet", "CacheWriter", "load_captions", "read_caption_file", "provenance_key",
           "sha256_text", "CaptionExtras", "PROVENANCE_FIELDS"]

#: The fields that identify how a caption was made; a cache holds one combination of them.
PROVENANCE_FIELDS = ("source", "model", "instruction_sha256", "prompt_style", "generation", "masked")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def provenance_key(entry: Mapping[str, Any]) -> str:
    """A canonical string of an entry's provenance fields (equal strings: same captioner configuration)."""
    return json.dumps({k: entry.get(k) for k in PROVENANCE_FIELDS}, sort_keys=True)


@dataclass(frozen=True)
class CaptionEntry:
    key: str
    caption: str
    path: str = ""
    dataset: str = ""
    #: The whole JSON object (provenance and anything else the file holds).
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    #: Where the entry was read from: "file:line".
    origin: str = ""

    @property
    def provenance(self) -> str:
        return provenance_key(self.meta)


def _norm(path: str) -> str:
    return path.replace("\\", "/")


def _entry_from_object(obj: Any, origin: str) -> CaptionEntry:
    if not isinstance(obj, Mapping):
        raise DataError(f"{origin}: expected a JSON object with 'caption' and 'key' or 'path', got {obj!r:.80}")
    if "caption" not in obj:
        raise DataError(f"{origin}: no 'caption' field (a caption line needs 'caption' and 'key' or 'path')")
    caption = obj["caption"]
    if not isinstance(caption, str):
        raise DataError(f"{origin}: 'caption' must be a string, got {caption!r:.80}")
    key = obj.get("key") or obj.get("path") or obj.get("image")
    if not isinstance(key, str) or not key:
        raise DataError(f"{origin}: no image key: give 'key', 'path' or 'image'")
    meta = dict(obj)
    meta.setdefault("source", "user")
    return CaptionEntry(key=_norm(key), caption=caption, path=_norm(str(obj.get("path") or "")),
                        dataset=str(obj.get("dataset") or ""), meta=meta, origin=origin)


def read_caption_file(path: str | os.PathLike) -> list[CaptionEntry]:
    """Entries of a cache or user file (JSONL, or CSV ``path,caption``) in file order.

    A torn LAST line of a JSONL file (a run killed while writing) is ignored with a warning; any other bad line is a
    :class:`DataError` naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"captions file {path} does not exist (build one with `promptclip captions build`)")
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    entries = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        origin = f"{path}:{i + 1}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            if i == last and not path.read_bytes().endswith(b"\n"):
                warnings.warn(f"{origin}: ignoring a torn last line (an interrupted write)", stacklevel=2)
                continue
            raise DataError(f"{origin}: not valid JSON ({err.msg}); caption files are JSONL or CSV path,caption") \
                from None
        entries.append(_entry_from_object(obj, origin))
    return entries


def _read_csv(path: Path) -> list[CaptionEntry]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return []
    start = 0
    header = [c.strip().lower() for c in rows[0]]
    path_col, caption_col = 0, 1
    if "caption" in header:
        start = 1
        caption_col = header.index("caption")
        candidates = [c for c in ("path", "key", "image") if c in header]
        if not candidates:
            raise DataError(f"{path}: the header has 'caption' but no 'path' column")
        path_col = header.index(candidates[0])
    entries = []
    for i, row in enumerate(rows[start:], start + 1):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) <= max(path_col, caption_col):
            raise DataError(f"{path}:{i}: expected the columns path,caption, got {row!r:.80}")
        entries.append(_entry_from_object({"path": row[path_col].strip(), "caption": row[caption_col]},
                                          f"{path}:{i}"))
    return entries


class CaptionSet:
    """Captions from one or more files, looked up by a record's absolute path or its dataset-relative path.

    The same key with two different captions (within or across files) is an error naming both lines; the same key
    with the same caption is kept once.
    """

    def __init__(self, entries: Iterable[CaptionEntry] = (), files: Sequence[str] = ()):
        self.files = [str(f) for f in files]
        self.entries: dict[str, CaptionEntry] = {}
        self._by_path: dict[str, str] = {}
        self._by_key_suffix: dict[str, list[str]] | None = None
        for entry in entries:
            self.add(entry)

    def add(self, entry: CaptionEntry) -> None:
        known = self.entries.get(entry.key)
        if known is not None:
            if known.caption != entry.caption:
                raise DataError(
                    f"two different captions for image {entry.key!r}: {known.origin} and {entry.origin}; "
                    "keep one (caption files of different datasets with the same relative paths need absolute "
                    "paths)"
                )
            return
        self.entries[entry.key] = entry
        if entry.path:
            self._by_path[entry.path] = entry.key
        self._by_key_suffix = None

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, path: str, relpath: str = "") -> CaptionEntry | None:
        """The entry of an image given its absolute ``path`` and (for dataset records) its ``relpath``."""
        path = _norm(path)
        key = self._by_path.get(path)
        if key is None and path in self.entries:
            key = path
        if key is None and relpath and _norm(relpath) in self.entries:
            key = _norm(relpath)
        return self.entries[key] if key is not None else None

    def lookup(self, record: Any) -> str | None:
        """The caption of a dataset record (``path`` and ``relpath`` attributes), or None."""
        entry = self.get(record.path, getattr(record, "relpath", ""))
        return entry.caption if entry is not None else None

    def lookup_file(self, path: str | os.PathLike) -> str | None:
        """The caption of an image file given by any path (``predict``): absolute path, then the unique entry whose
        key is a trailing part of the path."""
        resolved = _norm(str(Path(path).expanduser().resolve()))
        entry = self.get(resolved) or self.get(_norm(str(path)))
        if entry is not None:
            return entry.caption
        parts = resolved.split("/")
        for start in range(1, len(parts)):
            suffix = "/".join(parts[start:])
            if suffix in self.entries:
                return self.entries[suffix].caption
        return None

    def provenances(self) -> Counter:
        return Counter(e.provenance for e in self.entries.values())

    def covered(self, records: Iterable[Any]) -> tuple[int, list[Any]]:
        """(number of records with a caption, records without one)."""
        missing, n = [], 0
        for rec in records:
            if self.get(rec.path, rec.relpath) is None:
                missing.append(rec)
            else:
                n += 1
        return n, missing


def load_captions(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> CaptionSet:
    """Captions of one file or several (a cache, a user JSONL or a CSV ``path,caption``)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    entries: list[CaptionEntry] = []
    for p in paths:
        entries.extend(read_caption_file(p))
    return CaptionSet(entries, files=[str(p) for p in paths])


class CacheWriter:
    """Appends whole JSONL lines to a cache: a torn last line left by a killed run is cut off first, and every
    ``append`` is flushed and fsynced, so a killed run keeps every finished batch. The file (and its folder) is
    created at the first append: a build that fails before its first caption leaves nothing behind."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handle = None

    def append(self, objects: Sequence[Mapping[str, Any]]) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a+b")  # noqa: SIM115 - closed in close()/__exit__
            cut_torn_tail(self._handle)
        write_json_lines(self._handle, objects)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CaptionExtras:
    """``RunOptions.extras`` for captions: ``records -> {"caption": [caption or None per record]}``.

    Images without a caption get None; the method decides (MuGCP: a clear error naming the image, or its configured
    fallback). The number of uncovered images of each split is warned about once per split.
    """

    key = "caption"

    def __init__(self, captions: CaptionSet):
        self.captions = captions

    def __call__(self, records: Sequence[Any]) -> dict[str, list[str | None]]:
        values = [self.captions.lookup(rec) for rec in records]
        missing = [rec for rec, value in zip(records, values, strict=True) if value is None]
        if missing:
            files = ", ".join(self.captions.files) or "the captions"
            warnings.warn(f"{len(missing)} of {len(records)} images have no caption in {files} (first: "
                          f"{missing[0].relpath})", stacklevel=2)
        return {self.key: values}
