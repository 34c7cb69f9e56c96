"""The one check every class list passes, wherever it comes from (a dataset, ``--classnames``, an adapter, the API):
no empty name, no two names the text encoder cannot tell apart, and no prompt longer than the text context.

Two names are the same class to CLIP when they encode to the same BPE tokens after the methods' ``_`` -> space
normalisation: the tokenizer lowercases, repairs text with ftfy, unescapes HTML and collapses whitespace, so
``sea_lake`` / ``sea lake`` / ``Sea  Lake`` give identical prompts, identical text features and identical
probabilities. One exception is kept for parity with the reference: CoOp's ImageNet class names (shipped in
``assets/imagenet_classnames.txt``) name two pairs of distinct classes alike ("missile", "sunglasses"); that list, or a
contiguous part of it (the base and new halves), is accepted as the papers evaluate it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from ..clip.tokenizer import ContextLengthError, get_tokenizer
from ..errors import ConfigError, PromptClipError

__all__ = ["normalize_classname", "check_classnames", "prompt_too_long"]

_SHOWN = 5


def normalize_classname(name: str) -> str:
    """A class name as the methods put it in prompts (the reference's ``_`` -> space)."""
    return name.replace("_", " ")


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_classnames(names: Sequence[str], where: str = "class names",
                     error: type[PromptClipError] = ConfigError, context_length: int | None = None) -> list[str]:
    """The normalised names, or ``error`` naming the empty or indistinguishable ones (``where`` says whose).

    With ``context_length``, also a name that cannot fit in any prompt (the name, a full stop, start and end tokens):
    a check before any method exists; a method checks its own prompts exactly."""
    if not names:
        raise error(f"{where}: no class name given")
    tokenizer = get_tokenizer()
    groups: dict[tuple[int, ...], list[str]] = {}
    for index, name in enumerate(names):
        if not isinstance(name, str):
            raise error(f"{where}: class {index} is {name!r}, not a string")
        ids = tuple(tokenizer.encode(normalize_classname(name)))
        if not ids:
            raise error(f"{where}: class {index} has an empty name ({name!r})")
        if context_length is not None and len(ids) + 3 > context_length:
            raise error(f"{where}: class name {_shorten(name)!r} is {len(ids)} tokens long; with the start and end "
                        f"tokens and a full stop no prompt of it fits the text encoder's context of {context_length} "
                        f"tokens (a class name can have at most {context_length - 3}, fewer with a template). Shorten "
                        "it")
        groups.setdefault(ids, []).append(name)
    same = [group for group in groups.values() if len(group) > 1]
    if same and not _is_reference_list(names):
        shown = "; ".join(" = ".join(repr(n) for n in group) for group in same[:_SHOWN])
        more = f" (and {len(same) - _SHOWN} more)" if len(same) > _SHOWN else ""
        raise error(
            f"{where}: the text encoder cannot tell apart {shown}{more} (it lowercases, reads '_' as a space and "
            "ignores extra spaces), so such classes would get identical prompts and identical scores: rename or "
            "merge them"
        )
    return [normalize_classname(name) for name in names]


def _is_reference_list(names: Sequence[str]) -> bool:
    """Whether ``names`` is a contiguous run of CoOp's ImageNet class names (whole list, base or new half)."""
    reference = _imagenet_names()
    first = reference.index(names[0]) if names[0] in reference else -1
    return first >= 0 and tuple(names) == reference[first : first + len(names)]


@functools.lru_cache(maxsize=1)
def _imagenet_names() -> tuple[str, ...]:
    from .specs import imagenet_classnames

    return tuple(imagenet_classnames())


def prompt_too_long(err: ContextLengthError, classnames: Sequence[str]) -> ContextLengthError:
    """The error of a class prompt over the text context, naming the class (the longest name in the prompt) and
    every other class name that cannot fit either."""
    tokenizer = get_tokenizer()
    inside = [name for name in classnames if name and name in err.text]
    if not inside or err.num_tokens is None:
        return err
    culprit = max(inside, key=lambda name: len(tokenizer.encode(name)))
    length = len(tokenizer.encode(culprit))
    around = err.num_tokens - length  # the template or context words, the full stop, start and end tokens
    budget = err.context_length - around
    others = [name for name in classnames if name != culprit and len(tokenizer.encode(name)) > budget]
    also = ""
    if others:
        shown = ", ".join(repr(_shorten(n, 40)) for n in others[:_SHOWN])
        also = f"; {len(others)} other class name(s) are too long as well: {shown}"
    return ContextLengthError(
        f"class name {_shorten(culprit)!r} is {length} tokens long: its prompt {_shorten(err.text)!r} needs "
        f"{err.num_tokens} tokens, more than the text encoder's context of {err.context_length}. The prompt around "
        f"the name takes {around} tokens here, so a class name can have at most {budget}{also}. Shorten the class "
        "name(s)", text=err.text, num_tokens=err.num_tokens, context_length=err.context_length)
