"""``promptclip data prepare|verify NAME --root DIR``: registered by ``promptclip.cli.build_parser`` through
:func:`add_arguments` (on a sub-parser that carries the main CLI's shared options) and run by :func:`data_command`
with the main CLI's console (this module never imports ``promptclip.cli``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("action", choices=["prepare", "verify"])
    parser.add_argument("name")
    parser.add_argument("--root", required=True)
    parser.add_argument("--no-download", action="store_true", help="prepare: only lay out files already present")
    return parser


def data_command(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    """Exit status 0 when the dataset is ready (or its manual steps are printed), 1 when it is not."""
    from . import prepare, verify

    if args.action == "prepare":
        report = prepare(args.name, args.root, download=not args.no_download, progress=not args.quiet, quiet=True)
        say(str(report))
        return 0 if report.status in ("ok", "manual") else 1
    report = verify(args.name, args.root, quiet=True)
    say(str(report))
    return 0 if report.ok else 1
