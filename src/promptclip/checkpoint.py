"""Adapter files and resumable training state.

An adapter is two files side by side: ``<name>.safetensors`` with only the method's learnable tensors, and
``<name>.json`` with the method and where it comes from (built-in, installed package or plugin), its config, the
backbone (name and fingerprint), the class names, the template and the package version. Training state for resuming
(``train_state.json`` naming ``train_state-epoch<E>.safetensors``) adds the optimizer's momentum buffers and the
method's extra state; the JSON is written last and names the epoch and its tensors file, so a crash never leaves a
half-written state that looks complete.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .config import to_dict
from .errors import ConfigError, PromptClipError
from .finite import check_finite
from .utf8names import check_utf8_path

ADAPTER_FORMAT = 1


class AdapterError(PromptClipError):
    """An adapter file is missing, corrupt, or made for another method or backbone."""


#: The file stem of a run's adapter (``<run>/adapter.safetensors`` + ``.json``).
ADAPTER_STEM = "adapter"


@dataclass
class FitResult:
    """What a training run leaves: its per-epoch history, the adapter it wrote, the epoch it resumed after."""

    history: list[dict[str, Any]] = field(default_factory=list)
    adapter_path: Path | None = None
    resumed_from_epoch: int | None = None


def check_output_location(path: str | os.PathLike, directory: bool = True) -> Path:
    """``path`` if promptclip can create or write it (a directory, or a file with ``directory=False``), without
    creating anything; else a ConfigError naming what is in the way. Run before any work, so that a bad output path
    fails before anything is computed or written."""
    path = Path(path).expanduser()
    kind = "directory" if directory else "file"
    check_utf8_path(path, f"the output {kind}", ConfigError)
    if path.exists():
        if directory and not path.is_dir():
            raise ConfigError(f"{path} is an existing file, not a directory: pass a directory (new or existing)")
        if not directory and path.is_dir():
            raise ConfigError(f"{path} is a directory; pass the path of a {kind}")
        _check_writable(path if directory else path.parent, f"{path} is not writable")
        return path
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot create the {kind} {path}: {parent} is a file, not a directory")
    _check_writable(parent, f"cannot create the {kind} {path}: {parent} is not writable")
    return path


def _check_writable(folder: Path, what: str) -> None:
    """Create and remove an empty folder in ``folder``: the one test that also holds for root, ACLs and read-only
    mounts."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".promptclip-write-check-", dir=folder))
    except OSError as err:
        raise ConfigError(f"{what} ({err.strerror})") from None


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(tensors: Mapping[str, torch.Tensor], path: Path,
                        metadata: Mapping[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata=dict(metadata) if metadata else None)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def adapter_paths(path: str | Path) -> tuple[Path, Path]:
    """``(tensors, metadata)`` paths of an adapter given either file or the common stem."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def save_adapter(path: str | Path, method, backbone_name: str, backbone_fingerprint: str,
                 extra: Mapping[str, Any] | None = None) -> Path:
    """Write the method's learnable tensors and their metadata; returns the ``.safetensors`` path."""
    from .methods import method_source

    tensors_path, meta_path = adapter_paths(path)
    state = method.adapter_state()
    atomic_save_tensors(state, tensors_path)
    meta = {
        "format": ADAPTER_FORMAT,
        "method": method.name,
        "method_source": method_source(method.name).to_dict(),
        "config": to_dict(method.config),
        "backbone": {"name": backbone_name, "fingerprint": backbone_fingerprint},
        "classnames": list(method.classnames),
        "template": method.template,
        "num_trainable": int(sum(t.numel() for t in state.values())),
        "promptclip_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(dict(extra) if extra else {}),
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return tensors_path


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors_path, meta_path = adapter_paths(path)
    for p in (tensors_path, meta_path):
        if not p.exists():
            raise AdapterError(f"adapter file {p} does not exist (an adapter is a .safetensors + .json pair)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as err:  # not JSON, or not UTF-8
        raise AdapterError(f"adapter metadata {meta_path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"adapter metadata {meta_path} must be a JSON object, got {type(meta).__name__}")
    for key, kind in (("method", str), ("config", dict), ("backbone", dict), ("classnames", list)):
        if key not in meta:
            raise AdapterError(f"adapter metadata {meta_path} has no {key!r} entry")
        if not isinstance(meta[key], kind):
            raise AdapterError(f"adapter metadata {meta_path}: {key!r} must be a JSON {kind.__name__}, got "
                               f"{meta[key]!r}")
    try:
        tensors = load_file(tensors_path)
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"adapter tensors {tensors_path} cannot be read (truncated or corrupt?): {err}") from None
    check_finite(tensors, f"adapter tensors {tensors_path}", AdapterError,
                 "the file is damaged or the training that wrote it diverged; train or import it again")
    return meta, tensors


def check_method_available(meta: Mapping[str, Any], path: str | Path) -> None:
    """An :class:`AdapterError` saying which plugin to load when the adapter's method is not registered here."""
    from .methods import MethodSource, get_method_class

    try:
        get_method_class(meta["method"])
    except ConfigError as err:
        source = MethodSource.from_dict(meta.get("method_source"))
        if source is None:
            raise AdapterError(f"adapter {path}: {err}") from None
        if source.kind == "builtin" and _module_exists(source.spec):
            raise AdapterError(f"adapter {path}: {err}. Its metadata calls it a built-in method ({source.spec}), but "
                               f"{source.spec} of this promptclip defines no method {meta['method']!r}: the adapter's "
                               "metadata was edited or written by another program") from None
        raise AdapterError(f"adapter {path} was trained with method {meta['method']!r}, which is not loaded: "
                           f"{source.how_to_load()}") from None


def load_adapter(path: str | Path, backbone, backbone_fingerprint: str | None = None,
                 classnames: list[str] | None = None, template: str | None = None, expect_method: str | None = None):
    """Rebuild a method from an adapter onto ``backbone``; ``classnames`` swaps in other classes.

    With ``backbone_fingerprint`` the adapter must have been trained on that very backbone.
    """
    from .methods import create_method

    meta, tensors = read_adapter(path)
    if expect_method is not None and meta["method"] != expect_method:
        raise AdapterError(f"adapter {path} was trained with method {meta['method']!r}, not {expect_method!r}")
    check_method_available(meta, path)
    _check_backbone(path, meta, backbone_fingerprint)
    try:
        method = create_method(meta["method"], backbone, meta["classnames"], meta["config"],
                               template=meta.get("template"))
        method.load_adapter_state(tensors, strict=True)
        if classnames is not None:
            method.set_classnames(classnames, template)
    except ConfigError as err:
        raise AdapterError(f"adapter {path}: {err}") from None
    return method


def init_from_adapter(method, path: str | Path, backbone_fingerprint: str | None = None) -> dict[str, Any]:
    """Set ``method``'s learnable tensors to an adapter's (``train --init-adapter``): same method and tensor shapes,
    and with ``backbone_fingerprint`` the same backbone; options that do not change shapes come from ``method``'s
    own config. Returns the adapter's metadata."""
    meta, tensors = read_adapter(path)
    if meta["method"] != method.name:
        raise AdapterError(f"adapter {path} holds method {meta['method']!r}; it cannot initialise {method.name!r}")
    _check_backbone(path, meta, backbone_fingerprint)
    try:
        method.load_adapter_state(tensors, strict=True)
    except ConfigError as err:
        raise AdapterError(f"adapter {path} cannot initialise this {method.name} configuration: {err}") from None
    return meta


def _module_exists(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _check_backbone(path: str | Path, meta: Mapping[str, Any], fingerprint: str | None) -> None:
    saved = meta["backbone"]
    if fingerprint is not None and saved.get("fingerprint") != fingerprint:
        raise AdapterError(
            f"adapter {path} was trained on backbone {saved.get('name')!r} (fingerprint {saved.get('fingerprint')}); "
            f"the loaded backbone has fingerprint {fingerprint}. Load the same backbone weights, with the same "
            f"activation and architecture (--gelu/--quick-gelu/--backbone-arch), which the fingerprint covers."
        )


def teacher_adapter_path(path: str | Path) -> Path:
    """The ``.safetensors`` of a teacher given as an adapter file (either of the pair) or a run directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "adapter.safetensors"
    return adapter_paths(path)[0]


def teacher_digest(path: str | Path) -> str:
    """sha256 of a teacher adapter's tensors and metadata (what a run's config hash records of its teacher)."""
    import hashlib

    digest = hashlib.sha256()
    for part in adapter_paths(teacher_adapter_path(path)):
        if not part.exists():
            raise AdapterError(f"teacher adapter file {part} does not exist (an adapter is a .safetensors + .json "
                               "pair, or a run directory holding adapter.safetensors)")
        digest.update(part.read_bytes())
    return digest.hexdigest()


def load_teacher(path: str | Path, backbone=None, backbone_fingerprint: str | None = None):
    """A trained adapter as a frozen teacher (:attr:`promptclip.methods.PromptMethod.uses_teacher`): the adapter's
    method on the backbone its metadata names (loaded here unless ``backbone`` is given), every tensor frozen, in eval
    mode. The loaded backbone must have the fingerprint the adapter records. Its class names are the adapter's until
    the student sets its own."""
    tensors_path = teacher_adapter_path(path)
    meta, _ = read_adapter(tensors_path)
    check_method_available(meta, tensors_path)
    if backbone is None:
        name = meta["backbone"].get("name")
        if not name:
            raise AdapterError(f"teacher adapter {tensors_path} does not name its backbone")
        backbone, backbone_fingerprint = _teacher_backbone(str(name))
    teacher = load_adapter(tensors_path, backbone, backbone_fingerprint=backbone_fingerprint)
    teacher.requires_grad_(False)
    return teacher.eval()


def _teacher_backbone(name: str):
    """A teacher's frozen backbone by the name its adapter records, and its fingerprint."""
    from .clip.weights import backbone_fingerprint, load_backbone

    model, _ = load_backbone(name, progress=False)
    return model, backbone_fingerprint(model)
