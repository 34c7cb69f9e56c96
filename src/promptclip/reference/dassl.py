"""Checkpoints written by the reference repositories' Dassl trainers, imported as promptclip adapters.

A Dassl output folder holds ``<dir>/<registered name>/model.pth.tar-<epoch>`` (and ``model-best.pth.tar`` when the
run validated), each ``torch.save({"state_dict", "epoch", "optimizer", "scheduler", "val_result"})``. What the state
dict holds depends on what the trainer registered (:data:`LAYOUTS`):

- CoOp, CoCoOp, KgCoOp, ProGrad, TCP and RPO register their prompt learner (``prompt_learner``): keys are relative
  to it (``ctx``, ``text_prompt``);
- MMA registers its adapter learner (``adapter_learner``): keys are relative to it (``text_adapter.5.up.weight``),
  with the fixed prompts' ``token_embedding`` and ``tokenized_prompts`` buffers (dropped and rebuilt);
- DePT registers its whole model (``PromptLearner`` over CoOp, ``MultiModalPromptLearner`` over MaPLe);
- MaPLe and CoPrompt (``MultiModalPromptLearner``; CoPrompt adds ``adapter_*`` and its frozen teacher, a second
  plain CLIP under ``model_distill.*``), IVLP and PromptSRC (``VLPromptLearner``), VPT (``prompt_learner``) and
  CMPA/DCP (``MultiModalPromptLearner``) register the whole model: keys are the model's (``prompt_learner.ctx``,
  ``image_encoder.VPT``), and the frozen CLIP is saved with them (PromptSRC: twice, ``prompt_learner.ZS_image_encoder``
  is a second image tower); MMRL and MMRL++ register their whole CustomCLIP as ``MultiModalRepresentationLearner``
  (with a ``prompt_embeddings`` class buffer, dropped and rebuilt like the token buffers).

Importing keeps the learned tensors (renamed with the method's ``reference_name_map``, cast to fp32 masters), drops
the class-dependent buffers (``token_prefix``/``token_suffix``, rebuilt from the class names as the reference does),
compares the frozen CLIP tensors a file carries with the backbone in use (a warning when they differ: the prompts
were trained for other weights), and checks what the tensor shapes say (context length, depths, class-specific
context, widths) against the method's config. Files are read with :mod:`promptclip.reference.unpickle`: nothing in
them is run.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, PromptClipError
from ..finite import check_finite
from .unpickle import Inert, TorchFileError, load_torch_file


class DasslCheckpointError(PromptClipError):
    """A Dassl checkpoint cannot be found, read, or does not fit the method it is imported for."""


class FrozenWeightsWarning(UserWarning):
    """The frozen CLIP saved in a checkpoint differs from the backbone in use."""


BEST_FILE = "model-best.pth.tar"
EPOCH_FILE = re.compile(r"^model\.pth\.tar-(\d+)$")
#: Class-dependent buffers: rebuilt from the class names (the reference's ``load_model`` deletes them too).
CLASS_BUFFERS = ("token_prefix", "token_suffix", "token_midfix", "prompt_embeddings",
                 # PromptKD's teacher prompt learner splits them at ceil(n/2) in base-to-novel runs.
                 "token_prefix2", "token_suffix2")


# -- what each trainer saves -----------------------------------------------------------------------------------------


def _clip_towers(key: str) -> str | None:
    """Frozen tensors of MaPLe / IVLP / VPT / PromptSRC (``image_encoder.*``, ``text_encoder.*``) -> backbone keys."""
    if "VPT" in key:  # prompts inside the towers are learned, never frozen
        return None
    if key == "logit_scale":
        return key
    if key.startswith("image_encoder."):
        return "visual." + key.removeprefix("image_encoder.")
    if key.startswith("text_encoder."):
        return key.removeprefix("text_encoder.")
    return None


def _promptsrc_towers(key: str) -> str | None:
    if key.startswith("prompt_learner.ZS_image_encoder."):  # the frozen teacher: the CLIP image tower once more
        return "visual." + key.removeprefix("prompt_learner.ZS_image_encoder.")
    return _clip_towers(key)


def _coprompt_towers(key: str) -> str | None:
    """CoPrompt: MaPLe's towers, plus its frozen teacher ``model_distill.*``, a whole plain CLIP saved once more."""
    if key.startswith("model_distill."):
        return key.removeprefix("model_distill.")
    return _clip_towers(key)


_CMPA_FROZEN = (
    (re.compile(r"^encoder\.resblocks\.(\d+)\.visual_attn\.(.+)$"), r"visual.transformer.resblocks.\1.\2"),
    (re.compile(r"^encoder\.resblocks\.(\d+)\.text_attn\.(.+)$"), r"transformer.resblocks.\1.\2"),
    (re.compile(r"^encoder\.(conv1|ln_pre|ln_post)_visual\.(.+)$"), r"visual.\1.\2"),
    (re.compile(r"^encoder\.(class_embedding|positional_embedding|proj)_visual$"), r"visual.\1"),
    (re.compile(r"^encoder\.(positional_embedding|text_projection|ln_final\..+)$"), r"\1"),
    (re.compile(r"^logit_scale$"), "logit_scale"),
)


def _cmpa_towers(key: str) -> str | None:
    """CMPA's merged encoder (``encoder.resblocks.<i>.visual_attn`` / ``text_attn``, ``*_visual``) -> backbone keys."""
    for pattern, target in _CMPA_FROZEN:
        if pattern.match(key):
            return pattern.sub(target, key)
    return None


def _no_towers(key: str) -> str | None:
    return None


def _depth(tensors: Mapping[str, torch.Tensor], first: str, deeper: str, offset: int = 0) -> int:
    """Prompted layers: ``first`` is layer 0, ``deeper`` (a regex whose group 1 is the layer index minus
    ``offset``) layers 1 .. J-1; returns J."""
    if first not in tensors:
        return 0
    pattern = re.compile(deeper)
    layers = [int(m.group(1)) + offset for k in tensors if (m := pattern.fullmatch(k))]
    return 1 + max(layers, default=0)


def _infer_coop(t: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    ctx = t["prompt_learner.ctx"]
    return {"n_ctx": ctx.shape[-2], "csc": ctx.dim() == 3}


def _infer_cocoop(t: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return {"n_ctx": t["prompt_learner.ctx"].shape[0]}


def _infer_tcp(t: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return {"n_ctx": t["prompt_learner.ctx"].shape[0]}


def _infer_maple(t: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return {"n_ctx": t["prompt_learner.ctx"].shape[0],
            "depth": _depth(t, "prompt_learner.ctx", r"prompt_learner\.compound_prompts_text\.(\d+)", offset=1)}


def _infer_vision(t: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    if "image_encoder.VPT" not in t:
        return {"depth_vision": 0}
    deeper = r"image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow"
    return {"n_ctx_vision": t["image_encoder.VPT"].shape[0], "depth_vision": _depth(t, "image_encoder.VPT", deeper)}


def _infer_ivlp(t: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return {"n_ctx_text": t["prompt_learner.ctx"].shape[0],
            "depth_text": _depth(t, "prompt_learner.ctx", r"text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow"),
            **_infer_vision(t)}


_MMA_ADAPTER = re.compile(r"^adapter_learner\.text_adapter\.(\d+)\.down\.0\.weight$")


def _infer_rpo(t: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return {"k": t["prompt_learner.text_prompt"].shape[0]}


def _infer_mma(t: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    indices = sorted(int(m.group(1)) for k in t if (m := _MMA_ADAPTER.match(k)))
    if not indices:
        raise KeyError("adapter_learner.text_adapter.<i>.down.0.weight")
    first = t[f"adapter_learner.text_adapter.{indices[0]}.down.0.weight"]
    return {"adapter_start": indices[0], "adapter_end": indices[-1], "adapter_dim": first.shape[0]}


_CMPA_BLOCK = re.compile(r"^encoder\.resblocks\.(\d+)\.prompt_attn\.(.+)$")


def _infer_dcp(t: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    first = {m.group(2): v for k, v in t.items() if (m := _CMPA_BLOCK.match(k)) and m.group(1) == "0"}
    others = [(m.group(2), v) for k, v in t.items() if (m := _CMPA_BLOCK.match(k)) and m.group(1) != "0"]
    shared = all(name in first and first[name].shape == v.shape and torch.equal(first[name], v) for name, v in others)
    return {"n_ctx": t["prompt_learner.prompts_text"].shape[0], "shared": shared}


def _cmpa_alias(key: str) -> str | None:
    """With one shared CMPA block, ``state_dict()`` saves it under every layer: those keys repeat layer 0's."""
    match = _CMPA_BLOCK.match(key)
    return f"encoder.resblocks.0.prompt_attn.{match.group(2)}" if match and match.group(1) != "0" else None


def _infer_mmrl(t: Mapping[str, torch.Tensor], projection: str = "image_encoder.proj_rep") -> dict[str, Any]:
    """MMRL / MMRL++: the representation tokens give N and the representation width (the layers' count shows in
    the per-layer tensors, their block numbers nowhere); ``projection``, which only that family member saves, tells
    the two apart before any value is compared."""
    t[projection]  # noqa: B018 (a KeyError names the missing tensor)
    n_rep_tokens, rep_dim = t["representation_learner.compound_rep_tokens"].shape
    return {"n_rep_tokens": n_rep_tokens, "rep_dim": rep_dim}


def _infer_mmrlpp(t: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return _infer_mmrl(t, "representation_learner.srra_r2tproj.weight")


@dataclass(frozen=True)
class Layout:
    """Where and how one method's reference trainer saves its model."""

    registered_name: str
    #: Prepended to the state-dict keys to give the reference's parameter names (those of ``reference_name_map``).
    key_prefix: str
    #: Config values the saved tensors determine (``{field: value}``), given the tensors by reference name.
    infer: Callable[[Mapping[str, torch.Tensor]], dict[str, Any]]
    #: A frozen CLIP tensor's reference name -> the backbone's state-dict key (None: not a frozen CLIP tensor).
    frozen: Callable[[str], str | None] = _no_towers
    #: Saved tensors the reference builds but never uses (regexes on reference names): skipped.
    unused: tuple[str, ...] = ()
    #: Tensors every checkpoint of this trainer has and others lack (regexes): tells the methods apart.
    signature: tuple[str, ...] = ()
    #: A saved key that repeats another one (a shared module saved under several names), or None.
    alias: Callable[[str], str | None] = lambda key: None
    #: Inferred fields that the config's ``ctx_init`` overrides (CoOp's family: the init words set the length).
    set_by_ctx_init: tuple[str, ...] = ()
    #: The preset whose method config matches the reference's official config for released checkpoints.
    default_preset: str = ""
    #: Class-dependent buffers (last part of the key) dropped on import: the method rebuilds them from the class names.
    class_buffers: tuple[str, ...] = CLASS_BUFFERS


def _infer_promptkd(t: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return _infer_vision(t)


LAYOUTS: dict[str, Layout] = {
    "coop": Layout("prompt_learner", "prompt_learner.", _infer_coop, set_by_ctx_init=("n_ctx",),
                   default_preset="coop/vit_b16"),
    "kgcoop": Layout("prompt_learner", "prompt_learner.", _infer_coop,
                     unused=(r"prompt_learner\.bias_vectors", r"prompt_learner\.meta_net\.linear1\..*"),
                     signature=(r"prompt_learner\.bias_vectors",), set_by_ctx_init=("n_ctx",),
                     default_preset="kgcoop/vit_b16_ep100_ctxv1"),
    "cocoop": Layout("prompt_learner", "prompt_learner.", _infer_cocoop, set_by_ctx_init=("n_ctx",),
                     default_preset="cocoop/vit_b16_c4_ep10_batch1_ctxv1"),
    # ProGrad's prompt learner is CoOp's (the projection is in its Dassl); its init words never set n_ctx.
    "prograd": Layout("prompt_learner", "prompt_learner.", _infer_coop, default_preset="prograd/rn50_ep100"),
    # TCP's prompt learner has CoCoOp's tensor names (ctx, meta_net.linear1/2); the meta-net's shapes tell them apart.
    "tcp": Layout("prompt_learner", "prompt_learner.", _infer_tcp, default_preset="tcp/vit_b16_ep100_ctxv1"),
    "maple": Layout("MultiModalPromptLearner", "", _infer_maple, _clip_towers,
                    signature=(r"prompt_learner\.proj\..*",), default_preset="maple/vit_b16_c2_ep5_batch4_2ctx"),
    "ivlp": Layout("VLPromptLearner", "", _infer_ivlp, _clip_towers,
                   default_preset="ivlp/vit_b16_c2_ep5_batch4_2+2ctx"),
    "promptsrc": Layout("VLPromptLearner", "", _infer_ivlp, _promptsrc_towers,
                        default_preset="promptsrc/vit_b16_c2_ep20_batch4_4+4ctx"),
    "vpt": Layout("prompt_learner", "", _infer_vision, _clip_towers,
                  signature=(r"image_encoder\.VPT",), default_preset="vpt/vit_b16_c2_ep5_batch4_4"),
    "coprompt": Layout("MultiModalPromptLearner", "", _infer_maple, _coprompt_towers,
                       signature=(r"adapter_image\..*", r"adapter_text\..*"), default_preset="coprompt/base2novel"),
    # DePT registers its whole model (CoOp host: "PromptLearner", MaPLe host: "MultiModalPromptLearner"); keys are
    # the model's, with the FiLM maps and head beside the host's prompts (tests/golden/methods/dept.md).
    "dept_coop": Layout("PromptLearner", "", _infer_coop, _clip_towers, signature=(r"film_lp_img\.scale",),
                        set_by_ctx_init=("n_ctx",), default_preset="dept_coop/vit_b16_ep10_bs4_lr35"),
    "dept_maple": Layout("MultiModalPromptLearner", "", _infer_maple, _clip_towers,
                         signature=(r"film_lp_img\.scale", r"prompt_learner\.proj\..*"),
                         default_preset="dept_maple/vit_b16_c2_ep10_batch4_2ctx"),
    "dcp": Layout("MultiModalPromptLearner", "", _infer_dcp, _cmpa_towers,
                  unused=(r"encoder\.resblocks\.\d+\.prompt_attn\..*",), signature=(r"prompt_learner\.prompts_visual",),
                  alias=_cmpa_alias, default_preset="dcp/vit_b16_c2_ep20_batch4_16ctx_reference"),
    # MMA registers its adapter learner: the adapters, and the fixed prompts' tokens and embeddings as buffers.
    "mma": Layout("adapter_learner", "adapter_learner.", _infer_mma,
                  signature=(r"adapter_learner\.shared_adapter\..*",),
                  class_buffers=("token_embedding", "tokenized_prompts"), default_preset="mma/vit_b16_ep5"),
    # RPO registers its prompt learner: the K text and K visual prompts, nothing else.
    "rpo": Layout("prompt_learner", "prompt_learner.", _infer_rpo, signature=(r"prompt_learner\.img_prompt",),
                  default_preset="rpo/main_K24"),
    # MMRL registers its whole CustomCLIP (frozen towers included) as "MultiModalRepresentationLearner".
    "mmrl": Layout("MultiModalRepresentationLearner", "", _infer_mmrl, _clip_towers,
                   signature=(r"image_encoder\.proj_rep",), default_preset="mmrl/vit_b16"),
    "mmrlpp": Layout("MultiModalRepresentationLearner", "", _infer_mmrlpp, _clip_towers,
                     signature=(r"image_encoder\.A",), default_preset="mmrlpp/vit_b16"),
    # The student only (its image tower, prompts, projector with its BatchNorm statistics): the teacher is not saved.
    "promptkd": Layout("VLPromptLearner", "", _infer_promptkd, _clip_towers, signature=(r"VPT_image_trans\..*",),
                       default_preset="promptkd/vit_b16_c2_ep20_batch8_4+4ctx"),
}

#: How to recognise another trainer's checkpoint in an error message (the first match names it).
_LOOKS_LIKE = (  # patterns on the saved keys, module-relative (``ctx``) or model-level (``prompt_learner.ctx``)
    ("mmrl", re.compile(r"(^|\.)compound_rep_tokens_r2[tv]proj\.")),
    ("mmrlpp", re.compile(r"(^|\.)srra_r2[tv]proj\.")),
    ("dept (dept_coop or dept_maple)", re.compile(r"^(film_lp_(img|text)|linear_probe_proj)\.")),
    ("promptkd", re.compile(r"^VPT_image_trans\.")),
    ("dcp (CMPA)", re.compile(r"(^|\.)(prompts_visual$|prompt_attn\.)")),
    ("coprompt", re.compile(r"^(adapter_image|adapter_text|model_distill)\.")),
    ("maple", re.compile(r"(^|\.)(compound_prompts_text|compound_prompt_projections)\.|^prompt_learner\.proj\.")),
    ("promptsrc", re.compile(r"ZS_image_encoder\.")),
    ("ivlp or promptsrc", re.compile(r"^text_encoder\..*VPT_shallow$")),
    ("vpt", re.compile(r"^image_encoder\.VPT$")),
    ("cocoop", re.compile(r"(^|\.)meta_net\.linear2\.")),
    ("kgcoop", re.compile(r"(^|\.)bias_vectors$")),
    ("mma", re.compile(r"(^|\.)shared_adapter\.\d+\.0\.")),
    ("rpo", re.compile(r"(^|\.)img_prompt$")),
    ("coop", re.compile(r"^(prompt_learner\.)?ctx$")),
)


def layout_for(method: str) -> Layout:
    if method not in LAYOUTS:
        raise DasslCheckpointError(
            f"method {method!r} has no reference Dassl trainer whose checkpoints can be imported; importable: "
            f"{', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[method]


def _trainers_saving_under(name: str) -> str:
    return ", ".join(m for m, layout in LAYOUTS.items() if layout.registered_name == name)


def looks_like(keys: list[str]) -> str | None:
    for method, pattern in _LOOKS_LIKE:
        if any(pattern.search(key) for key in keys):
            return method
    return None


# -- finding and reading a checkpoint ------------------------------------------------------------------------------


@dataclass
class DasslCheckpoint:
    path: Path
    #: The ``epoch`` the file records (Dassl saves ``epoch + 1``: a file of 5 epochs says 5).
    epoch: int | None
    #: As saved: Dassl's keys, saved dtypes.
    state_dict: dict[str, torch.Tensor]
    sha256: str


def find_checkpoint(source: str | Path, registered_name: str, epoch: int | str | None = None) -> Path:
    """The checkpoint file for ``source``: a file, a registered model's folder (``<dir>/<registered name>``) or a
    Dassl output folder holding it. ``epoch``: ``N`` for ``model.pth.tar-N``, ``"best"`` for ``model-best.pth.tar``,
    None for the latest epoch (``model-best.pth.tar`` when no epoch file exists)."""
    source = Path(source)
    if not source.exists():
        raise DasslCheckpointError(f"{source} does not exist: pass a Dassl checkpoint file (model.pth.tar-N) or the "
                                   f"output folder of a run (holding {registered_name}/model.pth.tar-N)")
    if source.is_file():
        wanted = None if epoch is None else BEST_FILE if str(epoch) == "best" else f"model.pth.tar-{epoch}"
        if wanted is not None and source.name != wanted:
            raise DasslCheckpointError(f"{source} is not the checkpoint of epoch {epoch} ({wanted}); pass the "
                                       "folder to choose an epoch, or the file without --epoch")
        return source
    folder = source / registered_name if (source / registered_name).is_dir() else source
    files = _checkpoint_files(folder)
    if not files:
        elsewhere = sorted(p.name for p in source.iterdir() if p.is_dir() and _checkpoint_files(p))
        if elsewhere:
            owners = "; ".join(f"{n}/ is where {_trainers_saving_under(n) or 'other trainers'} save"
                               for n in elsewhere)
            raise DasslCheckpointError(
                f"{source} holds checkpoints under {', '.join(n + '/' for n in elsewhere)} but this method's trainer "
                f"saves under {registered_name}/ ({owners}): is it a checkpoint of another method?")
        raise DasslCheckpointError(
            f"no Dassl checkpoint in {folder}: expected {registered_name}/model.pth.tar-N or "
            f"{registered_name}/{BEST_FILE} (a Dassl run writes them into its output folder)")
    if folder.name != registered_name and folder.name in {layout.registered_name for layout in LAYOUTS.values()}:
        raise DasslCheckpointError(
            f"{folder} is the folder of a model registered as {folder.name!r} ({_trainers_saving_under(folder.name)}); "
            f"this method's trainer registers {registered_name!r}: is it a checkpoint of another method?")
    epochs = {int(EPOCH_FILE.match(p.name).group(1)): p for p in files if EPOCH_FILE.match(p.name)}
    best = folder / BEST_FILE if (folder / BEST_FILE).is_file() else None
    available = ", ".join([*(str(e) for e in sorted(epochs)), *(["best"] if best else [])])
    if epoch is None:
        return epochs[max(epochs)] if epochs else best
    if str(epoch) == "best":
        if best is None:
            raise DasslCheckpointError(f"{folder} has no {BEST_FILE} (the run did not validate); epochs available: "
                                       f"{available}")
        return best
    if int(epoch) not in epochs:
        raise DasslCheckpointError(f"{folder} has no checkpoint of epoch {epoch} (model.pth.tar-{epoch}); "
                                   f"available: {available}")
    return epochs[int(epoch)]


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and (p.name == BEST_FILE or EPOCH_FILE.match(p.name)))


def read_checkpoint(path: str | Path) -> DasslCheckpoint:
    """The state dict and epoch of a Dassl checkpoint file, read without running code from it."""
    path = Path(path)
    try:
        saved = load_torch_file(path)
    except TorchFileError as err:
        raise DasslCheckpointError(str(err)) from None
    if isinstance(saved, Mapping) and "state_dict" in saved:
        state, epoch = saved["state_dict"], saved.get("epoch")
    elif isinstance(saved, Mapping) and saved and all(isinstance(v, torch.Tensor) for v in saved.values()):
        state, epoch = saved, None  # a bare state dict
    else:
        what = saved.qualname + " object" if isinstance(saved, Inert) else type(saved).__name__
        raise DasslCheckpointError(
            f"{path} holds a {what}, not a Dassl checkpoint (a dict with 'state_dict' and 'epoch', as Dassl's "
            "save_checkpoint writes)")
    if not isinstance(state, Mapping):
        raise DasslCheckpointError(f"{path}: 'state_dict' is a {type(state).__name__}, not a dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise DasslCheckpointError(f"{path}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise DasslCheckpointError(f"{path}: 'epoch' is {epoch!r}, not an integer")
    return DasslCheckpoint(path, epoch, dict(state), _sha256(path))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- fitting it to a method ----------------------------------------------------------------------------------------


@dataclass
class FrozenCheck:
    """The frozen CLIP tensors a checkpoint carries, compared with the backbone in use."""

    saved: int = 0
    #: ``(reference name, why)`` of each one that differs (values, shape, or absent from the backbone).
    differing: list[tuple[str, str]] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return self.saved > 0 and not self.differing

    def summary(self) -> str:
        if not self.saved:
            return "no frozen CLIP tensors in the file (nothing to compare with the backbone)"
        if not self.differing:
            return f"all {self.saved} frozen CLIP tensors equal the backbone's"
        return f"{len(self.differing)} of {self.saved} frozen CLIP tensors differ from the backbone's"


@dataclass
class ImportReport:
    """What an import read, kept, dropped and checked (stored in the adapter's metadata)."""

    file: str
    sha256: str
    epoch: int | None
    registered_name: str
    method: str
    #: Reference name -> ours, for every imported tensor.
    tensors: dict[str, str]
    saved_dtypes: list[str]
    inferred: dict[str, Any]
    dropped_buffers: list[str]
    skipped_unused: list[str]
    frozen: FrozenCheck
    #: Classes the checkpoint's class buffers were built for (None when it has none).
    saved_classes: int | None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "dassl", "file": self.file, "sha256": self.sha256, "epoch": self.epoch,
            "registered_name": self.registered_name, "tensors": self.tensors, "saved_dtypes": self.saved_dtypes,
            "inferred_from_shapes": self.inferred, "dropped_buffers": self.dropped_buffers,
            "skipped_unused": self.skipped_unused, "saved_classes": self.saved_classes,
            "frozen_clip": {"saved": self.frozen.saved, "differing": len(self.frozen.differing),
                            "summary": self.frozen.summary()},
            "warnings": self.warnings,
        }


def reference_tensors(checkpoint: DasslCheckpoint, layout: Layout) -> dict[str, torch.Tensor]:
    """The state dict under the reference's parameter names (``reference_name_map`` keys)."""
    return {layout.key_prefix + key: value for key, value in checkpoint.state_dict.items()}


def check_config(checkpoint: DasslCheckpoint, method: str, config: Any) -> dict[str, Any]:
    """What the tensors say about the config (``{field: value}``); a :class:`DasslCheckpointError` when it
    contradicts ``config`` (run before the method is built, so the message can name the option to change)."""
    layout = layout_for(method)
    tensors = reference_tensors(checkpoint, layout)
    try:
        inferred = layout.infer(tensors)
    except KeyError as err:
        raise DasslCheckpointError(_not_this_method(checkpoint, method, f"it has no tensor {err.args[0]}")) from None
    skipped = set(layout.set_by_ctx_init) if str(getattr(config, "ctx_init", "")).strip() else set()
    wrong = {k: v for k, v in inferred.items() if k not in skipped and hasattr(config, k) and getattr(config, k) != v}
    if wrong:
        said = ", ".join(f"{k}={_yaml(v)} (the config has {_yaml(getattr(config, k))})" for k, v in wrong.items())
        raise DasslCheckpointError(
            f"{checkpoint.path}: the checkpoint's tensors say {said}, which the method config of {method} "
            f"contradicts. Import with {_set_options(wrong)} (or a preset made for the run).")
    return inferred


def load_into_method(checkpoint: DasslCheckpoint, method, backbone_name: str = "the backbone") -> ImportReport:
    """Copy a checkpoint's learned tensors into ``method`` (built on the backbone in use), with every check of the
    module docstring; frozen-weight differences are warned about (:class:`FrozenWeightsWarning`) and reported."""
    layout = layout_for(method.name)
    inferred = check_config(checkpoint, method.name, method.config)
    tensors = reference_tensors(checkpoint, layout)
    name_map = method.reference_name_map()
    buffer_map = method.reference_buffer_map()
    params = dict(method.named_trainable())
    trained_buffers = dict(method.trainable_buffers())
    backbone = method.clip.state_dict()

    imported: dict[str, torch.Tensor] = {}
    buffers, unused, unexpected, shapes = [], [], [], []
    frozen = FrozenCheck()
    for key, value in tensors.items():
        if key in name_map:
            expected = tuple(params[name_map[key]].shape)
            if tuple(value.shape) != expected:
                shapes.append(f"{key} has shape {list(value.shape)}, the method expects {list(expected)}")
            elif not value.is_floating_point():
                shapes.append(f"{key} is {value.dtype}, not a floating-point tensor")
            else:
                imported[name_map[key]] = value.detach().to(torch.float32).clone()
        elif key in buffer_map:  # trained statistics (BatchNorm), in the buffer's own dtype
            ours = trained_buffers[buffer_map[key]]
            if tuple(value.shape) != tuple(ours.shape):
                shapes.append(f"{key} has shape {list(value.shape)}, the method expects {list(ours.shape)}")
            else:
                imported[buffer_map[key]] = value.detach().to(ours.dtype).clone()
        elif key.rsplit(".", 1)[-1] in layout.class_buffers:
            buffers.append(key)
        elif layout.alias(key) in name_map:
            pass  # a copy of a shared tensor, equal to it (check_config infers "shared" from that)
        elif any(re.fullmatch(p, key) for p in layout.unused):
            unused.append(key)
        elif (backbone_key := layout.frozen(key)) is not None:
            frozen.saved += 1
            reason = _frozen_difference(value, backbone.get(backbone_key))
            if reason:
                frozen.differing.append((key, reason))
        else:
            unexpected.append(key)
    missing = [key for key in (*name_map, *buffer_map) if key not in tensors]
    absent_signature = [p for p in layout.signature if not any(re.fullmatch(p, k) for k in tensors)]
    if unexpected or missing or absent_signature:
        problems = []
        if unexpected:
            problems.append(f"tensors this method does not have: {_first(unexpected)}")
        if missing:
            problems.append(f"no tensor for {_first(missing)}")
        if absent_signature and not (unexpected or missing):
            problems.append(f"no {absent_signature[0]!r} tensor, which every {method.name} checkpoint saves")
        raise DasslCheckpointError(_not_this_method(checkpoint, method.name, "; ".join(problems), inferred))
    if shapes:
        clip = method.clip
        raise DasslCheckpointError(
            f"{checkpoint.path} does not fit {method.name} on {backbone_name}: {'; '.join(shapes)}. The last "
            f"dimension is a tower width ({backbone_name}: text {clip.text.width}, vision {clip.visual.width}); the "
            f"checkpoint's tensors say {_yaml_items(inferred)}.")
    check_finite({key: value for key, value in tensors.items() if key in name_map}, str(checkpoint.path),
                 DasslCheckpointError, "the released file is damaged (download it again) or its training diverged")

    report = ImportReport(
        file=str(checkpoint.path), sha256=checkpoint.sha256, epoch=checkpoint.epoch,
        registered_name=layout.registered_name, method=method.name,
        tensors={k: {**name_map, **buffer_map}[k] for k in tensors if k in name_map or k in buffer_map},
        saved_dtypes=sorted({str(tensors[k].dtype).removeprefix("torch.") for k in tensors if k in name_map}),
        inferred=inferred, dropped_buffers=sorted(buffers), skipped_unused=sorted(unused), frozen=frozen,
        saved_classes=_saved_classes(tensors, buffers))
    method.load_adapter_state(imported, strict=True)
    if frozen.differing:
        key, reason = frozen.differing[0]
        _warn(report, FrozenWeightsWarning, (
            f"{checkpoint.path} was trained on other CLIP weights than {backbone_name}: {frozen.summary()} (first: "
            f"{key}, {reason}). Its prompts are imported, but evaluating them on this backbone will not reproduce the "
            "reference's numbers; the released checkpoints of these papers are for ViT-B/16 with OpenAI's weights."))
    if report.saved_classes is not None and report.saved_classes != method.num_classes:
        _warn(report, UserWarning, (
            f"{checkpoint.path} was trained on {report.saved_classes} classes (its class buffers say so); the "
            f"adapter gets the {method.num_classes} class names given. For a base-to-novel checkpoint, pass the "
            "base classes (--subsample base)."))
    return report


def _warn(report: ImportReport, category: type[Warning], message: str) -> None:
    report.warnings.append(message)
    warnings.warn(message, category, stacklevel=3)


def _frozen_difference(saved: torch.Tensor, ours: torch.Tensor | None) -> str:
    """Why a saved frozen tensor is not the backbone's ("" when it is, up to fp16 rounding or PromptSRC's GPA)."""
    if ours is None:
        return "absent from the backbone"
    if tuple(saved.shape) != tuple(ours.shape):
        return f"shape {list(saved.shape)}, the backbone's is {list(ours.shape)}"
    ours = ours.detach().float().cpu()
    diff = (saved.float() - ours).abs().max().item() if ours.numel() else 0.0
    if diff > 1e-3 * max(ours.abs().max().item(), 1e-6) or diff != diff:
        return f"max abs difference {diff:.3g}"
    return ""


def _saved_classes(tensors: Mapping[str, torch.Tensor], buffers: list[str]) -> int | None:
    prefixes = [tensors[k].shape[0] for k in buffers
                if k.endswith(("token_prefix", "prompt_embeddings")) and tensors[k].dim() == 3]
    prefixes += [tensors[k].shape[0] for k in buffers if k.endswith("tokenized_prompts") and tensors[k].dim() == 2]
    return prefixes[0] if prefixes else None


def _not_this_method(checkpoint: DasslCheckpoint, method: str, problem: str,
                     inferred: Mapping[str, Any] | None = None) -> str:
    other = looks_like(list(checkpoint.state_dict))
    guess = f" It looks like a checkpoint of {other}." if other and other.split()[0] != method else ""
    hint = f" Its tensors say {_yaml_items(inferred)}." if inferred else ""
    return f"{checkpoint.path} is not a {method} checkpoint as configured: {problem}.{guess}{hint}"


def _first(keys: list[str], n: int = 4) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else str(value)


def _yaml_items(values: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k}={_yaml(v)}" for k, v in (values or {}).items()) or "nothing about the config"


def _set_options(values: Mapping[str, Any]) -> str:
    return " ".join(f"--set method_config.{k}={_yaml(v)}" for k, v in values.items())


# -- the whole import ------------------------------------------------------------------------------------------------


@dataclass
class ImportResult:
    adapter_path: Path
    report: ImportReport
    method: Any


def method_config(method: str, config: Mapping[str, Any] | Any = None) -> Any:
    """The config object of ``method`` from a dict (strict keys) or as given; None: the layout's default preset's."""
    from ..config import from_dict
    from ..methods import get_method_class

    if config is None:
        from ..presets import load_preset

        config = load_preset(layout_for(method).default_preset).method_config
    if isinstance(config, Mapping):
        config = from_dict(get_method_class(method).config_class, config, where=f"{method} method_config")
    return config


def import_checkpoint(source: str | Path | DasslCheckpoint, method: str, backbone, classnames: list[str],
                      out: str | Path, config: Mapping[str, Any] | Any = None, template: str | None = None,
                      epoch: int | str | None = None, extra: Mapping[str, Any] | None = None) -> ImportResult:
    """Import a Dassl checkpoint (file, output folder, or one already read) of ``method`` as the adapter
    ``out/adapter.safetensors`` (+ ``.json``, with the :class:`ImportReport` under ``imported_from``).

    ``backbone``: a :class:`promptclip.protocols.Backbone` (model, name, fingerprint); ``config``: the method config
    (dict or dataclass; None: the method config of the layout's default preset, the official one of the released
    checkpoints); ``epoch``: as :func:`find_checkpoint`. The adapter then works with ``eval``, ``predict``,
    ``run --adapter`` and ``train --init-adapter``.
    """
    from ..checkpoint import save_adapter
    from ..methods import create_method

    layout = layout_for(method)
    config = method_config(method, config)
    if isinstance(source, DasslCheckpoint):
        checkpoint = source
    else:
        checkpoint = read_checkpoint(find_checkpoint(source, layout.registered_name, epoch))
    check_config(checkpoint, method, config)
    try:
        built = create_method(method, backbone.model, classnames, config, template=template)
    except ConfigError as err:
        raise DasslCheckpointError(f"{checkpoint.path}: {err}") from None
    report = load_into_method(checkpoint, built, backbone.name)
    path = save_adapter(Path(out) / "adapter", built, backbone.name, backbone.fingerprint,
                        extra={"imported_from": report.to_dict(), **(dict(extra) if extra else {})})
    return ImportResult(path, report, built)
