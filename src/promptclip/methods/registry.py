"""Looking methods up by name: the built-in methods, the methods of installed packages (entry points, imported on
first use of their name) and the plugins loaded in this process (:mod:`promptclip.methods.plugins`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..clip.model import CLIP
from ..config import from_dict, suggest
from ..errors import ConfigError
from .base import _REGISTRY, PromptMethod
from .plugins import _SOURCES, MethodSource, installed_methods, load_installed


def load_builtin_methods() -> None:
    from . import builtin  # noqa: F401  (imports every method file, which registers it)


def list_methods() -> list[str]:
    """Every method name: built-in, loaded plugins, and those of installed packages (not imported yet)."""
    load_builtin_methods()
    return sorted(set(_REGISTRY) | set(installed_methods()))


def get_method_class(name: str) -> type[PromptMethod]:
    load_builtin_methods()
    if name not in _REGISTRY:
        load_installed(name)
    if name not in _REGISTRY:
        available = list_methods()
        raise ConfigError(f"unknown method {name!r}{suggest(name, available)}; available: {', '.join(available)}. "
                          "A method of your own: --plugin FILE.py or --method FILE.py:Class (docs/new-method.md)")
    return _REGISTRY[name]


def create_method(name: str, backbone: CLIP, classnames: list[str], config: Mapping[str, Any] | Any = None,
                  template: str | None = None) -> PromptMethod:
    """Build method ``name`` on a frozen ``backbone`` for ``classnames``; ``config`` is a dict or the config object."""
    cls = get_method_class(name)
    if config is None or isinstance(config, Mapping):
        config = from_dict(cls.config_class, config or {}, where=name)
    elif not isinstance(config, cls.config_class):
        raise ConfigError(f"method {name!r} takes a {cls.config_class.__name__}, got {type(config).__name__}")
    return cls(backbone, config, classnames, template=template)


def method_source(name: str) -> MethodSource:
    """Where the registered method ``name`` comes from (recorded in adapters; cluster jobs reload plugins from it)."""
    cls = get_method_class(name)
    if name in _SOURCES:
        return _SOURCES[name]
    module = cls.__module__
    if module == "promptclip" or module.startswith("promptclip."):
        return MethodSource("builtin", module)
    if module == "__main__":
        return MethodSource("script", f"__main__:{cls.__qualname__}")
    return MethodSource("module", f"{module}:{cls.__qualname__}")


__all__ = ["list_methods", "get_method_class", "create_method", "method_source", "load_builtin_methods"]
