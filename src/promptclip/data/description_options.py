"""The ``--descriptions FILE`` option of train / eval / run, and the coverage check it runs before weights load.

A method that reads class descriptions names its config field in ``PromptMethod.description_field`` (CoPrompt:
``descriptions``). ``--descriptions FILE`` sets that field (to the file's absolute path) for every such method of the
command; methods without one ignore it with a warning. Then, before any weight loads, the descriptions the method will
read (the file, the preset's bundled set, or every bundled set) must cover every class of every dataset the command
touches: a :class:`~promptclip.errors.DataError` names the file and the classes without a description.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError
from .descriptions import bundled_sets, load_descriptions


def add_descriptions_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--descriptions", metavar="FILE",
        help="class descriptions for methods that use them (coprompt): a JSON file mapping each class name to a "
             "list of descriptions (default: the bundled set of the preset, e.g. CoPrompt's LLM descriptions)")


def description_field(method: str) -> str | None:
    from ..methods import get_method_class

    return getattr(get_method_class(method), "description_field", None)


def with_descriptions(args: Any, method: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (a preset's ``method_config``) with ``--descriptions`` applied when ``method`` reads
    descriptions; warns once per command when it does not."""
    config = dict(config)
    path = getattr(args, "descriptions", None)
    field = description_field(method)
    if path and field:
        config[field] = str(Path(path).resolve())
    elif path and not getattr(args, "_descriptions_warned", False):
        print(f"warning: method {method!r} does not use class descriptions; --descriptions {path} is ignored",
              flush=True)
        args._descriptions_warned = True
    return config


def check_descriptions(method: str, config: Mapping[str, Any] | Any,
                       groups: Callable[[], Sequence[tuple[str, Sequence[str]]]]) -> None:
    """Before any weight loads: every class of ``groups()`` (``(dataset name, class names)`` pairs, called only for
    methods that read descriptions) has a description in the source the method will read."""
    field = description_field(method)
    if field is None:
        return
    value = config.get(field) if isinstance(config, Mapping) else getattr(config, field, None)
    try:
        source = load_descriptions(value)
        for name, classnames in groups():
            source.check(list(classnames), f"classes of {name}")
    except DataError as err:
        raise DataError(f"{err}. Method {method!r} needs a description of every class: pass --descriptions FILE (JSON: "
                        f"class name -> list of descriptions) or set method_config.{field} to a bundled set "
                        f"({', '.join(bundled_sets())})") from None


def dataset_classes(dataset: str, root: str | None) -> Callable[[], list[tuple[str, list[str]]]]:
    """Every class of ``dataset`` (base and novel: the reference encodes the descriptions of both)."""
    def groups():
        from . import load_splits

        splits = load_splits(dataset, root)
        return [(splits.name, list(splits.classnames))]

    return groups


def check_cell_descriptions(args: Any, cells: Sequence[Any]) -> list[Any]:
    """A protocol grid's cells with ``--descriptions`` applied to the methods that read descriptions, each checked
    (before any weight loads) against every class of its dataset and of its transfer targets."""
    import dataclasses

    root = getattr(args, "root", None)
    checked = []
    for cell in cells:
        config = with_descriptions(args, cell.method, cell.preset.method_config)
        if config != cell.preset.method_config:
            cell = dataclasses.replace(cell, preset=dataclasses.replace(cell.preset, method_config=config))

        if cell.adapter is None:  # an adapter is only evaluated: no description is read (nor on transfer targets)
            check_descriptions(cell.method, config, dataset_classes(cell.dataset, root))
        checked.append(cell)
    return checked
