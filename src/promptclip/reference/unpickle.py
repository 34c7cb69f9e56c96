"""Read ``torch.save`` files without running any code from them.

``torch.load(weights_only=True)`` cannot read the reference repositories' checkpoints: Dassl pickles its learning-rate
scheduler, a ``CosineAnnealingLR`` object holding the whole SGD optimizer (whose ``state`` is a
``collections.defaultdict``). ``torch.load(weights_only=False)`` would read them but runs whatever the pickle says.
This module reads the zip archive that ``torch.save`` writes (``<archive>/data.pkl`` and the raw storages in
``<archive>/data/<key>``) itself, with an unpickler that:

- rebuilds tensors with its own functions (never torch's) from storages it reads from the archive, and plain
  containers (``OrderedDict``, ``dict``, ``list``, ``set``, ...);
- turns every other global a checkpoint of these repositories holds (optimizer and scheduler classes, ``defaultdict``,
  numpy scalars, Dassl or yacs objects, ...) into an inert placeholder class of its own: calling, building or filling
  a placeholder only records the arguments; no method of the named class is ever imported or called;
- refuses every other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) before anything of the file
  is used, with a :class:`ForbiddenGlobalError`.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import PromptClipError


class TorchFileError(PromptClipError):
    """A file is not a readable ``torch.save`` archive (empty, truncated, corrupt, legacy format)."""


class ForbiddenGlobalError(TorchFileError):
    """The pickle names a global that no checkpoint needs (possible code execution): nothing was run."""


#: Storage classes named in the storages' persistent ids -> the dtype of their elements.
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}

#: Globals that stand for an inert placeholder: classes whose objects a checkpoint pickles next to its tensors.
INERT_MODULES = ("torch.optim", "numpy", "dassl", "yacs")
INERT_GLOBALS = {
    ("collections", "defaultdict"), ("collections", "Counter"), ("collections", "deque"),
    ("builtins", "object"), ("builtins", "slice"), ("builtins", "complex"), ("builtins", "bytearray"),
    ("copyreg", "_reconstructor"), ("_codecs", "encode"),
    ("torch", "device"), ("torch", "Size"), ("torch", "dtype"), ("torch", "layout"), ("torch", "memory_format"),
    *(("torch", name) for name in ("float16", "float32", "float64", "bfloat16", "half", "float", "double", "int64",
                                   "int32", "int16", "int8", "uint8", "bool", "long", "int", "strided")),
}
#: Builtin containers rebuilt as themselves (calling them with file data cannot run code).
CONTAINERS = {"dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


class Inert:
    """Base of the placeholders: records what the pickle gives it and does nothing else."""

    qualname: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, values=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["items"][key] = value

    def append(self, value: Any) -> None:
        self.__dict__["values"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["values"].extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


class _StorageType:
    """What ``torch.FloatStorage`` and friends unpickle to: a dtype marker, not callable."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    # The signature of torch._utils._rebuild_tensor_v2 (requires_grad, backward hooks and metadata are dropped).
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError(f"a tensor is rebuilt from {type(storage).__name__}, not from a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    return torch.as_strided(storage, size, stride, int(offset))  # raises when the view exceeds the storage


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    # torch._utils._rebuild_parameter(data, requires_grad, backward_hooks[, state]): the tensor itself.
    return data


REAL_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}


def _normalise(module: str, name: str) -> tuple[str, str]:
    """Python 2 names, as protocol-2 pickles (torch's default) write them, to Python 3 ones."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def is_inert(module: str, name: str) -> bool:
    return (module, name) in INERT_GLOBALS or any(module == m or module.startswith(m + ".") for m in INERT_MODULES)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a torch archive; storages come from ``read_storage(key, dtype, numel)``."""

    def __init__(self, data: bytes, read_storage):
        super().__init__(io.BytesIO(data))
        self._read_storage = read_storage
        self._storages: dict[str, torch.Tensor] = {}
        self._placeholders: dict[str, type] = {}
        #: Every global the pickle named, as ``module.name``, in order of first appearance.
        self.globals_seen: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        module, name = _normalise(module, name)
        qualname = f"{module}.{name}"
        if qualname not in self.globals_seen:
            self.globals_seen.append(qualname)
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in REAL_GLOBALS:
            return REAL_GLOBALS[(module, name)]
        if module == "builtins" and name in CONTAINERS:
            return CONTAINERS[name]
        if is_inert(module, name):
            if qualname not in self._placeholders:
                self._placeholders[qualname] = type(f"Inert_{name}", (Inert,), {"qualname": qualname})
            return self._placeholders[qualname]
        raise ForbiddenGlobalError(f"the pickle names the global {qualname}, which no checkpoint needs")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r:.80}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, int(numel))
        stored = self._storages[key]
        if stored.dtype != storage_type.dtype:
            raise pickle.UnpicklingError(f"storage {key} is read as {stored.dtype} and as {storage_type.dtype}")
        return stored


def load_torch_file(path: str | Path) -> Any:
    """The object a ``torch.save`` zip archive holds, rebuilt without running code from the file (module docstring).

    Tensors are CPU tensors with the saved dtype; placeholders are :class:`Inert` instances.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise TorchFileError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise TorchFileError(f"{path} is a folder, not a checkpoint file") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise TorchFileError(_not_an_archive(path, err)) from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchFileError(f"{path} is a zip file but not a torch.save archive (no <archive>/data.pkl entry)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() not in (b"little", b""):
            raise TorchFileError(f"{path} was saved on a big-endian machine; only little-endian archives are read")

        def read_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            name = f"{prefix}data/{key}"
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise pickle.UnpicklingError(f"the archive has no storage {name}") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            nbytes = numel if dtype is torch.uint8 else numel * itemsize
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != nbytes:
                raise pickle.UnpicklingError(
                    f"storage {name} holds {info.file_size} bytes (compression {info.compress_type}); "
                    f"{numel} x {dtype} needs {nbytes} uncompressed")
            raw = archive.read(name)
            if not raw:
                return torch.empty(0, dtype=dtype)
            return torch.frombuffer(bytearray(raw), dtype=dtype)

        try:
            unpickler = RestrictedUnpickler(archive.read(pickles[0]), read_storage)
            return unpickler.load()
        except ForbiddenGlobalError as err:
            raise ForbiddenGlobalError(f"refused to load {path}: {err}; nothing from the file was run") from None
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise TorchFileError(_not_an_archive(path, err)) from None
        except Exception as err:  # noqa: BLE001 - a malformed pickle: UnpicklingError, TypeError, RuntimeError, ...
            raise TorchFileError(f"cannot read {path}: {type(err).__name__}: {err} (a corrupt or unusual "
                                 "torch.save file; nothing from it was run)") from None


def _not_an_archive(path: Path, err: Exception) -> str:
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return f"{path} is empty (0 bytes): an interrupted download or copy?"
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head[:1] == b"\x80":
        return (f"{path} is in torch's legacy (pre-1.6) serialization format, which this reader does not support "
                "safely; re-save it with torch >= 1.6 from a trusted environment")
    return (f"{path} ({size:,} bytes) is not a complete torch.save archive ({type(err).__name__}: {err}); the file "
            "is truncated or corrupt: download or copy it again")
