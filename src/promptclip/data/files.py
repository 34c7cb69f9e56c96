"""Image files on disk: which names count as images, and the sorted listings every dataset reader builds on."""

from __future__ import annotations

import os
from pathlib import Path

from ..utf8names import check_utf8_name

__all__ = ["IMAGE_EXTENSIONS", "check_utf8_name", "is_image", "list_images", "subdirs"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def is_image(name: str) -> bool:
    """A file name with an image extension (any case) that is not hidden."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def subdirs(path: Path) -> list[str]:
    """Sorted names of the folders directly inside ``path`` (hidden ones skipped); a :class:`DataError` for a name
    that is not UTF-8 (:func:`check_utf8_name`)."""
    names = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    return [check_utf8_name(path, name, "a folder") for name in names]


def list_images(folder: str | os.PathLike) -> list[str]:
    """Sorted names of the image files directly inside ``folder`` (hidden files skipped); a :class:`DataError` for
    a name that is not UTF-8 (:func:`check_utf8_name`)."""
    names = sorted(e.name for e in os.scandir(folder) if e.is_file() and is_image(e.name))
    return [check_utf8_name(folder, name, "an image file") for name in names]
