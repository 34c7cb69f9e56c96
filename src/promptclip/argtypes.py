"""argparse types shared by the command lines (promptclip.cli, captions, import): a bad value is an argument error
naming the option, before any work."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import parse_int
from .errors import ConfigError


def int_at_least(minimum: int, note: str = ""):
    """An integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = parse_int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{note}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def seed(text: str) -> int:
    """A seed: 0 <= seed < 2**32 (what numpy and Dassl accept)."""
    value = int_at_least(0)(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"seeds are below 2**32 (numpy's limit), got {value}")
    return value


#: Shots per class; 0 keeps every training image (Dassl's ``num_shots < 1``).
SHOTS = int_at_least(0, " (0 = every training image)")


def output_location(directory: bool = True):
    """A path promptclip can create or write, a directory or (``directory=False``) a file: checked before any work,
    nothing created (:func:`promptclip.checkpoint.check_output_location`)."""
    def parse(text: str) -> Path:
        from .checkpoint import check_output_location

        try:
            return check_output_location(text, directory)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = "output directory" if directory else "output file"
    return parse
