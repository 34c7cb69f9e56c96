"""``promptclip import``: a reference repository's Dassl checkpoint -> a promptclip adapter.

Registered by ``promptclip.cli.build_parser`` through :func:`add_parser`; ``promptclip.cli.cmd_import`` runs
:func:`import_command` with the main CLI's console helpers (this module never imports ``promptclip.cli``).
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..argtypes import output_location
from ..config import parse_int
from ..errors import ConfigError


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``import`` under the main parser's sub-commands (the caller sets its ``func``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    description = (
        "Import a checkpoint written by a reference repository's Dassl trainer (CoOp, CoCoOp, KgCoOp, ProGrad, TCP, "
        "MaPLe, IVLP, VPT, PromptSRC, CMPA/DCP, MMA, RPO, MMRL, MMRL++, CoPrompt, DePT, PromptKD: "
        "<output dir>/<registered name>/model.pth.tar-N) as a promptclip adapter, "
        "which eval, predict, run --adapter and train --init-adapter then use. The file is read without running code "
        "from it. The released checkpoints of these papers are for ViT-B/16 with OpenAI's weights (the default "
        "backbone).")
    p = sub.add_parser("import", parents=[common], help="a reference Dassl checkpoint -> a promptclip adapter",
                       description=description)
    p.add_argument("source", help="a checkpoint file (model.pth.tar-N, model-best.pth.tar) or a Dassl output folder")
    p.add_argument("--method", required=True,
                   help="the method that wrote it: coop, cocoop, kgcoop, maple, ivlp, vpt, promptsrc, dcp (CMPA), "
                        "dept_coop, dept_maple or promptkd (its student; PromptKD's released ViT-L/14 teachers are "
                        "promptsrc checkpoints)")
    p.add_argument("--out", required=True, type=output_location(),
                   help="folder for adapter.safetensors + adapter.json")
    p.add_argument("--epoch", help="N for model.pth.tar-N, best for model-best.pth.tar (default: the latest epoch)")
    p.add_argument("--preset", help="preset whose method_config matches the run (default: the official config of "
                                    "the method's released checkpoints; see `promptclip list presets`)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a preset value, e.g. method_config.depth=3")
    p.add_argument("--dataset", help="the dataset whose class names the checkpoint was trained on (a dataset name, "
                                     "eurosat-sample, folder:PATH or csv:PATH)")
    p.add_argument("--root", help="data root holding the dataset folders")
    p.add_argument("--subsample", choices=["all", "base", "new"], default="all",
                   help="classes of --dataset (base for a base-to-novel checkpoint); default all")
    p.add_argument("--classnames", help="instead of --dataset: comma-separated names or a file with one per line")
    p.add_argument("--template", help="with --classnames: the prompt template, e.g. 'a photo of a {}.'")
    p.add_argument("--backbone", help="default: the preset's (ViT-B/16); the backbone the checkpoint was trained on")
    p.add_argument("--device", default="cpu", help="where the backbone loads (default cpu)")
    p.add_argument("--teacher", metavar="PATH",
                   help="promptkd: the teacher adapter the student was distilled from (e.g. the released PromptSRC "
                        "ViT-L/14 teacher, imported with --method promptsrc --backbone ViT-L/14); its text features "
                        "are the student's classifier")
    return p


def import_command(args, load_backbone: Callable[[str, str, bool], Any],
                   parse_classnames: Callable[[str], list[str]], say: Callable[[str], None],
                   banner: Callable[[str], None]):
    """``promptclip import`` with the main CLI's console helpers (backbone loading with its banner, ``--classnames``
    parsing, output); returns the backbone used."""
    from ..presets import apply_overrides, load_preset
    from .dassl import check_config, find_checkpoint, import_checkpoint, layout_for, method_config, read_checkpoint

    layout = layout_for(args.method)
    preset = apply_overrides(load_preset(args.preset or layout.default_preset), list(args.set or []))
    if preset.method != args.method:
        raise ConfigError(f"preset {preset.name!r} is for method {preset.method!r}, not {args.method!r}")
    preset = _with_teacher(preset, getattr(args, "teacher", None))
    classnames, template = _class_set(args, parse_classnames)
    epoch = args.epoch if args.epoch in (None, "best") else _epoch_number(args.epoch)
    # The file and what its shapes say are checked before any weights load.
    checkpoint = read_checkpoint(find_checkpoint(args.source, layout.registered_name, epoch))
    config = method_config(args.method, preset.method_config)
    check_config(checkpoint, args.method, config)
    backbone = load_backbone(args.backbone or preset.backbone, args.device, not args.quiet)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = import_checkpoint(checkpoint, args.method, backbone, classnames, args.out, config=config,
                                   template=template, extra={"preset": preset.name})
    report = result.report
    say(f"read {report.file} (epoch {report.epoch}, saved as {'/'.join(report.saved_dtypes)}): "
        f"{len(report.tensors)} learned tensors, {result.method.num_trainable():,} values, imported as fp32")
    say(f"dropped class buffers {', '.join(report.dropped_buffers) or '(none)'}; frozen CLIP: "
        f"{report.frozen.summary()}")
    say(f"the tensors say: {json.dumps(report.inferred)}; preset {preset.name}")
    say(f"adapter: {result.adapter_path} (+ .json), {len(classnames)} classes")
    for warning in caught:
        banner(str(warning.message))
    say(f"evaluate it: promptclip eval --adapter {Path(args.out)} --dataset DATASET --root ROOT --subsample base|new")
    return backbone


def _with_teacher(preset, teacher: str | None):
    """The preset with ``method_config.teacher`` for a method that distils a teacher (required: the student's
    classifier is the teacher's text features); an error for other methods."""
    import dataclasses

    from ..checkpoint import read_adapter, teacher_adapter_path
    from ..methods import get_method_class

    uses = get_method_class(preset.method).uses_teacher
    if teacher is None:
        if uses and not preset.method_config.get("teacher"):
            raise ConfigError(f"importing a {preset.method} checkpoint needs --teacher PATH: the adapter of the "
                              "teacher it was distilled from (its text features are the student's classifier)")
        return preset
    if not uses:
        raise ConfigError(f"--teacher: method {preset.method!r} does not distil a teacher")
    path = teacher_adapter_path(teacher).resolve()
    read_adapter(path)
    return dataclasses.replace(preset, method_config={**preset.method_config, "teacher": str(path)})


def _class_set(args, parse_classnames) -> tuple[list[str], str | None]:
    if args.dataset and args.classnames:
        raise ConfigError("import takes --dataset or --classnames, not both")
    if args.classnames:
        return parse_classnames(args.classnames), args.template
    if not args.dataset:
        raise ConfigError("import needs the class names the checkpoint was trained on: --dataset NAME (with "
                          "--subsample base for a base-to-novel checkpoint) or --classnames 'a,b,c'")
    from ..data import load_splits, subsample_classes

    splits = subsample_classes(load_splits(args.dataset, args.root), args.subsample)
    return list(splits.classnames), args.template or splits.template


def _epoch_number(text: str) -> int:
    try:
        epoch = parse_int(text)
    except ValueError:
        raise ConfigError(f"--epoch {text!r}: use an epoch number (model.pth.tar-N) or best") from None
    if epoch < 1:
        raise ConfigError(f"--epoch {epoch}: Dassl numbers its checkpoints from 1")
    return epoch
