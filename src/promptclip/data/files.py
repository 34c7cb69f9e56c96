"""Image files on disk: which names count as images, and the sorted listings every dataset reader builds on."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "is_image", "list_images", "subdirs"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def is_image(name: str) -> bool:
    """A file name with an image extension (any case) that is not hidden."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def subdirs(path: Path) -> list[str]:
    """Sorted names of the folders directly inside ``path`` (hidden ones skipped)."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def list_images(folder: str | os.PathLike) -> list[str]:
    """Sorted names of the image files directly inside ``folder`` (hidden files skipped)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and is_image(e.name))
