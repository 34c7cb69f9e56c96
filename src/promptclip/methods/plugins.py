"""Methods from outside the package, registered exactly like the built-in ones.

Two ways in, both ending in :func:`promptclip.methods.register`:

- **Installed packages** declare their methods in the entry-point group ``promptclip.methods``: the entry point's
  name is the method name, its value the class (``my_pkg.methods:MyPrompt``) or a module that registers it. It is
  imported the first time that name is looked up, so nothing needs to be loaded by hand.
- **Plugin specs** for ideas not packaged yet: ``path/to/file.py``, ``path/to/file.py:Class``, ``package.module`` or
  ``package.module:Class``, loaded with :func:`load_plugin` (``--plugin SPEC`` on the command line, or the spec in
  place of a method name: ``--method ./my_method.py:MyPrompt``). Every method class the file or module defines (a
  :class:`PromptMethod` subclass with its own ``name``) is registered, or only the named class. Loading the same
  plugin twice is harmless.

:func:`promptclip.methods.method_source` says where a registered method came from. Adapters record it, so that
loading an adapter without its plugin says which plugin to load; cluster jobs (new processes) load the plugins of
their cells from it before building the method. Torchrun ranks get the plugins from the command line, which every
rank parses.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import io
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ConfigError
from .base import _REGISTRY, PromptMethod, register

ENTRY_POINT_GROUP = "promptclip.methods"
_FILE_MODULE_PREFIX = "promptclip_plugin_"


@dataclass(frozen=True)
class MethodSource:
    """Where a method class comes from.

    ``kind``: ``builtin`` (this package), ``entry_point`` (an installed distribution), ``plugin`` (a file or module
    given to :func:`load_plugin`), ``module`` (a module that registered it when imported) or ``script`` (defined in
    ``__main__``: a script or notebook). ``spec``: what :func:`load_plugin` takes to load it again (``plugin`` and
    ``module``), the entry point's value, or the module name.
    """

    kind: str
    spec: str
    distribution: str | None = None
    version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> MethodSource | None:
        if not isinstance(data, Mapping) or "kind" not in data or "spec" not in data:
            return None
        return cls(str(data["kind"]), str(data["spec"]), data.get("distribution"), data.get("version"))

    @property
    def loadable(self) -> bool:
        """Whether :func:`load_plugin` (``spec``) brings the method back in a new process."""
        return self.kind in ("plugin", "module")

    def how_to_load(self) -> str:
        if self.kind == "entry_point":
            package = f"{self.distribution} {self.version or ''}".strip() if self.distribution else "a package"
            return (f"it comes from the installed package {package} (entry point {self.spec}); install that "
                    "package in this environment")
        if self.kind == "script":
            return ("it was defined in a script or notebook (__main__); define and register that class (promptclip."
                    "methods.register) before loading")
        if self.loadable:
            return (f"it comes from the plugin {self.spec}; load it first: --plugin {self.spec} (command line) or "
                    f"promptclip.load_plugin({self.spec!r})")
        return f"it is a built-in method of promptclip ({self.spec}); this promptclip version does not have it"


#: Sources of the methods registered through plugins and entry points (the others are derived from their class).
_SOURCES: dict[str, MethodSource] = {}


def is_plugin_spec(text: str) -> bool:
    """Whether a ``--method`` value is a plugin spec (``file.py[:Class]`` or ``module:Class``) rather than a name."""
    return ":" in text or text.endswith(".py")


def load_plugin(spec: str) -> list[str]:
    """Import the plugin ``spec`` (module docstring) and register its methods; returns their names."""
    from . import builtin  # noqa: F401  (a plugin reusing a built-in name is refused now, not later)

    target, attr, path = _parse_spec(spec)
    before = set(_REGISTRY)
    if path is not None:
        module, canonical = _import_file(path, spec), str(path)
    else:
        module, canonical = _import_module(target, spec), target
    if attr is not None:
        value = getattr(module, attr, None)
        if not _is_method_class(value):
            raise ConfigError(f"plugin {spec!r}: {canonical} has no method class {attr!r} (a PromptMethod subclass "
                              "with a `name` and a dataclass `config_class`)")
        classes = [value]
    else:
        classes = _defined_methods(module) + [_REGISTRY[n] for n in sorted(set(_REGISTRY) - before)]
    names = _register_all(classes, f"plugin {spec!r}")
    if not names:
        folder = f" ({target} is a folder: {_FOLDER_HINT})" if path is None and Path(target).is_dir() else ""
        raise ConfigError(f"plugin {spec!r} defines no method: a PromptMethod subclass with its own `name` and a "
                          f"dataclass `config_class` (see docs/new-method.md){folder}")
    for cls in classes:
        own = getattr(module, cls.__name__, None) is cls
        _SOURCES.setdefault(cls.name, MethodSource("plugin", f"{canonical}:{cls.__name__}" if own else canonical))
    return names


def resolve_method(text: str) -> str:
    """A method name, or the name of the one method a plugin spec registers (which it loads)."""
    if not is_plugin_spec(text):
        return text
    names = load_plugin(text)
    if len(names) != 1:
        raise ConfigError(f"plugin {text!r} defines {len(names)} methods ({', '.join(names)}); name one with "
                          f"{text.split(':')[0]}:ClassName, or load it with --plugin and pass a method name")
    return names[0]


# -- entry points ----------------------------------------------------------------------------------------------------


def installed_methods() -> dict[str, importlib.metadata.EntryPoint]:
    """Method name -> entry point, for every installed distribution declaring ``promptclip.methods``."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            raise ConfigError(f"two installed packages declare method {ep.name!r}: {_describe(found[ep.name])} and "
                              f"{_describe(ep)}; uninstall one of them")
        found[ep.name] = ep
    return found


def load_installed(name: str) -> bool:
    """Import the entry point declaring method ``name`` and register it; False when no installed package has it."""
    ep = installed_methods().get(name)
    if ep is None:
        return False
    before = set(_REGISTRY)
    value = _run_import(ep.load, f"method {name!r} from {_describe(ep)}")
    if isinstance(value, ModuleType):
        classes = _defined_methods(value) + [_REGISTRY[n] for n in sorted(set(_REGISTRY) - before)]
    elif _is_method_class(value):
        classes = [value]
    else:
        raise ConfigError(f"entry point {name} = {ep.value} of {_describe(ep)} is neither a method class nor a "
                          "module")
    names = _register_all(classes, _describe(ep))
    if name not in names:
        raise ConfigError(f"entry point {name} = {ep.value} of {_describe(ep)} registers no method named {name!r} "
                          f"(it registers {', '.join(names) or 'none'}); the entry point's name must be the method's")
    dist = getattr(ep, "dist", None)
    for cls in classes:
        _SOURCES.setdefault(cls.name, MethodSource("entry_point", ep.value, dist.name if dist else None,
                                                   dist.version if dist else None))
    return True


def _describe(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"package {dist.name} {dist.version}" if dist else f"entry point {ep.value}"


# -- importing ------------------------------------------------------------------------------------------------------


def _parse_spec(spec: str) -> tuple[str, str | None, Path | None]:
    """``(target, class or None, resolved file path or None)``."""
    target, attr = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head and not tail.endswith(".py"):
        target, attr = head, tail
        if not attr.isidentifier():
            raise ConfigError(f"plugin {spec!r}: {attr!r} is not a class name (use FILE.py:Class or module:Class)")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if path.is_dir():
            raise ConfigError(f"plugin {spec!r}: {path} is a folder, not a Python file; {_FOLDER_HINT}")
        if not path.is_file():
            raise ConfigError(f"plugin file {path} does not exist (plugin {spec!r}; use FILE.py[:Class] or "
                              "package.module[:Class])")
        return target, attr, path.resolve()
    if not all(part.isidentifier() for part in target.split(".")):
        raise ConfigError(f"plugin {spec!r} is neither a .py file nor a module name (use FILE.py[:Class] or "
                          "package.module[:Class])")
    return target, attr, None


def _import_file(path: Path, spec: str) -> ModuleType:
    """The module of a plugin file, imported once per file under a name derived from its path."""
    stem = re.sub(r"\W", "_", path.stem)
    name = f"{_FILE_MODULE_PREFIX}{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"plugin {spec!r}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look the module up by name
    try:
        _run_import(lambda: module_spec.loader.exec_module(module), f"plugin file {path}")
    except ConfigError:
        del sys.modules[name]
        raise
    return module


def _import_module(target: str, spec: str) -> ModuleType:
    try:
        return _run_import(lambda: importlib.import_module(target), f"plugin module {target}")
    except ConfigError as err:
        cause = err.__cause__
        if isinstance(cause, ModuleNotFoundError) and cause.name and target.startswith(cause.name):
            if Path(target).is_dir():
                raise ConfigError(f"plugin {spec!r}: {target} is a folder, not a module on the Python path; "
                                  f"{_FOLDER_HINT}") from cause
            raise ConfigError(f"plugin {spec!r}: no module named {cause.name!r} on the Python path (a file needs its "
                              "path: ./my_method.py)") from cause
        raise


_FOLDER_HINT = ("pass the .py file that defines the method (FOLDER/my_method.py), or a package as a module name "
                "(package.module) with the folder above it on PYTHONPATH")


def _run_import(load: Callable[[], Any], what: str) -> Any:
    """``load()`` (importing a plugin: the user's code runs), with every way it can stop — an exception or
    SystemExit (``sys.exit()``, argparse) — turned into one ConfigError that names ``what``. What the code prints
    is held back and shown again when it imports, so that a script's usage line does not pose as promptclip's.
    KeyboardInterrupt goes through."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            value = load()
    except SystemExit as exit_:
        lines = [line.strip() for line in (out.getvalue() + err.getvalue()).splitlines() if line.strip()]
        said = f"; its last output: {lines[-1]!r}" if lines else ""
        raise ConfigError(f"{what} ended the process while promptclip imported it (SystemExit: {exit_.code!r}"
                          f"{said}). A plugin is imported, not run: put the code that runs it as a script (argument "
                          'parsing, training, sys.exit) under `if __name__ == "__main__":`') from exit_
    except Exception as error:  # noqa: BLE001 - the user's code: one message that names it, traceback on --debug
        raise ConfigError(f"{what} failed to import: {type(error).__name__}: {error} (run with --debug for the "
                          "traceback)") from error
    sys.stdout.write(out.getvalue())
    sys.stderr.write(err.getvalue())
    return value


def _is_method_class(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, PromptMethod) and bool(vars(value).get("name"))


def _defined_methods(module: ModuleType) -> list[type[PromptMethod]]:
    """Method classes defined in ``module`` (or its submodules) that it exposes; imported built-ins are not."""
    prefix = module.__name__
    return [value for value in vars(module).values() if _is_method_class(value)
            and (value.__module__ == prefix or value.__module__.startswith(prefix + "."))]


def _register_all(classes: list[type[PromptMethod]], where: str) -> list[str]:
    names: list[str] = []
    for cls in classes:
        try:
            register(cls)
        except TypeError as err:
            raise ConfigError(f"{where}: {err}") from None
        if cls.name not in names:
            names.append(cls.name)
    return names


__all__ = ["ENTRY_POINT_GROUP", "MethodSource", "load_plugin", "resolve_method", "installed_methods",
           "load_installed", "is_plugin_spec"]
