"""``promptclip captions build|verify|mask`` and the ``--captions FILE`` option of train / eval / run / predict.

Registered by ``promptclip.cli.build_parser`` through :func:`add_parser` and :func:`add_captions_option`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..argtypes import int_at_least, output_location
from ..errors import ConfigError, DataError
from .build import SPLITS, build_captions, dataset_items, image_items, verify_captions
from .leak import DEFAULT_MASK, mask_class_names
from .settings import DEFAULT_INSTRUCTION, DTYPES, PROMPT_STYLES
from .store import CacheWriter, CaptionExtras, CaptionSet, load_captions, read_caption_file, sha256_text

INFERRED_NOTE = ("MuGCP's captioner and instruction are not published: the defaults are an INFERRED design "
                 "(SPEC 3.8.3, docs/mugcp.md)")


def _say(text: str = "") -> None:
    print(text, flush=True)


# -- the --captions option --------------------------------------------------------------------------------------------


def add_captions_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--captions", action="append", metavar="FILE",
        help="per-image captions for methods that use them (mugcp, an INFERRED design): a cache from "
             "`promptclip captions build` or your own JSONL / CSV path,caption file; repeat for several files")


def caption_set(args: Any) -> CaptionSet | None:
    """The captions of ``--captions`` (read once per command), or None."""
    files = getattr(args, "captions", None)
    if not files:
        return None
    cached = getattr(args, "_caption_set", None)
    if cached is None:
        cached = load_captions(files)
        args._caption_set = cached
    return cached


def caption_extras(args: Any) -> CaptionExtras | None:
    """``RunOptions.extras`` for ``--captions`` (None without it)."""
    captions = caption_set(args)
    return CaptionExtras(captions) if captions is not None else None


def _requirement(method: str, config: Mapping[str, Any] | Any) -> str | None:
    from ..methods import get_method_class

    requirement = getattr(get_method_class(method), "caption_requirement", None)
    return requirement(config) if requirement is not None else None


#: ``(what, dataset name, records)``: images a command will read, e.g. ``("test", "eurosat", [...])``.
RecordGroups = Callable[[], Sequence[tuple[str, str, Sequence[Any]]]]


def check_captions(args: Any, method: str, config: Mapping[str, Any] | Any, groups: RecordGroups) -> None:
    """Before any weight is loaded: a method that needs captions has them for every image it will read.

    ``groups()`` lists those images (called only when the method uses captions). A method whose config makes
    captions required (MuGCP with ``missing_caption: error``) fails here naming the first uncovered image; with a
    fallback, coverage gaps are reported and the run goes on.
    """
    requirement = _requirement(method, config)
    if requirement is None:
        if getattr(args, "captions", None):
            _say(f"warning: method {method!r} does not use captions; --captions {' '.join(args.captions)} is ignored")
        return
    captions = caption_set(args)
    if captions is None:
        if requirement == "required":
            raise ConfigError(
                f"method {method!r} needs one caption per image (its semantic prompts come from MLLM captions; "
                "INFERRED design). Build them with `promptclip captions build --dataset DATASET --model MODEL --out "
                "captions.jsonl` (or write your own JSONL / CSV path,caption) and pass --captions FILE, or set "
                "method_config.missing_caption=fallback to run without"
            )
        _say(f"warning: {method} runs without --captions: every image gets the configured fallback caption")
        return
    for what, name, records in groups():
        n, missing = captions.covered(records)
        if not missing:
            continue
        where = (f"{len(missing)} of {len(records)} {what} images of {name} have no caption in "
                 f"{', '.join(captions.files)} (first: {missing[0].relpath}, {missing[0].path})")
        if requirement == "required":
            raise DataError(
                f"{where}. Add them (`promptclip captions build --dataset {name} --model MODEL --out FILE` resumes "
                "an existing cache), or set method_config.missing_caption=fallback to use the fallback caption for "
                "them (counted and reported)"
            )
        _say(f"warning: {where}; {method} uses its fallback caption for them")


def split_groups(args: Any, dataset: str, which: str, shots: int, seed: int, subsample: str) -> RecordGroups:
    """The images ``train`` (the few-shot training set) or ``eval`` (the test split) will read."""
    def groups():
        from ..data import protocol_splits

        splits = protocol_splits(dataset, getattr(args, "root", None), num_shots=shots, seed=seed,
                                 subsample=subsample)
        return [(which, splits.name, splits.train if which == "train" else splits.test)]

    return groups


def check_cells(args: Any, cells: Sequence[Any]) -> None:
    """:func:`check_captions` for a protocol grid: each cell's few-shot training images, the full test split of its
    dataset (base and novel halves for base-to-novel) and of every transfer target."""
    root = getattr(args, "root", None)
    for cell in cells:
        def groups(cell=cell):
            from ..data import load_splits, protocol_splits

            subsample = "base" if cell.protocol == "base2novel" else "all"
            train = protocol_splits(cell.dataset, root, num_shots=cell.shots, seed=cell.seed, subsample=subsample)
            found = [("training", train.name, train.train), ("test", train.name, load_splits(cell.dataset, root).test)]
            return found + [("test", t, load_splits(t, root).test) for t in cell.targets]

        check_captions(args, cell.method, cell.preset.method_config, groups)


# -- captions build | verify | mask ----------------------------------------------------------------------------------


def cmd_captions(args: Any) -> int:
    return {"build": _build, "verify": _verify, "mask": _mask}[args.action](args)


def _build(args: Any) -> int:
    from .hf import HFCaptioner

    if bool(args.dataset) == bool(args.images):
        raise ConfigError("captions build needs --dataset NAME (its splits) or --images PATH... (files or folders)")
    items = dataset_items(args.dataset, args.root, args.splits) if args.dataset else image_items(args.images)
    if args.limit is not None:
        items = items[: args.limit]
    instruction = args.instruction
    if args.instruction_file:
        instruction = Path(args.instruction_file).read_text(encoding="utf-8").strip()
    captioner = HFCaptioner(args.model, instruction=instruction, prompt_style=args.prompt_style,
                            device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                            num_beams=args.num_beams, revision=args.revision,
                            local_files_only=args.local_files_only, trust_remote_code=args.trust_remote_code)
    _say(f"captioning {len(items)} images with {args.model} ({captioner.prompt_style} prompt, "
         f"{captioner.generation}) -> {args.out}")
    result = build_captions(items, args.out, captioner, batch_size=args.batch_size, progress=not args.quiet)
    _say(str(result))
    return 0


def _verify(args: Any) -> int:
    expected = {}
    if args.model:
        expected["model"] = args.model
    if args.instruction is not None:
        expected["instruction"] = args.instruction
    report = verify_captions(args.files, args.dataset, args.root, args.splits, expected=expected or None)
    _say(str(report))
    return 0 if report.ok else 1


def _mask(args: Any) -> int:
    from ..data import load_splits

    data = load_splits(args.dataset, args.root)
    entries = read_caption_file(args.file)
    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"{out} exists; masking writes a new file")
    names = list(data.classnames)
    marker = {"classes_sha256": sha256_text("\n".join(names)), "token": args.token, "dataset": data.name}
    total = changed = 0
    lines = []
    for entry in entries:
        text, n = mask_class_names(entry.caption, names, args.token)
        total += n
        changed += bool(n)
        lines.append({**entry.meta, "key": entry.key, "caption": text, "masked": marker})
    with CacheWriter(out) as writer:
        writer.append(lines)
    _say(f"masked {total} class-name mentions in {changed} of {len(entries)} captions "
         f"(every class name of {data.name}, replaced by {args.token!r}) -> {out}")
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``captions`` under the main parser's sub-commands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    parser = sub.add_parser(
        "captions", help="per-image MLLM captions for MuGCP (INFERRED design): build, verify, mask",
        description=f"Per-image captions from a multimodal LLM (transformers) for MuGCP's semantic prompts. "
                    f"{INFERRED_NOTE}.")
    actions = parser.add_subparsers(dest="action", required=True)

    def dataset_args(p, required=False):
        p.add_argument("--dataset", required=required, help="a dataset name, eurosat-sample, folder:PATH, csv:PATH")
        p.add_argument("--root", help="data root holding the dataset folders")
        p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                       help="splits to caption / check (default: all three)")

    p = actions.add_parser("build", parents=[common], help="caption a dataset's images (resumable JSONL cache)",
                           description="Caption every image of a dataset (or of --images) with a multimodal LLM. "
                                       "Batches are appended to --out as they finish: rerun the same command to "
                                       f"resume a killed run. {INFERRED_NOTE}.")
    dataset_args(p)
    p.add_argument("--images", nargs="+", help="image files or folders instead of --dataset (keyed by absolute path)")
    p.add_argument("--model", required=True,
                   help="transformers image-text-to-text model: hub name (e.g. Qwen/Qwen2-VL-2B-Instruct, "
                        "llava-hf/llava-1.5-7b-hf, Salesforce/blip-image-captioning-large) or local folder")
    p.add_argument("--out", required=True, type=output_location(directory=False),
                   help="the JSONL cache (created, or resumed when it exists)")
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION,
                   help="fixed instruction; must not reveal the label set (default: a generic description request)")
    p.add_argument("--instruction-file", help="read the instruction from a file")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default="auto",
                   help="chat: instruction through the chat template; prefix: BLIP-style text prefix; none: image "
                        "only; auto: chat when the processor has a chat template, else none")
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=48)
    p.add_argument("--num-beams", type=int_at_least(1), default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="model dtype (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--revision", help="hub revision (commit) of the model, for exact provenance")
    p.add_argument("--local-files-only", action="store_true", help="never download (offline)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models with custom code from the hub")
    p.add_argument("--limit", type=int_at_least(1), help="caption at most N images (trial runs)")
    p.set_defaults(func=cmd_captions)

    p = actions.add_parser("verify", parents=[common], help="coverage, missing images, provenance, label leakage",
                           description="Check captions against a dataset: every image of the chosen splits has a "
                                       "caption, captioned images exist, one captioner configuration, and how many "
                                       "captions name their ground-truth class. Exit code 1 when not OK.")
    p.add_argument("files", nargs="+", help="caption files (cache JSONL, user JSONL or CSV path,caption)")
    dataset_args(p, required=True)
    p.add_argument("--model", help="expected captioning model (provenance check)")
    p.add_argument("--instruction", help="expected instruction text (when the cache stores it)")
    p.set_defaults(func=cmd_captions)

    p = actions.add_parser("mask", parents=[common], help="write a copy with every class name masked",
                           description="Replace every mention of any class name of the dataset (not only the "
                                       "ground truth, which would itself leak the label) by a neutral token.")
    p.add_argument("file")
    dataset_args(p, required=True)
    p.add_argument("--out", required=True, type=output_location(directory=False))
    p.add_argument("--token", default=DEFAULT_MASK, help=f"replacement (default {DEFAULT_MASK!r})")
    p.set_defaults(func=cmd_captions)
    return parser


def predict_batch(args: Any, paths: Sequence[Path]) -> dict[str, list] | None:
    """Per-image extras for ``predict``'s image files: their captions and paths (None without --captions)."""
    captions = caption_set(args)
    if captions is None:
        return None
    return {"caption": [captions.lookup_file(p) for p in paths], "path": [str(p) for p in paths]}
