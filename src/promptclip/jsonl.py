"""Append-only JSONL files that survive crashes: a torn last line is cut before appending, and each append is one
write of whole lines, flushed and fsynced. Used by result records, caption caches and training metrics."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import IO, Any


def cut_torn_tail(handle: IO[bytes]) -> None:
    """Truncate a partial last line (left by a crash mid-write) and leave the position at the end of the file."""
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    if size:
        handle.seek(max(0, size - 65536))
        tail = handle.read()
        if not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n")
            handle.truncate(size - len(tail) + cut + 1 if cut >= 0 else 0)
    handle.seek(0, os.SEEK_END)


def write_json_lines(handle: IO[bytes], objects: Iterable[Mapping[str, Any]], sync: bool = True) -> None:
    """Append whole lines in one write, flushed; ``sync``: fsynced too (False: the OS writes them when it likes, for
    lines that may be lost on a power cut, like the steps of an unfinished epoch)."""
    data = b"".join(json.dumps(o, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n" for o in objects)
    if data:
        handle.write(data)
        handle.flush()
        if sync:
            os.fsync(handle.fileno())
