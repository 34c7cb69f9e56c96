"""Typed configs with strict keys: a misspelt key is an error that suggests the right one."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def parse_int(value: Any) -> int:
    """An integer from an ``int`` or from any text Python's ``int()`` accepts (``"12"``, ``" 1_000 "``, ``"+3"``);
    ValueError otherwise (floats, booleans, ``"1e3"``). The one place promptclip turns user text into an integer."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value)
    raise ValueError(f"{value!r} is not an integer")


def parse_float(value: Any) -> float:
    """A finite number from an ``int``/``float`` or from any text Python's ``float()`` accepts (``"2e-3"``,
    ``"1E-3"``, ``"0.002"``, ``"1_000"``); ValueError otherwise, and for NaN and infinities. YAML 1.1 reads
    ``2e-3`` as a string (its float rule wants a dot), so text is the common case in presets and ``--set``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{value!r} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Validate (and mildly coerce: int → float, list → tuple) a value against a simple type annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _check_type(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(annotation)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_check_type(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float:
        try:
            return parse_float(value)
        except ValueError:
            finite = isinstance(value, float) or (isinstance(value, str) and _is_float_text(value))
            raise ConfigError(f"{where}: expected a {'finite ' if finite else ''}number, got {value!r}") from None
    if annotation is int:
        try:
            return parse_int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return from_dict(annotation, value, where)
    return value


def _is_float_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and values of the wrong type.

    A value the dataclass itself refuses (its ``__post_init__`` raises ValueError, whose message starts with the
    field name by convention) becomes a ConfigError prefixed with ``where``: ``train.lr must be greater than 0``."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of {cls.__name__} keys, got {data!r}")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        valid = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key {prefix}{key}{suggest(key, fields)}; valid keys of {cls.__name__}: {valid}")
    values = {k: _check_type(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{cls.__name__}: {err}") from None
    except ValueError as err:
        raise ConfigError(f"{prefix}{err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def replace(config: T, **changes: Any) -> T:
    """A copy of ``config`` with ``changes`` validated like ``from_dict``."""
    return from_dict(type(config), {**to_dict(config), **changes})
