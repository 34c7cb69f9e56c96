"""Weights files by their content: detecting the format of a file or folder and reading the single-file formats.

Safety: no arbitrary pickled Python code ever runs. Plain checkpoints go through ``torch.load(weights_only=True)``,
whose unpickler only rebuilds tensors and plain containers, and safetensors files hold no code at all. TorchScript
archives are read with ``torch.jit.load``: the TorchScript deserializer compiles the archive's TorchScript IR (a
restricted, statically typed subset of Python interpreted by TorchScript, with no access to Python builtins or
modules) and restores tensor data with its own unpickler that only knows TorchScript types. It does not call Python's
``pickle`` on the archive, so loading such a file cannot execute arbitrary Python callables. We take only
``.state_dict()`` from the loaded archive and never run its code, then build our own ``promptclip.clip.model.CLIP``.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import WeightsError
from .. import openclip
from ..model import CLIPConfig

# Keys of OpenAI's TorchScript archives that are not weights (read by OpenAI's build_model, dropped there too).
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")

ACCEPTED_FORMATS = (
    "an OpenAI TorchScript archive (the official .pt files), "
    "a state dict saved with torch.save (.pt/.pth/.bin, OpenAI key names, e.g. open_clip's), "
    "a .safetensors file (OpenAI key names), "
    "an open_clip Hub folder (open_clip_config.json + open_clip_model.safetensors or open_clip_pytorch_model.bin), "
    "or a Hugging Face CLIPModel folder (config.json + model.safetensors or pytorch_model.bin)"
)


@dataclass(frozen=True)
class Declared:
    """What a weights source says about its model beyond the tensor shapes: a whole architecture (``config``:
    Hugging Face ``config.json``, open_clip's ``open_clip_config.json``, a registry entry), or only the activation
    (``quick_gelu``: OpenAI's archives). ``by`` names the source in messages."""

    config: CLIPConfig | None = None
    quick_gelu: bool | None = None
    by: str = ""


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size:,} bytes"


def _corrupt(path: Path, what: str, error: BaseException) -> WeightsError:
    return WeightsError(
        f"{path} ({_size(path)}) looks like {what} but cannot be read; it is probably truncated or corrupt "
        f"(an interrupted download or copy?): {type(error).__name__}: {error}. Download or save it again."
    )


def detect_format(path: str | os.PathLike) -> str:
    """``"torchscript"``, ``"torch"``, ``"safetensors"``, ``"hf-folder"`` or ``"open_clip-folder"``, from the
    content of ``path``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"no such file or directory: {path.absolute()}")
    if path.is_dir():
        # open_clip's Hub repositories often hold a transformers (or timm) copy too: open_clip's files come first.
        if openclip.weights_in_folder(path) is not None:
            return "open_clip-folder"
        if not (path / "config.json").is_file():
            raise WeightsError(
                f"{path} is a folder without config.json nor {openclip.WEIGHT_FILES[1]}. A folder must be a "
                f"Hugging Face CLIPModel folder (config.json + model.safetensors or pytorch_model.bin) or an open_clip "
                f"Hub folder ({openclip.CONFIG_FILE} + {' or '.join(openclip.WEIGHT_FILES)}); otherwise pass the "
                f"weights file itself. Accepted: {ACCEPTED_FORMATS}."
            )
        return "hf-folder"
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise WeightsError(f"{path} is empty (0 bytes); download or save it again.")
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise _corrupt(path, "a zip archive (PyTorch checkpoint or TorchScript archive)", e) from e
        if any("/code/" in n for n in names) or any(n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return "torch"
        raise WeightsError(f"{path} is a zip archive but neither a PyTorch checkpoint nor a TorchScript archive. "
                           f"Accepted: {ACCEPTED_FORMATS}.")
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 little-endian header size, then a JSON header
        header_size = int.from_bytes(head[:8], "little")
        if 8 + header_size > path.stat().st_size:
            raise _corrupt(path, "a safetensors file", ValueError(f"header of {header_size} bytes past end of file"))
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle stream (protocol >= 2): torch.save's legacy, non-zip format
        return "torch"
    raise WeightsError(f"{path} ({_size(path)}) is not a format promptclip can read. Accepted: {ACCEPTED_FORMATS}.")


# ---------------------------------------------------------------------------------------------- file readers


def read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated, still the only reader
            archive = torch.jit.load(str(path), map_location="cpu")
        state_dict = dict(archive.state_dict())
    except Exception as e:  # noqa: BLE001 - the TorchScript reader raises RuntimeError and others
        raise _corrupt(path, "a TorchScript archive", e) from e
    return state_dict


def read_torch(path: Path) -> object:
    try:
        # An open file, not a path: torch.load hands paths ending in .safetensors to safetensors, and we go by content.
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "WeightsUnpickler error" in line), lines[-1] if lines else "")
        refused = re.search(r"Unsupported global: GLOBAL (\S*)", detail)
        # A well-formed qualified name is a real pickled object; a mangled one ("GLOBAL .") is a truncated stream.
        if refused and re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Za-z_]\w*", refused.group(1)):
            raise WeightsError(
                f"{path} holds pickled Python objects other than tensors (a whole pickled model or custom classes?). "
                f"promptclip only loads weights and never runs pickled code: save a state dict instead, e.g. "
                f"torch.save(model.state_dict(), path), or use safetensors. ({detail})"
            ) from e
        raise _corrupt(path, "a torch.save checkpoint", e) from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as e:
        raise _corrupt(path, "a torch.save checkpoint", e) from e


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _corrupt(path, "a safetensors file", e) from e


def unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint (possibly under "state_dict"/"model"), "module." stripped."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        nested = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path} does not hold a state dict (found {type(obj).__name__}); expected a dict of "
                           f"tensors, possibly under 'state_dict' or 'model'.")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(
            f"{path} holds a dict that is not a state dict of tensors: the entries {preview(not_tensors)} are not "
            f"tensors (top-level keys: {preview(list(obj))})."
        )
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def preview(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(map(str, keys[:limit]))
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown
