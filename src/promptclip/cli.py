"""The ``promptclip`` command line. ``main(argv)`` returns the exit code (importable for tests).

Errors meant for the user (bad names, keys, files, offline downloads) print as one paragraph without a
traceback; ``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

from . import __version__
from .argtypes import SHOTS, int_at_least, output_location, seed
from .errors import ConfigError, DataError, PromptClipError
from .tracking import TRACKERS, check_trackers

RANDOM_BANNER = "RANDOM WEIGHTS: backbone '{}' has random weights, accuracy is meaningless (pipeline check only)"
DEMO_DATASET = "eurosat-sample"
DEMO_METHODS = ("zeroshot", "maple")


# -- helpers -------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument error is one paragraph naming the option, like every other user error (no usage dump)."""

    def error(self, message: str) -> None:
        text = f"error: {self.prog}: {message} (`{self.prog} --help` lists the options)"
        self.exit(2, textwrap.fill(text, width=118, break_long_words=False, break_on_hyphens=False) + "\n")




def _say(text: str = "") -> None:
    if _is_main():
        print(text, flush=True)


def _banner(text: str) -> None:
    if not _is_main():
        return
    lines = textwrap.wrap(text, 114, break_long_words=False, break_on_hyphens=False) or [""]
    width = max(len(line) for line in lines)
    bar = "!" * (width + 4)
    body = "\n".join(f"! {line.ljust(width)} !" for line in lines)
    print(f"{bar}\n{body}\n{bar}", file=sys.stderr, flush=True)


def _is_main() -> bool:
    """False on the ranks > 0 of a torchrun job (only rank 0 prints and writes)."""
    from .distributed import is_main

    return is_main()


def _add_backbone_options(p, help_text: str, default: str | None = None) -> None:
    p.add_argument("--backbone", default=default, help=help_text + " (`promptclip list backbones`)")
    p.add_argument("--backbone-arch", metavar="NAME|FILE",
                   help="architecture of a weights file that does not declare it: a name (ViT-B-16, ViT-H-14, "
                        "ViT-B-16-quickgelu, ViT-B/16, ...) or an open_clip config JSON (open_clip_config.json)")
    activation = p.add_mutually_exclusive_group()
    activation.add_argument("--gelu", dest="quick_gelu", action="store_const", const=False,
                            help="the weights use GELU (open_clip's LAION-2B, DataComp, ... models)")
    activation.add_argument("--quick-gelu", dest="quick_gelu", action="store_const", const=True,
                            help="the weights use QuickGELU (OpenAI's, MetaCLIP, DFN, open_clip's *-quickgelu)")


def _backbone_spec(name: str, args):
    """The backbone to load: ``name`` plus the --backbone-arch / --gelu / --quick-gelu hints, with paths made
    absolute (cluster jobs may start in another directory)."""
    from .api import BackboneSpec

    arch = getattr(args, "backbone_arch", None)
    if arch and Path(arch).expanduser().is_file():
        arch = str(Path(arch).expanduser().resolve())
    if Path(name).expanduser().exists():
        name = str(Path(name).expanduser().resolve())
    return BackboneSpec(name, arch, getattr(args, "quick_gelu", None))


def _load_backbone(name: str, args, device: str | None = None):
    import warnings

    from .api import load_backbone
    from .distributed import main_first
    from .errors import BackboneWarning

    with main_first(), warnings.catch_warnings(record=True) as caught:  # rank 0 downloads before the others read
        warnings.simplefilter("always", BackboneWarning)
        backbone = load_backbone(_backbone_spec(name, args), device=device or args.device,
                                 progress=not args.quiet and _is_main())
    for warning in caught:
        if issubclass(warning.category, BackboneWarning):
            _banner(f"WARNING: {warning.message}")
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if backbone.random_weights:
        _banner(RANDOM_BANNER.format(name))
    else:
        _say(f"backbone {name} (fingerprint {backbone.fingerprint})")
    return backbone


def _overrides(args) -> list[str]:
    overrides = list(args.set or [])
    if getattr(args, "precision", None):
        overrides.append(f"train.precision={args.precision}")
    return overrides


def _options(args):
    from .captions.cli import caption_extras
    from .protocols import RunOptions

    return RunOptions(root=getattr(args, "root", None), device=args.device, progress=not args.quiet,
                      precision=getattr(args, "precision", None), log=_say, extras=caption_extras(args),
                      trackers=tuple(getattr(args, "log_to", None) or ()),
                      feature_cache=_feature_cache(getattr(args, "feature_cache", None)))


def _feature_cache(value: Path | str | None):
    from .features import FeatureCache

    if value == "off":
        return None
    return FeatureCache(Path(value)) if value else FeatureCache.default()


def _feature_cache_location(text: str) -> Path | str:
    """``off``, an existing directory (one promptclip cannot write still serves its hits: features.FeatureCache),
    or a directory the cache can be created in (checked before any work)."""
    if text == "off":
        return text
    path = Path(text).expanduser()
    return path if path.is_dir() else output_location(directory=True)(text)


_feature_cache_location.__name__ = "feature cache directory"


def _add_feature_cache_option(p) -> None:
    p.add_argument("--feature-cache", metavar="DIR|off", type=_feature_cache_location,
                   help="frozen image features of test images, reused across methods, seeds and commands (default "
                        "<PROMPTCLIP_CACHE or ~/.cache/promptclip>/features); off: encode every time")


def _method_map(items: list[str] | None, option: str = "--preset",
              example: str = "METHOD=PRESET (e.g. maple=maple/vit_b16_c2_ep5_batch4_2ctx)") -> dict[str, str]:
    mapping = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{option} {item!r}: use {example}")
        method, name = item.split("=", 1)
        mapping[method.strip()] = name.strip()
    return mapping


def _load_plugins(args) -> None:
    """``--plugin`` specs, then plugin specs given in place of method names (``--method ./my_method.py:MyPrompt``)."""
    from .methods.plugins import load_plugin, resolve_method

    for spec in getattr(args, "plugin", None) or []:
        load_plugin(spec)
    if getattr(args, "method", None):
        args.method = resolve_method(args.method)
    if getattr(args, "methods", None):
        args.methods = [resolve_method(m) for m in args.methods]


def _adapter_meta(path: str) -> dict[str, Any]:
    """The adapter's metadata, after checking that its method is registered (before any weights load)."""
    from .checkpoint import check_method_available, read_adapter

    meta = read_adapter(_adapter_file(path))[0]
    check_method_available(meta, path)
    return meta


def _write_report(records_path: Path, out: Path, plots: bool, required: bool = False) -> list[Path]:
    """Tables always; plots when asked for and matplotlib is there (``required``: its absence is an error)."""
    import importlib.util

    from .report import read_records, write_report

    if plots and not required and importlib.util.find_spec("matplotlib") is None:
        _say('plots skipped: matplotlib is not installed (pip install "promptclip[plot]")')
        plots = False
    records_dir = records_path if records_path.is_dir() else records_path.parent
    return write_report(read_records(records_path), out, plots=plots, records_dir=records_dir)


# -- commands ------------------------------------------------------------------------------------------------------


def cmd_list(args) -> int:
    from .listing import LISTINGS

    for line in LISTINGS[args.what]():
        _say(line)
    return 0


def cmd_train(args) -> int:
    from .checkpoint import save_adapter
    from .presets import apply_overrides, default_preset, load_preset
    from .protocols import _dataset
    from .train import fit

    batch_order = None
    if args.batch_order:
        from .data.loader import read_batch_order

        batch_order = read_batch_order(args.batch_order)
    preset = apply_overrides(load_preset(args.preset or default_preset("fewshot", args.method, args.dataset,
                                                                        args.shots)), _overrides(args))
    if preset.method != args.method:
        raise ConfigError(f"preset {preset.name!r} is for method {preset.method!r}, not {args.method!r}")
    if args.teacher:
        from .protocols import _uses_teacher, _with_teacher

        if not _uses_teacher(preset.method):
            raise ConfigError(f"--teacher: method {preset.method!r} does not distil a teacher")
        preset = _with_teacher(preset, args.teacher, args.dataset, args.seed, args.shots)
    if preset.train is None:
        raise ConfigError(f"method {args.method!r} learns nothing; use `promptclip eval --method {args.method}`")
    import dataclasses

    from .data.description_options import check_descriptions, dataset_classes, with_descriptions

    preset = dataclasses.replace(preset, method_config=with_descriptions(args, preset.method, preset.method_config))
    check_descriptions(preset.method, preset.method_config, dataset_classes(args.dataset, args.root))
    from .captions.cli import check_captions, split_groups

    check_captions(args, preset.method, preset.method_config,
                   split_groups(args, args.dataset, "train", args.shots, args.seed, args.subsample))
    from .protocols import training_splits

    splits, labeled = training_splits(preset.method, args.dataset, args.root, args.shots, args.seed, args.subsample)
    splits.nonempty("train")  # data errors before any weights load
    if not labeled:
        _say(f"{preset.method} trains on every training image of every class, without labels (--shots and "
             "--subsample do not apply to its training data)")
    if batch_order is not None:
        batch_order = _check_batch_order_file(args.batch_order, batch_order, len(splits.train), preset.train)
    backbone = _load_backbone(args.backbone or preset.backbone, args)
    from .methods import create_method

    method = create_method(preset.method, backbone.model, splits.classnames, preset.method_config,
                           template=splits.template)
    if args.init_adapter:
        from .checkpoint import init_from_adapter

        init_from_adapter(method, _adapter_file(args.init_adapter), backbone.fingerprint)
        _say(f"initial values from the adapter {args.init_adapter}")
    out = Path(args.out)
    _say(f"training {preset.method} ({preset.name}) on {splits.name} [{args.subsample}], {len(splits.train)} images, "
         f"{splits.num_classes} classes, seed {args.seed} -> {out}")
    data = _dataset(splits.train, backbone, train=True, seed=args.seed, options=_options(args),
                    views=method.train_views, labels=labeled)
    result = fit(method, data, preset.train, out_dir=out, device=args.device, progress=not args.quiet,
                 backbone_name=backbone.name, backbone_fingerprint=backbone.fingerprint, batch_order=batch_order,
                 trackers=tuple(args.log_to or ()))
    if result.adapter_path is None:
        result.adapter_path = save_adapter(out / "adapter", method, backbone.name, backbone.fingerprint)
    _say(f"adapter: {result.adapter_path} (+ .json), {method.num_trainable():,} learned values")
    if backbone.random_weights:
        _banner(RANDOM_BANNER.format(backbone.name))
    return 0


def _check_batch_order_file(path: str, order, dataset_size: int, train) -> list[list[list[int]]]:
    """The batch order of ``--batch-order`` checked against the training split and ``train.max_epoch``, naming the
    file, before any weights load."""
    from .data.loader import check_batch_order

    where = f"batch order file {path}"
    order = check_batch_order(order, dataset_size, where)
    if len(order) != train.max_epoch:
        raise ConfigError(f"{where} has {len(order)} epoch(s), the run has max_epoch={train.max_epoch}; give one list "
                          f"of batches per epoch, or --set train.max_epoch={len(order)}")
    return order


def cmd_eval(args) -> int:
    from .data import protocol_splits
    from .methods import create_method
    from .protocols import _dataset, evaluate_dataset, load_trained

    if not args.adapter and not args.method:
        raise ConfigError("eval needs --adapter PATH (a trained run) or --method zeroshot")
    if not args.adapter:
        _check_learns_nothing(args.method)
    backbone_name = args.backbone
    if args.adapter:
        meta = _adapter_meta(args.adapter)
        backbone_name = backbone_name or meta["backbone"]["name"]
    splits = protocol_splits(args.dataset, args.root, num_shots=args.shots, seed=args.seed, subsample=args.subsample)
    splits.nonempty("test")  # data errors before any weights load
    if args.descriptions:
        from .data.description_options import check_descriptions, dataset_classes, with_descriptions

        name = meta["method"] if args.adapter else args.method
        check_descriptions(name, with_descriptions(args, name, {}), dataset_classes(args.dataset, args.root))
    backbone = _load_backbone(backbone_name or "ViT-B/16", args)
    if args.adapter:
        method = load_trained(_adapter_file(args.adapter), backbone, splits.classnames, splits.template)
        if args.method and method.name != args.method:
            raise ConfigError(f"adapter {args.adapter} was trained with method {method.name!r}, not {args.method!r}")
        method.set_eval_context(_eval_context(args.subsample, meta["classnames"], splits.classnames))
    else:
        method = create_method(args.method, backbone.model, splits.classnames, template=splits.template)
    from .captions.cli import check_captions, split_groups

    check_captions(args, method.name, method.config,
                   split_groups(args, args.dataset, "test", args.shots, args.seed, args.subsample))
    options = _options(args)
    data = _dataset(splits.test, backbone, train=False, seed=args.seed, options=options)
    result = evaluate_dataset(method, data, backbone, options, args.batch_size, args.seed, args.precision or "auto",
                              f"eval {splits.name}")
    summary = {"dataset": splits.name, "subsample": args.subsample, "method": method.name, **result.summary()}
    _say(json.dumps(summary, indent=2))
    if backbone.random_weights:
        _banner(RANDOM_BANNER.format(backbone.name))
    return 0


def _eval_context(subsample: str, trained: list[str], evaluated: list[str]):
    """What ``eval``/``predict`` evaluate (:class:`promptclip.methods.EvalContext`): the novel half when asked for;
    otherwise the training data's evaluation when the classes are the adapter's own, a transfer target when not."""
    from .methods import EvalContext

    if subsample == "new":
        return EvalContext("new", source=True)
    same = list(trained) == list(evaluated)
    return EvalContext("base" if same and subsample == "base" else "all", source=same)


def _check_learns_nothing(method: str) -> None:
    """``eval --method M`` without an adapter is for methods that learn nothing (zero-shot)."""
    from .presets import default_preset, load_preset

    if load_preset(default_preset("fewshot", method)).train is not None:
        raise ConfigError(f"eval --method {method} without --adapter would evaluate untrained {method} prompts; pass "
                          f"--adapter RUN_DIR (from `promptclip train --method {method}`) or use --method zeroshot")


def _adapter_file(path: str) -> Path:
    p = Path(path)
    return p / "adapter.safetensors" if p.is_dir() else p


def cmd_run(args) -> int:
    from .protocols import check_grid_data, default_shots, make_cells, run_grid

    shots = args.shots or default_shots(args.protocol)
    adapters = _method_map(args.adapter, "--adapter", "METHOD=PATH (e.g. maple=imported/{dataset}/seed{seed})")
    # every name and key checked before loading weights
    cells = make_cells(args.protocol, args.datasets, args.methods, args.seeds, shots, _method_map(args.preset),
                       _overrides(args), args.targets, adapters, teacher=args.teacher)
    from .captions.cli import check_cells
    from .data.description_options import check_cell_descriptions

    cells = check_cell_descriptions(args, cells)  # --descriptions applied; every class described (before weights)
    check_cells(args, cells)  # methods that need per-image captions have them (before loading weights)
    check_grid_data(cells, args.root)  # every dataset and target loads and has images (before loading weights)
    if args.executor != "local":
        return _run_on_cluster(args, cells)
    backbone = _load_backbone(args.backbone or "ViT-B/16", args)
    out = Path(args.out)
    result = run_grid(cells, backbone, out, _options(args))
    busy = f", {result.busy} being run by another process" if result.busy else ""
    _say(f"{result.ran} run(s) done, {result.skipped} already finished{busy}; records: {out / 'records.jsonl'}")
    if not args.no_report and _is_main():
        files = _write_report(out / "records.jsonl", out / "report", plots=not args.no_plots)
        _say(f"report: {out / 'report' / 'report.md'} ({len(files)} files)")
    if backbone.random_weights:
        _banner(RANDOM_BANNER.format(backbone.name))
    return 0


def _run_on_cluster(args, cells) -> int:
    """``run --executor slurm|submitit-local``: one submitit job per unfinished cell (promptclip.cluster)."""
    from .cluster import ClusterOptions, check_failures, import_submitit, submit_grid
    from .distributed import requested

    if requested():
        raise ConfigError(f"--executor {args.executor} submits jobs; start it once, not under torchrun (use "
                          "--gpus-per-job N for data-parallel jobs)")
    import_submitit(args.executor)  # says how to install it before any weights load
    gpus = args.gpus_per_job if args.gpus_per_job is not None else int(args.device.startswith("cuda"))
    if gpus == 0 and args.device.startswith("cuda"):
        raise ConfigError("--device cuda with --gpus-per-job 0: the jobs would have no GPU; use --gpus-per-job 1 (or "
                          "more for data-parallel jobs) or --device cpu")
    cluster = ClusterOptions(args.executor, args.executor_folder, args.partition, gpus,
                             args.cpus_per_job, args.mem_gb, args.time, args.array_parallelism, wait=not args.no_wait)
    source = _backbone_spec(args.backbone or "ViT-B/16", args)  # absolute paths: jobs may start elsewhere
    backbone = _load_backbone(source.source, args, "cpu")  # the fingerprint names the run directories
    out = Path(args.out)
    result = submit_grid(cells, backbone, source, out, _options(args), cluster)
    busy = f", {result.busy} being run by another process" if result.busy else ""
    _say(f"{result.submitted} job(s) submitted, {result.skipped} cell(s) already finished{busy}; "
         f"records: {out / 'records.jsonl'}")
    if not cluster.wait:
        _say(f"not waiting: follow the jobs in {result.folder}; rerun the same command to resume or collect, or "
             f"`promptclip report {out}` once they are done")
        return 0
    check_failures(result)
    if not args.no_report:
        files = _write_report(out / "records.jsonl", out / "report", plots=not args.no_plots)
        _say(f"report: {out / 'report' / 'report.md'} ({len(files)} files)")
    if backbone.random_weights:
        _banner(RANDOM_BANNER.format(backbone.name))
    return 0


def cmd_report(args) -> int:
    source = Path(args.records)
    if not source.exists():
        raise DataError(f"no records at {source}: pass a records.jsonl file or a run output directory")
    records_path = source / "records.jsonl" if source.is_dir() and (source / "records.jsonl").exists() else source
    out = Path(args.out) if args.out else (source if source.is_dir() else source.parent) / "report"
    files = _write_report(records_path, out, plots=not args.no_plots, required=True)
    for path in files:
        _say(str(path))
    return 0


def cmd_demo(args) -> int:
    from .protocols import make_cells, run_grid

    cells = make_cells("base2novel", [DEMO_DATASET], list(DEMO_METHODS), args.seeds, [16], None, _overrides(args))
    try:
        backbone = _load_backbone(args.backbone, args)
    except PromptClipError as err:
        raise type(err)(f"{err} To check the pipeline without weights: promptclip demo --backbone tiny "
                        "(random weights, accuracy meaningless).") from None
    out = Path(args.out)
    _say(f"demo: base-to-novel on the bundled EuroSAT sample ({DEMO_DATASET}) with {', '.join(DEMO_METHODS)}, "
         f"seeds {args.seeds}, output {out}")
    result = run_grid(cells, backbone, out, _options(args))
    files = _write_report(out / "records.jsonl", out / "report", plots=not args.no_plots)
    _say(f"{result.ran} run(s) done, {result.skipped} already finished")
    _say(f"report: {out / 'report' / 'report.md'} ({len(files)} files)")
    report = (out / "report" / "report.md").read_text()
    start = report.find("| Dataset")
    if start >= 0:
        _say(report[start:].split("\n\n")[0])
    if backbone.random_weights:
        _banner(RANDOM_BANNER.format(backbone.name))
    return 0


def cmd_predict(args) -> int:
    from .api import Predictor, zero_shot
    from .protocols import load_trained

    paths = _image_paths(args.images)
    classnames = _classnames(args.classnames) if args.classnames else None
    if args.template is not None:
        from .data.templates import check_template

        check_template(args.template, "--template")
    if args.adapter:
        meta = _adapter_meta(args.adapter)
        backbone = _load_backbone(args.backbone or meta["backbone"]["name"], args)
        method = load_trained(_adapter_file(args.adapter), backbone, classnames, args.template)
        method.set_eval_context(_eval_context("all", meta["classnames"], method.classnames))
        predictor = Predictor(method, backbone, args.device, args.precision or "auto")
    else:
        if not classnames:
            raise ConfigError("predict needs --adapter PATH or --classnames 'a,b,c' (zero-shot)")
        backbone = _load_backbone(args.backbone or "ViT-B/16", args)
        predictor = zero_shot(classnames, backbone, args.template or "a photo of a {}.",
                              args.device, args.precision or "auto")
    rows = []
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        from .captions.cli import predict_batch

        extras = predict_batch(args, chunk)  # per-image captions with --captions (mugcp)
        for path, top in zip(chunk, predictor.predict(chunk, top_k=args.top_k, batch=extras), strict=True):
            rows.append({"path": str(path), "predictions": [
                {"label": label, "probability": round(prob, 6)} for label, prob in top]})
    _say(_format_predictions(rows, args.format))
    if backbone.random_weights:
        _banner(RANDOM_BANNER.format(backbone.name))
    return 0


def _classnames(text: str) -> list[str]:
    """``--classnames``: comma-separated names, or a file with one name per line (a name is never a path)."""
    from .data.classnames import check_classnames

    path = Path(text).expanduser()
    try:
        is_file = "," not in text and path.is_file()
    except OSError:  # e.g. a long class name is no valid file name
        is_file = False
    if is_file:
        try:
            names = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise DataError(f"--classnames file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        source = f"--classnames file {path}"
    else:
        if "," not in text and (path.suffix.lower() in (".txt", ".csv") or "/" in text):
            raise DataError(f"--classnames {text!r} looks like a file, which does not exist: pass an existing file "
                            "with one class name per line, or comma-separated names")
        names = text.split(",")
        source = f"--classnames {text!r}"
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ConfigError(f"{source} gives no class name")
    if len(names) < 2:
        raise ConfigError(f"{source} gives one class name ({names[0]!r}): classifying needs at least two "
                          "(comma-separated, or one per line in a file)")
    check_classnames(names, source)
    return names


def _image_paths(items: list[str]) -> list[Path]:
    from .data.files import list_images

    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = [p / rel for rel in list_images(p)]
            if not found:
                raise DataError(f"folder {p} holds no image files (looked for .jpg, .jpeg, .png, ... recursively)")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"image {p} does not exist")
    return paths


def _format_predictions(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "rank", "label", "probability"])
        for row in rows:
            for rank, pred in enumerate(row["predictions"], 1):
                writer.writerow([row["path"], rank, pred["label"], pred["probability"]])
        return buffer.getvalue().rstrip("\n")
    lines = []
    for row in rows:
        preds = ", ".join(f"{p['label']} {100 * p['probability']:.1f}%" for p in row["predictions"])
        lines.append(f"{row['path']}: {preds}")
    return "\n".join(lines)


def cmd_data(args) -> int:
    from .data.cli import data_command

    return data_command(args, _say)


def cmd_import(args) -> int:
    from .reference.cli import import_command

    def load_backbone(name: str, device: str, _progress: bool):
        return _load_backbone(name, args, device)  # progress follows --quiet

    backbone = import_command(args, load_backbone, _classnames, _say, _banner)
    if backbone.random_weights:
        _banner(RANDOM_BANNER.format(backbone.name))
    return 0


# -- parser --------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .captions.cli import add_captions_option
    from .captions.cli import add_parser as add_captions_parser
    from .data.description_options import add_descriptions_option

    common = _Parser(add_help=False)
    common.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    common.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast precision (default from the preset: auto = bf16 where the hardware has it)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--plugin", action="append", metavar="SPEC",
                        help="load methods from FILE.py[:Class] or package.module[:Class] first (repeatable); "
                             "installed packages need none (entry points 'promptclip.methods')")

    parser = _Parser(prog="promptclip", description="Prompt learning on frozen CLIP models.")
    parser.add_argument("--version", action="version", version=f"promptclip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help_text, **kw):
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common], **kw)

    p = add("list", "list methods, datasets, backbones or presets")
    p.add_argument("what", choices=["methods", "datasets", "backbones", "presets"])
    p.set_defaults(func=cmd_list)

    def data_args(p, shots_default=16):
        p.add_argument("--dataset", required=True, help="a dataset name, eurosat-sample, folder:PATH or csv:PATH")
        p.add_argument("--root", help="data root holding the dataset folders")
        p.add_argument("--shots", type=SHOTS, default=shots_default, help="images per class (0: every image)")
        p.add_argument("--seed", type=seed, default=1)
        p.add_argument("--subsample", choices=["all", "base", "new"], default="all")

    def config_args(p):
        _add_backbone_options(p, "ViT-B/16 (default), another registry name, tiny, or a weights path")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a preset value, e.g. train.max_epoch=2 or method_config.depth=3")
        p.add_argument("--log-to", nargs="+", choices=TRACKERS, metavar="TRACKER",
                       help="also send the training metrics (always in metrics.jsonl) to tensorboard and/or wandb")
        p.add_argument("--teacher", metavar="PATH",
                       help="for methods that distil a teacher (promptkd): a trained adapter of another method, on "
                            "its own backbone (e.g. promptsrc on ViT-L/14, or one from `promptclip import`); "
                            "{dataset}, {seed} and {shots} in PATH are filled in")

    p = add("train", "train one method on one dataset split and save its adapter")
    p.add_argument("--method", required=True, help="a method name, or a plugin's FILE.py:Class")
    p.add_argument("--preset", help="preset name or YAML path (default: the method's official few-shot preset)")
    data_args(p)
    config_args(p)
    p.add_argument("--out", required=True, type=output_location(),
                   help="run directory (resumed if it holds an interrupted run)")
    p.add_argument("--batch-order", metavar="FILE",
                   help="JSON list of epochs, each a list of batches of indices into the training split (in its "
                        "listed order), replacing the seeded shuffle: replays another run's order or a curriculum")
    p.add_argument("--init-adapter", metavar="PATH",
                   help="start from an adapter's tensors (same method and shapes, e.g. from `promptclip import`) "
                        "instead of the method's initial values")
    add_captions_option(p)
    add_descriptions_option(p)
    p.set_defaults(func=cmd_train)

    p = add("eval", "evaluate an adapter (or zero-shot CLIP) on a dataset's test split")
    p.add_argument("--adapter", help="adapter .safetensors/.json or a run directory")
    p.add_argument("--method", help="zeroshot (without --adapter), or the method the adapter must have")
    data_args(p)
    _add_backbone_options(p, "default: the adapter's backbone")
    p.add_argument("--batch-size", type=int_at_least(1), default=100)
    add_captions_option(p)
    add_descriptions_option(p)
    _add_feature_cache_option(p)
    p.set_defaults(func=cmd_eval)

    p = add("run", "run a protocol grid (methods x datasets x seeds x shots), resumable, then write the report")
    p.add_argument("protocol", help="base2novel, fewshot, cross_dataset or domain_generalization")
    p.add_argument("--methods", nargs="+", required=True, help="method names (or plugin specs FILE.py:Class)")
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=seed, default=[1, 2, 3])
    p.add_argument("--shots", nargs="+", type=SHOTS,
                   help="images per class (0: every image); default: 1 2 4 8 16 for fewshot, 16 otherwise")
    p.add_argument("--targets", nargs="+", help="cross_dataset / domain_generalization targets (default: the papers')")
    p.add_argument("--preset", action="append", metavar="METHOD=PRESET", help="a non-default preset for a method")
    p.add_argument("--adapter", action="append", metavar="METHOD=PATH",
                   help="evaluate this adapter instead of training the method (e.g. one from `promptclip import`); "
                        "{dataset}, {seed} and {shots} in PATH are filled in per cell")
    p.add_argument("--root", help="data root holding the dataset folders")
    config_args(p)
    p.add_argument("--out", required=True, type=output_location())
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    add_captions_option(p)
    add_descriptions_option(p)
    _add_feature_cache_option(p)
    cluster = p.add_argument_group("cluster (submitit; pip install \"promptclip[slurm]\")")
    cluster.add_argument("--executor", choices=["local", "slurm", "submitit-local"], default="local",
                         help="local: in this process (default); slurm: one SLURM job per grid cell; submitit-local: "
                              "the same jobs as subprocesses of this machine")
    cluster.add_argument("--executor-folder", help="job scripts and logs (default OUT/submitit)")
    cluster.add_argument("--partition", help="SLURM partition")
    cluster.add_argument("--gpus-per-job", type=int_at_least(0),
                         help="GPUs per job (default 1 with --device cuda, else 0); more than 1 trains the cell "
                              "data-parallel over them")
    cluster.add_argument("--cpus-per-job", type=int_at_least(1), help="CPUs per task")
    cluster.add_argument("--mem-gb", type=int_at_least(1), help="memory per job")
    cluster.add_argument("--time", type=int_at_least(1), default=24 * 60,
                         help="time limit of one job, minutes (default 1440)")
    cluster.add_argument("--array-parallelism", type=int_at_least(1), default=16,
                         help="jobs running at once (default 16)")
    cluster.add_argument("--no-wait", action="store_true", help="submit and return instead of waiting for the jobs")
    p.set_defaults(func=cmd_run)

    p = add("report", "tables and plots from result records")
    p.add_argument("records", help="records.jsonl or a run output directory")
    p.add_argument("--out", type=output_location(), help="default: <records dir>/report")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_report)

    p = add("predict", "top-k labels for images or folders, from an adapter or zero-shot class names")
    p.add_argument("images", nargs="+")
    p.add_argument("--adapter")
    p.add_argument("--classnames", help="comma-separated names or a file with one per line")
    p.add_argument("--template", help="zero-shot template, default 'a photo of a {}.'")
    _add_backbone_options(p, "default: the adapter's backbone, ViT-B/16 for zero-shot")
    p.add_argument("--top-k", type=int_at_least(1), default=5)
    p.add_argument("--batch-size", type=int_at_least(1), default=32)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    add_captions_option(p)
    p.set_defaults(func=cmd_predict)

    from .data.cli import add_arguments as add_data_arguments

    add_data_arguments(add("data", "prepare or verify a benchmark dataset")).set_defaults(func=cmd_data)

    p = add("demo", "base-to-novel with MaPLe and zero-shot CLIP on the bundled EuroSAT sample, with a report")
    _add_backbone_options(p, "ViT-B/16 (downloaded), a weights path, or tiny", default="ViT-B/16")
    p.add_argument("--seeds", nargs="+", type=seed, default=[1])
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--out", type=output_location(), default="promptclip-demo")
    p.add_argument("--no-plots", action="store_true")
    _add_feature_cache_option(p)
    p.set_defaults(func=cmd_demo)
    add_captions_parser(sub)
    from .reference.cli import add_parser as add_import_parser

    add_import_parser(sub).set_defaults(func=cmd_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    from . import distributed

    ctx = None
    try:
        if getattr(args, "device", None) is not None:
            from .device import check_device

            check_device(args.device)
        if distributed.requested():  # started by torchrun with several processes
            if args.func not in (cmd_train, cmd_run):
                raise ConfigError(f"`{args.command}` does not run data-parallel; only train and run do under "
                                  "torchrun (run other commands with plain `promptclip`)")
            ctx, args.device = distributed.setup(args.device)
        _load_plugins(args)
        if getattr(args, "log_to", None):
            check_trackers(args.log_to)  # says how to install a missing one before any weights load
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: finished epochs and runs are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except (PromptClipError, OSError) as err:  # OSError: a path the user gave cannot be read or written
        message = str(err) if isinstance(err, PromptClipError) else _os_error_message(err)
        distributed.report_failure(ctx, message)
        if args.debug:
            raise
        print(textwrap.fill(f"error: {message}", width=118, break_long_words=False, break_on_hyphens=False),
              file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the last line of defence: one paragraph, traceback on --debug
        distributed.report_failure(ctx, f"{type(err).__name__}: {err}")
        if args.debug:
            raise
        print(f"unexpected error: {type(err).__name__}: {err} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        if ctx is not None:
            distributed.shutdown()


def _os_error_message(err: OSError) -> str:
    where = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    what = err.strerror or type(err).__name__
    return f"{where}: {what} ({type(err).__name__}); check the path and its permissions" if where else \
        f"{what} ({type(err).__name__}: {err})"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line for the user (``warning: ...``), not Python's file:line form."""
    if _is_main():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def console_main() -> None:
    sys.exit(main())
