"""File and folder names must be UTF-8.

promptclip keeps class names (folder names), split files, records, run directories and reports as UTF-8 text. A name
in another encoding (Python holds its undecodable bytes as surrogate escapes, ``os.fsdecode``) has no faithful UTF-8
spelling, so it is refused where it enters — a dataset's listing, a dataset path or root, an output path — as a user
error that names it and says how to rename it, before anything is written.
"""

from __future__ import annotations

import os

from .errors import DataError


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(path: str | os.PathLike) -> str:
    """``path`` printable as UTF-8 (undecodable bytes as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _rename_hint(folder: str) -> str:
    return (f"rename it to UTF-8 (for Latin-1 names: convmv -f latin1 -t utf-8 -r {folder} shows the renames, "
            "--notest makes them)")


def check_utf8_name(folder: str | os.PathLike, name: str, kind: str) -> str:
    """``name`` (an entry of ``folder``; ``kind``: "a folder", "an image file") if it is UTF-8, else a
    :class:`DataError` naming ``folder``."""
    if not is_utf8(name):
        raise DataError(f"{shown(folder)} holds {kind} whose name is not UTF-8: {os.fsencode(name)!r}; promptclip "
                        f"keeps class names, split files and records as UTF-8 text, so {_rename_hint(shown(folder))}")
    return name


def check_utf8_path(path: str | os.PathLike, what: str, error: type[Exception] = DataError) -> None:
    """A :class:`DataError` (or ``error``) naming ``what`` when ``path`` is not UTF-8."""
    text = os.fspath(path)
    if not is_utf8(text):
        raise error(f"{what} {shown(text)} is not a UTF-8 name; promptclip writes paths into records, run folders "
                    "and reports as UTF-8 text: give a UTF-8 path (an existing folder named in Latin-1 is renamed with "
                    "convmv -f latin1 -t utf-8 -r FOLDER, which shows the renames; --notest makes them)")
