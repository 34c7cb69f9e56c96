"""Pretrained CLIP weights: the OpenAI registry, verified downloads, and loading from local files.

Accepted sources for ``load_model(name_or_path)``:

- a registry name (``RN50`` ... ``ViT-L/14@336px``): downloaded once into :func:`cache_dir`, sha256-verified;
- a test backbone name (``tiny``, ``tiny-rn``, ``golden-mini``): seeded random weights, nothing is read;
- a path. The format is detected from the file's content, not from its suffix:

  * an OpenAI TorchScript archive (the official ``.pt`` files: a zip holding TorchScript code);
  * a plain state dict saved by ``torch.save`` (``.pt``/``.pth``/``.bin``; possibly nested under ``"state_dict"``
    or ``"model"`` with a ``"module."`` prefix, as open_clip and DDP checkpoints are) in OpenAI key layout;
  * a ``.safetensors`` file in OpenAI key layout;
  * a Hugging Face ``CLIPModel`` folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, possibly
    sharded), whose keys are mapped to OpenAI names by :func:`hf_to_openai_state_dict`.

Safety: no arbitrary pickled Python code ever runs. Plain checkpoints go through ``torch.load(weights_only=True)``,
whose unpickler only rebuilds tensors and plain containers, and safetensors files hold no code at all. TorchScript
archives are read with ``torch.jit.load``: the TorchScript deserializer compiles the archive's TorchScript IR (a
restricted, statically typed subset of Python interpreted by TorchScript, with no access to Python builtins or
modules) and restores tensor data with its own unpickler that only knows TorchScript types. It does not call Python's
``pickle`` on the archive, so loading such a file cannot execute arbitrary Python callables. We take only
``.state_dict()`` from the loaded archive and never run its code, then build our own ``promptclip.clip.model.CLIP``.

Every model returned is fp32, in eval mode, with ``requires_grad=False`` on all parameters.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import hashlib
import json
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import torch

from ..errors import BackboneWarning, WeightsError
from . import openclip
from .architectures import (
    ARCHITECTURES,
    GOLDEN_MINI_SEED,
    RANDOM_ONLY,
    SHAPE_FIELDS,
    architecture,
    architecture_names,
    build_random,
    config_from_state_dict,
    known_architectures_with_shapes,
    shapes_from_state_dict,
)
from .model import CLIP, OPENAI_MEAN, OPENAI_STD, CLIPConfig

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
class PretrainedWeights:
    """One downloadable checkpoint: ``architecture`` is a key of ``ARCHITECTURES``; ``sha256`` is the file's hash."""

    name: str
    architecture: str
    url: str
    sha256: str
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    quick_gelu: bool = True

    @property
    def filename(self) -> str:
        return os.path.basename(urllib.parse.urlparse(self.url).path)


_OPENAI_BASE = "https://openaipublic.azureedge.net/clip/models"


def _openai(name: str, sha256: str, filename: str) -> PretrainedWeights:
    return PretrainedWeights(name=name, architecture=name, url=f"{_OPENAI_BASE}/{sha256}/{filename}", sha256=sha256)


# Source: the ``_MODELS`` table of openai/CLIP, clip/clip.py. OpenAI puts each file's sha256 in its URL.
PRETRAINED: dict[str, PretrainedWeights] = {
    w.name: w
    for w in (
        _openai("RN50", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
        _openai("RN101", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
        _openai("RN50x4", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
        _openai("RN50x16", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
        _openai("RN50x64", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt"),
        _openai("ViT-B/32", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
        _openai("ViT-B/16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
        _openai("ViT-L/14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
        _openai("ViT-L/14@336px", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
                "ViT-L-14-336px.pt"),
    )
}


def available_models() -> list[str]:
    """Names of the downloadable pretrained models."""
    return list(PRETRAINED)


# --------------------------------------------------------------------------------------------------- downloads


def cache_dir() -> Path:
    """Where downloaded weights live: ``$PROMPTCLIP_CACHE`` if set, else ``~/.cache/promptclip``."""
    env = os.environ.get("PROMPTCLIP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "promptclip"


_default_cache_dir = cache_dir  # functions below take a ``cache_dir`` argument that shadows the name


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _local_file_hint(filename: str, dest_dir: Path) -> str:
    return (
        f"To use a copy you already have, pass its path instead of the name: "
        f'promptclip.clip.load("/path/to/{filename}") in Python, or --backbone /path/to/{filename} on the command '
        f"line. Or put the file in the cache as {dest_dir / filename} (cache directory {dest_dir}; set "
        f"PROMPTCLIP_CACHE to move it): it is checked against its sha256 and used without downloading."
    )


def download(url: str, sha256: str, dest_dir: str | os.PathLike, progress: bool = True, timeout: float = 60.0
             ) -> Path:
    """Download ``url`` into ``dest_dir`` (once) and return the verified file's path.

    A cached file with the right sha256 is returned as is; one with a wrong hash is downloaded again (with a
    warning). The download streams into a temporary file in ``dest_dir``, hashed on the fly, and is renamed into
    place only once verified, so an interrupted or corrupt download never leaves a file under the final name.
    """
    dest_dir = Path(dest_dir).expanduser()
    filename = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    target = dest_dir / filename
    sha256 = sha256.lower()
    if target.exists() and not target.is_file():
        raise WeightsError(f"{target} exists and is not a regular file; remove it or choose another cache directory.")
    if target.is_file():
        actual = file_sha256(target)
        if actual == sha256:
            return target
        warnings.warn(
            f"{target} is in the cache but its sha256 is {actual}, not {sha256}; downloading it again.", stacklevel=2
        )
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"cannot create the cache directory {dest_dir}: {e}. Set PROMPTCLIP_CACHE to a "
                           f"writable folder.") from e

    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest, received, expected_size = _stream(url, out, filename, progress, timeout, dest_dir)
        if expected_size is not None and received != expected_size:
            raise WeightsError(
                f"the download of {url} stopped after {received} of {expected_size} bytes (connection lost?). "
                f"Try again. {_local_file_hint(filename, dest_dir)}"
            )
        actual = digest.hexdigest()
        if actual != sha256:
            raise WeightsError(
                f"the file downloaded from {url} has sha256 {actual}, but {sha256} was expected; it was deleted. "
                f"The download was corrupted or the server sent another file: try again. "
                f"{_local_file_hint(filename, dest_dir)}"
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files; a cache may be shared
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM}


def _stream(url: str, out, filename: str, progress: bool, timeout: float, dest_dir: Path):
    from tqdm import tqdm

    def failed(reason: object, unreachable: bool = True) -> WeightsError:
        why = ("The machine looks offline or the server is unreachable." if unreachable
               else "The server is reachable but does not serve this file.")
        return WeightsError(f"could not download {url}: {reason}. {why} {_local_file_hint(filename, dest_dir)}")

    digest, received = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected_size = int(length) if length and length.isdigit() else None
            with tqdm(total=expected_size, unit="B", unit_scale=True, unit_divisor=1024, desc=filename,
                      disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise failed(f"the server answered HTTP {e.code} {e.reason}", unreachable=e.code >= 500) from e
    except urllib.error.URLError as e:
        raise failed(e.reason) from e
    except TimeoutError as e:
        raise failed(f"timed out after {timeout:g} s") from e
    except (ConnectionError, HTTPException) as e:
        raise failed(f"{type(e).__name__}: {e}") from e
    except OSError as e:
        if e.errno in _WRITE_ERRNOS:
            raise WeightsError(f"cannot write the download of {url} into {dest_dir}: {e}") from e
        raise failed(e) from e
    return digest, received, expected_size


# ------------------------------------------------------------------------------------------ format detection


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


def _read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated, still the only reader
            archive = torch.jit.load(str(path), map_location="cpu")
        state_dict = dict(archive.state_dict())
    except Exception as e:  # noqa: BLE001 - the TorchScript reader raises RuntimeError and others
        raise _corrupt(path, "a TorchScript archive", e) from e
    return state_dict


def _read_torch(path: Path) -> object:
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


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _corrupt(path, "a safetensors file", e) from e


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
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
            f"{path} holds a dict that is not a state dict of tensors: the entries {_preview(not_tensors)} are not "
            f"tensors (top-level keys: {_preview(list(obj))})."
        )
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _preview(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(map(str, keys[:limit]))
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


# ------------------------------------------------------------------------------------ Hugging Face CLIPModel

# Per-layer renames inside an encoder layer (HF -> OpenAI resblock). q/k/v are handled separately.
_HF_LAYER_RENAMES = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_HF_RENAMES = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
# HF stores projections as nn.Linear weights [out, in]; OpenAI multiplies x @ P with P of shape [in, out].
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_HF_IGNORED = re.compile(r"^(text_model|vision_model)\.embeddings\.position_ids$")
_HF_LAYER = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
_TOWER_PREFIX = {"text_model": "transformer.resblocks.", "vision_model": "visual.transformer.resblocks."}


def hf_to_openai_state_dict(hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a Hugging Face ``CLIPModel`` state dict to OpenAI key names and layouts.

    q/k/v projections are concatenated (in that order, as ``nn.MultiheadAttention`` packs them) into
    ``attn.in_proj_weight``/``in_proj_bias``; ``visual_projection``/``text_projection`` weights are transposed.
    ``position_ids`` buffers are ignored. A key no rule maps, or an incomplete q/k/v triple, raises WeightsError.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unmapped: list[str] = []
    for key, value in hf_state_dict.items():
        if _HF_IGNORED.match(key):
            continue
        if key in _HF_RENAMES:
            out[_HF_RENAMES[key]] = value
            continue
        if key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = value.t().contiguous()
            continue
        layer = _HF_LAYER.match(key)
        if layer:
            tower, index, rest = layer.groups()
            prefix = f"{_TOWER_PREFIX[tower]}{index}."
            if rest in _HF_LAYER_RENAMES:
                out[prefix + _HF_LAYER_RENAMES[rest]] = value
                continue
            proj = _HF_QKV.match(rest)
            if proj:
                qkv.setdefault((prefix, proj.group(2)), {})[proj.group(1)] = value
                continue
        unmapped.append(key)
    incomplete = []
    for (prefix, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            incomplete.append(f"{prefix}attn (has {'/'.join(sorted(parts))}_proj.{kind} only)")
            continue
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"{prefix}attn.{name}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unmapped or incomplete:
        problems = []
        if unmapped:
            problems.append(f"{len(unmapped)} keys with no OpenAI equivalent: {_preview(unmapped)}")
        if incomplete:
            problems.append(f"incomplete q/k/v projections: {_preview(incomplete)}")
        raise WeightsError("cannot map these Hugging Face CLIPModel weights to OpenAI layout: " + "; ".join(problems))
    return out


_QUICK_GELU_ACTS = {"quick_gelu": True, "gelu": False}


def hf_config_to_clip_config(hf_config: Mapping, state_dict: Mapping[str, torch.Tensor] | None = None,
                             source: str = "config.json") -> CLIPConfig:
    """A :class:`CLIPConfig` from a Hugging Face ``CLIPModel`` ``config.json`` dict.

    Values missing from the file take transformers' ``CLIPConfig`` defaults. When ``state_dict`` (OpenAI layout) is
    given, its shapes must agree with the config.
    """
    if hf_config.get("model_type", "clip") != "clip":
        raise WeightsError(f"{source} describes a {hf_config.get('model_type')!r} model; only Hugging Face "
                           f"CLIPModel folders (model_type 'clip') are supported.")
    text = {**_HF_TEXT_DEFAULTS, **(hf_config.get("text_config") or {})}
    vision = {**_HF_VISION_DEFAULTS, **(hf_config.get("vision_config") or {})}
    acts = {}
    for tower, cfg in (("text", text), ("vision", vision)):
        act = cfg["hidden_act"]
        if act not in _QUICK_GELU_ACTS:
            raise WeightsError(f"{source}: {tower} hidden_act {act!r} is not supported (our CLIP implements "
                               f"'quick_gelu' and 'gelu').")
        acts[tower] = _QUICK_GELU_ACTS[act]
        if abs(float(cfg.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
            warnings.warn(f"{source}: {tower} layer_norm_eps is {cfg['layer_norm_eps']}; our CLIP uses 1e-5, so "
                          f"outputs will differ slightly from transformers'.", BackboneWarning, stacklevel=3)
    if acts["text"] != acts["vision"]:
        raise WeightsError(f"{source}: the text and vision towers use different activations "
                           f"({text['hidden_act']} / {vision['hidden_act']}); our CLIP uses one for both.")
    try:
        config = CLIPConfig(
            embed_dim=int(hf_config.get("projection_dim", 512)),
            image_size=int(vision["image_size"]),
            vision_layers=int(vision["num_hidden_layers"]),
            vision_width=int(vision["hidden_size"]),
            vision_patch_size=int(vision["patch_size"]),
            vision_heads=int(vision["num_attention_heads"]),
            context_length=int(text["max_position_embeddings"]),
            vocab_size=int(text["vocab_size"]),
            text_width=int(text["hidden_size"]),
            text_heads=int(text["num_attention_heads"]),
            text_layers=int(text["num_hidden_layers"]),
            quick_gelu=acts["text"],
            vision_mlp_width=_hf_mlp_width(vision),
            text_mlp_width=_hf_mlp_width(text),
        )
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{source} has an invalid CLIP configuration: {e}") from e
    if state_dict is not None:
        try:
            inferred = shapes_from_state_dict(state_dict)
        except KeyError as e:
            raise WeightsError(f"{source}: the weights are not a complete CLIPModel: {e.args[0]}") from e
        diffs = [f"{f} {getattr(config, f)} in config vs {inferred[f]} in the weights"
                 for f in SHAPE_FIELDS if getattr(config, f) != inferred[f]]
        if diffs:
            raise WeightsError(f"{source} does not match its weights: " + "; ".join(diffs))
    return config


def _hf_mlp_width(tower: Mapping) -> int | None:
    width = int(tower["intermediate_size"])
    return None if width == 4 * int(tower["hidden_size"]) else width


# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults (ViT-B/32), for keys absent from a file.
_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5)
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)

_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")


def _read_hf_folder(folder: Path) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    config_path = folder / "config.json"
    try:
        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read {config_path}: {e}") from e
    if not isinstance(hf_config, dict):
        raise WeightsError(f"{config_path} is not a JSON object.")
    weights_name = next((n for n in _HF_WEIGHT_FILES if (folder / n).is_file()), None)
    if weights_name is None:
        raise WeightsError(f"{folder} has config.json but no weights: expected one of {', '.join(_HF_WEIGHT_FILES)}.")
    if weights_name.endswith(".index.json"):
        index_path = folder / weights_name
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"cannot read the shard index {index_path}: {e}") from e
        shards = sorted(set(weight_map.values()))
    else:
        shards = [weights_name]
    hf_state_dict: dict[str, torch.Tensor] = {}
    for shard in shards:
        shard_path = folder / shard
        if not shard_path.is_file():
            raise WeightsError(f"{folder}: the shard {shard} listed in {weights_name} does not exist.")
        fmt = detect_format(shard_path)
        if fmt == "safetensors":
            hf_state_dict.update(_read_safetensors(shard_path))
        elif fmt == "torch":
            hf_state_dict.update(_unwrap_state_dict(_read_torch(shard_path), shard_path))
        else:
            raise WeightsError(f"{shard_path} is a {fmt} file; a Hugging Face folder holds safetensors or "
                               f"pytorch_model.bin weights.")
    state_dict = hf_to_openai_state_dict(hf_state_dict)
    return state_dict, hf_config_to_clip_config(hf_config, state_dict, source=str(config_path))


# ------------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Declared:
    """What a weights source says about its model beyond the tensor shapes: a whole architecture (``config``:
    Hugging Face ``config.json``, open_clip's ``open_clip_config.json``, a registry entry), or only the activation
    (``quick_gelu``: OpenAI's archives). ``by`` names the source in messages."""

    config: CLIPConfig | None = None
    quick_gelu: bool | None = None
    by: str = ""


def read_state_dict(path: str | os.PathLike, sidecar: bool = True) -> tuple[dict[str, torch.Tensor], Declared]:
    """Read weights from any accepted local source: an OpenAI-layout state dict and what the source declares.

    With ``sidecar``, an open_clip weights file (``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``)
    reads the ``open_clip_config.json`` beside it, as the folder holding both does."""
    path = Path(path).expanduser()
    fmt = detect_format(path)
    declared = Declared()
    if fmt == "hf-folder":
        state_dict, config = _read_hf_folder(path)
        declared = Declared(config=config, by=str(path / "config.json"))
    elif fmt == "open_clip-folder":
        return read_state_dict(openclip.weights_in_folder(path), sidecar=True)
    elif fmt == "torchscript":
        state_dict = _read_torchscript(path)
        declared = Declared(quick_gelu=True, by="an OpenAI TorchScript archive (OpenAI's CLIPs use QuickGELU)")
    elif fmt == "safetensors":
        state_dict = _unwrap_state_dict(_read_safetensors(path), path)
    else:
        state_dict = _unwrap_state_dict(_read_torch(path), path)
    config_file = path.parent / openclip.CONFIG_FILE
    if sidecar and fmt in ("torch", "safetensors") and path.name in openclip.WEIGHT_FILES and config_file.is_file():
        declared = Declared(config=openclip.read_config_file(config_file), by=str(config_file))
    for key in NON_WEIGHT_KEYS:
        state_dict.pop(key, None)
    return state_dict, declared


def _how_to_state(source: str) -> str:
    return (f"State it: on the command line --gelu or --quick-gelu, or --backbone-arch with an architecture name "
            f"(e.g. ViT-B-16 for open_clip's GELU ViT-B-16, ViT-B-16-quickgelu, ViT-H-14) or an open_clip config "
            f"file (open_clip_config.json or model_configs/<name>.json); in Python, quick_gelu=True/False or "
            f"arch=NAME. open_clip's Hub folders say it themselves: pass the folder holding {openclip.CONFIG_FILE} "
            f"(or keep that file beside {openclip.WEIGHT_FILES[1]}). See docs/backbones.md.")


def infer_config(state_dict: Mapping[str, torch.Tensor], quick_gelu: bool | None, source: str) -> CLIPConfig:
    """The architecture of a state dict that declares none: the shapes, the heads of a known architecture with
    those shapes (``ARCHITECTURES``; 64-wide heads, with a warning, for unknown ones) and the given activation."""
    try:
        shapes = shapes_from_state_dict(state_dict)
    except (KeyError, ValueError, IndexError) as e:
        message = e.args[0] if e.args else str(e)
        raise WeightsError(
            f"{source} is not a CLIP state dict in OpenAI layout ({message}). Its first keys: "
            f"{_preview(list(state_dict), 10)}. Accepted: {ACCEPTED_FORMATS}."
        ) from e
    if quick_gelu is None:
        raise WeightsError(
            f"{source} does not say which activation its model uses, and a state dict cannot show it: OpenAI's "
            f"CLIPs, MetaCLIP, DFN and open_clip's *-quickgelu models use QuickGELU, open_clip's LAION-2B and "
            f"DataComp models (and most others it trains) GELU; the wrong one gives features about 1e-2 off without "
            f"any error. {_how_to_state(source)}"
        )
    known = known_architectures_with_shapes(shapes)
    heads = {(c.vision_heads, c.text_heads) for c in known.values()}
    if len(heads) == 1:
        vision_heads, text_heads = heads.pop()
        return CLIPConfig(**shapes, vision_heads=vision_heads, text_heads=text_heads, quick_gelu=quick_gelu)
    try:
        config = config_from_state_dict(state_dict, quick_gelu=quick_gelu)
    except ValueError as e:
        raise WeightsError(f"{source}: the width of its attention heads cannot be known and the default, 64, does "
                           f"not fit ({e}). State the architecture with --backbone-arch FILE.json (an open_clip model "
                           f"config with vision_cfg.head_width and text_cfg.heads), or arch= in Python.") from e
    warnings.warn(
        f"{source}: no known architecture has these shapes ({_describe(config)}), so the width of its attention "
        f"heads cannot be known; assuming 64 (OpenAI's and open_clip's default: {config.vision_heads} image heads, "
        f"{config.text_heads} text heads). If that is wrong the features are wrong: state the architecture with "
        f"--backbone-arch FILE.json (an open_clip model config), or arch= in Python.", BackboneWarning, stacklevel=3)
    return config


def architecture_from(arch: str | os.PathLike | CLIPConfig) -> tuple[CLIPConfig, str]:
    """``(config, description)`` of an architecture given as a config, a name (``architecture_names()``: OpenAI's
    names with QuickGELU, open_clip's with GELU or ``-quickgelu``) or an open_clip config JSON file."""
    if isinstance(arch, CLIPConfig):
        return arch, "the architecture given"
    name = os.fspath(arch)
    try:
        return architecture(name), f"the architecture {name}"
    except KeyError:
        pass
    if Path(name).expanduser().is_file():
        return openclip.read_config_file(Path(name).expanduser()), f"the architecture of {name}"
    close = difflib.get_close_matches(name, architecture_names(), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise WeightsError(f"architecture {name!r} is neither a known architecture name nor an existing file.{hint} "
                       f"Names: {', '.join(architecture_names())}; or an open_clip config JSON file.")


def choose_config(state_dict: Mapping[str, torch.Tensor], declared: Declared, source: str,
                  arch: str | os.PathLike | CLIPConfig | None = None, quick_gelu: bool | None = None
                  ) -> tuple[CLIPConfig, str]:
    """The architecture to build, and where it comes from: ``arch`` if given, else what the source declares, else
    the shapes (:func:`infer_config`); ``quick_gelu`` (if given) sets the activation in every case."""
    if arch is not None:
        config, origin = architecture_from(arch)
    elif declared.config is not None:
        config, origin = declared.config, f"declared by {declared.by}"
    else:
        activation = quick_gelu if quick_gelu is not None else declared.quick_gelu
        config = infer_config(state_dict, activation, source)
        origin = "inferred from its tensors" + (f", activation from {declared.by}"
                                              if quick_gelu is None and declared.quick_gelu is not None else "")
    if quick_gelu is not None and quick_gelu != config.quick_gelu:
        config = dataclasses.replace(config, quick_gelu=quick_gelu)
    said = declared.config.quick_gelu if declared.config is not None else declared.quick_gelu
    if said is not None and said != config.quick_gelu:
        warnings.warn(f"{source}: loading with {_activation(config.quick_gelu)} although {declared.by} says "
                      f"{_activation(said)}, the activation the weights were trained with.", BackboneWarning,
                      stacklevel=3)
    return config, origin


def _activation(quick_gelu: bool) -> str:
    return "QuickGELU" if quick_gelu else "GELU"


def model_from_state_dict(state_dict: Mapping[str, torch.Tensor], config: CLIPConfig | None = None,
                          quick_gelu: bool | None = None, source: str = "the state dict",
                          origin: str = "inferred from it") -> CLIP:
    """Build a fp32 :class:`CLIP` holding ``state_dict`` (OpenAI layout), checked strictly against its keys.

    Without ``config`` the architecture is inferred (:func:`infer_config`: ``quick_gelu`` is then required)."""
    state_dict = {k: v for k, v in state_dict.items() if k not in NON_WEIGHT_KEYS}
    if config is None:
        config = infer_config(state_dict, quick_gelu, source)
    elif quick_gelu is not None and quick_gelu != config.quick_gelu:
        config = dataclasses.replace(config, quick_gelu=quick_gelu)
    with torch.device("meta"):
        model = CLIP(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {_preview(shapes)}")
        raise WeightsError(f"{source} does not fit the CLIP architecture {origin} ({_describe(config)}): "
                           + "; ".join(parts) + ".")
    tensors = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()).contiguous()
               for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return _frozen(model)


def _describe(config: CLIPConfig) -> str:
    if config.is_vit:
        tower = (f"ViT width {config.vision_width}, {config.vision_layers} layers, patch {config.vision_patch_size}, "
                 f"{config.vision_heads} heads of {config.vision_head_width}")
    else:
        tower = f"ResNet layers {config.vision_layers}, width {config.vision_width}"
    return (f"{tower}, image {config.image_size}; text width {config.text_width}, {config.text_layers} layers, "
            f"{config.text_heads} heads of {config.text_head_width}; embed {config.embed_dim}; "
            f"{_activation(config.quick_gelu)}")


def _frozen(model: CLIP) -> CLIP:
    model.float().eval()
    model.requires_grad_(False)
    return model


_WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".jit"}


def resolve(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, progress: bool = True
            ) -> tuple[str, object]:
    """What a name points at, downloaded if needed: ``("pretrained", local_path)`` (OpenAI's registry),
    ``("hub", (local_path, Declared))`` (open_clip names), ``("random", name)`` or ``("path", path)``."""
    name = os.fspath(name_or_path)
    if name in PRETRAINED:
        entry = PRETRAINED[name]
        root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
        return "pretrained", download(entry.url, entry.sha256, root, progress=progress)
    if name.startswith(openclip.OPEN_CLIP_PREFIX) or name.startswith(openclip.HF_HUB_PREFIX):
        return "hub", _resolve_hub(name, cache_dir)
    if name in RANDOM_ONLY:
        return "random", name
    path = Path(name).expanduser()
    if path.exists():
        return "path", path
    looks_like_path = (name.startswith(("/", "./", "../", "~")) or "\\" in name or name.count("/") >= 2
                       or path.suffix.lower() in _WEIGHT_SUFFIXES)
    if looks_like_path:
        raise WeightsError(f"no such file or directory: {path.absolute()} (give the path of a weights file or "
                           f"Hugging Face CLIPModel folder, or a model name: {', '.join(PRETRAINED)})")
    names = list(PRETRAINED) + list(RANDOM_ONLY)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    open_clip_names = [w.name for w in openclip.OPEN_CLIP_PRETRAINED.values() if w.model == name]
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    if open_clip_names:
        hint += f" As an open_clip name, {name} has the weights {', '.join(open_clip_names)}."
    raise WeightsError(
        f"{name!r} is neither a known model name nor an existing file or folder.{hint} Available models: "
        f"{', '.join(PRETRAINED)}; open_clip's as open_clip:<model>/<tag> or hf-hub:<repo> (`promptclip list "
        f"backbones`); random-weight test backbones: {', '.join(RANDOM_ONLY)}; or pass the path of a weights file, "
        f"open_clip Hub folder or Hugging Face CLIPModel folder."
    )


def _resolve_hub(name: str, cache_dir: str | os.PathLike | None) -> tuple[Path, Declared]:
    """An open_clip name downloaded from the Hub: the weights file and the architecture that goes with it."""
    if name.startswith(openclip.OPEN_CLIP_PREFIX):
        entry = openclip.lookup(name)
    else:
        repo_id = openclip.hub_repo(name)
        entry = openclip.entry_for_repo(repo_id)
    if entry is not None:
        activation = "--quick-gelu" if entry.quick_gelu else "--gelu"
        path = openclip.hub_download(entry.hf_hub, openclip.WEIGHT_FILES, cache_dir, what=entry.name,
                                     activation_hint=activation)
        return path, Declared(config=entry.config, by=f"promptclip's registry entry {entry.name}")
    config_path = openclip.hub_download(repo_id, (openclip.CONFIG_FILE,), cache_dir, what=name)
    config = openclip.read_config_file(config_path)
    path = openclip.hub_download(repo_id, openclip.WEIGHT_FILES, cache_dir, what=name,
                                 activation_hint="--quick-gelu" if config.quick_gelu else "--gelu")
    return path, Declared(config=config, by=f"{repo_id}'s {openclip.CONFIG_FILE}")


def load_backbone(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                  cache_dir: str | os.PathLike | None = None, quick_gelu: bool | None = None, progress: bool = True,
                  seed: int = GOLDEN_MINI_SEED, arch: str | os.PathLike | CLIPConfig | None = None
                  ) -> tuple[CLIP, str]:
    """Load a frozen fp32 CLIP and say where it came from.

    Returns ``(model, source)``: ``source`` is the local file or folder read (downloaded first for registry
    names), or ``"random:<name>:seed=<seed>"`` for the test backbones. The architecture is the one ``arch`` names
    (:func:`architecture_from`), else the one the source declares (registry entry, ``config.json``,
    ``open_clip_config.json``), else the one of its shapes; ``quick_gelu`` sets the activation. A plain state dict
    does not say its activation: without ``quick_gelu`` or ``arch`` it is an error that says how to state it.
    """
    kind, where = resolve(name_or_path, cache_dir=cache_dir, progress=progress)
    if kind == "random":
        if arch is not None:
            raise WeightsError(f"{name_or_path} is a test backbone with its own architecture; an architecture "
                               "(--backbone-arch, arch=) applies only to weights files")
        config = ARCHITECTURES[where]
        if quick_gelu is not None and quick_gelu != config.quick_gelu:
            config = dataclasses.replace(config, quick_gelu=quick_gelu)
        model = _frozen(build_random(config, seed=seed))
        source = f"random:{where}:seed={seed}"
    else:
        if kind == "hub":
            where, declared = where
            state_dict, _ = read_state_dict(where, sidecar=False)  # the registry entry or the config read before
        else:
            state_dict, declared = read_state_dict(where)
        if kind == "pretrained":
            entry = PRETRAINED[os.fspath(name_or_path)]
            declared = Declared(quick_gelu=entry.quick_gelu, by=f"the registry entry {entry.name}")
        from ..finite import check_finite

        check_finite(state_dict, f"backbone weights {where}", WeightsError, "the file is damaged; get it again")
        config, origin = choose_config(state_dict, declared, str(where), arch, quick_gelu)
        model = model_from_state_dict(state_dict, config=config, source=str(where), origin=origin)
        source = str(where)
    return model.to(device), source


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
               cache_dir: str | os.PathLike | None = None, quick_gelu: bool | None = None, progress: bool = True,
               seed: int = GOLDEN_MINI_SEED, arch: str | os.PathLike | CLIPConfig | None = None) -> CLIP:
    """A frozen fp32 CLIP in eval mode from a registry name, a test backbone name or a local path."""
    return load_backbone(name_or_path, device=device, cache_dir=cache_dir, quick_gelu=quick_gelu,
                         progress=progress, seed=seed, arch=arch)[0]


# --------------------------------------------------------------------------------------------- fingerprint

FINGERPRINT_SAMPLES = 64


def backbone_fingerprint(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A short (16 hex digits) stable hash identifying a backbone's weights, cheap for any model size.

    sha256 over, for each state-dict key in sorted order: the key, the tensor's shape, and ``FINGERPRINT_SAMPLES``
    values at evenly spaced flat indices (``i * numel // n``) plus the last value, as float32 little-endian bytes.
    Two different checkpoints (another model, or a fine-tune) differ at the sampled positions with overwhelming
    probability; it is not a proof that every value is identical (use ``state_dict_sha256`` for that). Values are
    hashed as float32, so the same weights give the same fingerprint on any device.

    For a :class:`CLIP`, the choices that change its features without changing its tensors are hashed too when
    they are not OpenAI's (GELU, heads other than 64 wide, another pixel normalisation): the same file loaded with
    another activation is another backbone, and an adapter trained on one does not load onto the other.
    """
    state_dict = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module)
                  else model_or_state_dict)
    digest = hashlib.sha256()
    if isinstance(model_or_state_dict, CLIP) and (choices := _non_openai_choices(model_or_state_dict.config)):
        digest.update(json.dumps(choices, sort_keys=True).encode("utf-8"))
    for key in sorted(state_dict):
        tensor = state_dict[key].detach()
        digest.update(key.encode("utf-8"))
        digest.update(repr(tuple(tensor.shape)).encode("ascii"))
        flat = tensor.reshape(-1)
        numel = flat.numel()
        if numel:
            n = min(FINGERPRINT_SAMPLES, numel)
            index = torch.cat([torch.arange(n, device=flat.device) * numel // n,
                               torch.tensor([numel - 1], device=flat.device)])
            sample = flat[index].to(device="cpu", dtype=torch.float32).contiguous()
            digest.update(sample.numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()[:16]


def _non_openai_choices(config: CLIPConfig) -> dict:
    """The architecture choices of ``config`` that differ from OpenAI's conventions and no tensor shape shows."""
    choices = {}
    if not config.quick_gelu:
        choices["quick_gelu"] = False
    if config.vision_head_width != 64:
        choices["vision_heads"] = config.vision_heads
    if config.text_head_width != 64:
        choices["text_heads"] = config.text_heads
    if config.image_mean != OPENAI_MEAN or config.image_std != OPENAI_STD:
        choices["image_mean"], choices["image_std"] = list(config.image_mean), list(config.image_std)
    return choices
