"""A base-to-novel protocol grid, wall time per phase, before and after the frozen-feature cache and tower kernels.

    python bench/grid.py                                          # the bundled EuroSAT sample (300 test images)
    python bench/grid.py --dataset eurosat --root DATA --test-per-class 30 --seeds 1 2 3

The grid: zero-shot, CoOp, CoCoOp and KgCoOp x seeds, base2novel at 16 shots, each method's official preset with a
reduced ``train.max_epoch`` (default 1), ``--precision auto``, on ViT-B/16 with random weights (speed does not
depend on the weight values). ``--dataset eurosat --root DATA`` is full EuroSAT (``DATA/eurosat/2750``, 8,100 test
images); ``--test-per-class N`` keeps the first N test images of every class (a CSV dataset written next to the
output, with the dataset's class names), so that the "before" grid stays minutes long.

- ``before``: no feature cache, fp32 products through the default BLAS, the allocating QuickGELU (the code
  before this change, replayed in the same process);
- ``after``: the defaults, with a fresh feature-cache directory (so every hit comes from within the grid).

Phases: ``train`` (``fit``), ``eval`` (evaluation, including the feature pass), and the image tower inside each:
its time and the images it encoded (forward hooks on ``model.visual``). Records of the two variants are compared.
Compare the variants as ratios of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from promptclip import protocols
from promptclip.clip.architectures import ARCHITECTURES
from promptclip.clip.model import CLIP
from promptclip.clip.weights import backbone_fingerprint
from promptclip.data import load_splits
from promptclip.features import FeatureCache
from promptclip.precision import cpu_description
from promptclip.protocols import Backbone, RunOptions, run_protocol
from roofline import variant  # bench/roofline.py: the "before" code path

METHODS = ["zeroshot", "coop", "cocoop", "kgcoop"]


class PhaseClock:
    """Wall time of ``fit`` and of evaluation, and the image tower's time and images within each phase."""

    def __init__(self, visual: torch.nn.Module):
        self.phase = "other"
        self.seconds: dict[str, float] = defaultdict(float)
        self.tower_seconds: dict[str, float] = defaultdict(float)
        self.tower_images: dict[str, int] = defaultdict(int)
        self._started: list[float] = []
        self.visual = visual

    @contextlib.contextmanager
    def installed(self):
        """Hooks on the image tower, and ``fit`` / ``evaluate_dataset`` of the protocols timed as phases."""
        def before(_module, args):
            self._started.append(time.perf_counter())
            self.tower_images[self.phase] += args[0].shape[0]

        def after(_module, _args, _output):
            self.tower_seconds[self.phase] += time.perf_counter() - self._started.pop()

        handles = [self.visual.register_forward_pre_hook(before), self.visual.register_forward_hook(after)]
        originals = protocols.fit, protocols.evaluate_dataset
        protocols.fit = self.timed("train", protocols.fit)  # bench-only: the protocols module looks them up here
        protocols.evaluate_dataset = self.timed("eval", protocols.evaluate_dataset)
        try:
            yield self
        finally:
            protocols.fit, protocols.evaluate_dataset = originals
            for handle in handles:
                handle.remove()

    def timed(self, phase: str, fn):
        def wrapper(*args, **kwargs):
            self.phase, start = phase, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
                self.phase = "other"

        return wrapper


def test_subset(dataset: str, root: str | None, per_class: int, out: Path) -> str:
    """A CSV dataset: the dataset's train split and its first ``per_class`` test images of every class."""
    splits = load_splits(dataset, root)
    taken: dict[int, int] = defaultdict(int)
    rows = [("path", "label", "split", "classname")]
    rows += [(r.path, r.label, "train", r.classname) for r in splits.train]
    for r in splits.test:
        if taken[r.label] < per_class:
            taken[r.label] += 1
            rows.append((r.path, r.label, "test", r.classname))
    path = out / "test_subset.csv"
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return f"csv:{path}"


def run_variant(name: str, dataset: str, root: str | None, backbone: Backbone, out: Path, args) -> dict:
    clock = PhaseClock(backbone.model.visual)
    log: list[str] = []
    cache = None if name == "before" else FeatureCache(out / "features")
    options = RunOptions(root=root, progress=False, log=log.append, feature_cache=cache)
    with variant(name), clock.installed():
        start = time.perf_counter()
        grid = run_protocol("base2novel", [dataset], METHODS, backbone, out / name, seeds=args.seeds,
                            shots=[args.shots], overrides=[f"train.max_epoch={args.max_epoch}"], options=options)
        wall = time.perf_counter() - start
    return {"wall": wall, "clock": clock, "records": grid.records,
            "cache_lines": [line for line in log if "image features" in line]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="eurosat-sample", help="eurosat-sample or eurosat (with --root)")
    parser.add_argument("--root", help="data root holding eurosat/ (for --dataset eurosat)")
    parser.add_argument("--test-per-class", type=int, help="only the first N test images of each class")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--max-epoch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--model", default="ViT-B/16", help="architecture (random weights); tiny for a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = CLIP(ARCHITECTURES[args.model]).eval().requires_grad_(False)
    backbone = Backbone(model, args.model, backbone_fingerprint(model), random_weights=True)
    print(f"CPU: {cpu_description()}")
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f} at start; "
          f"{args.model} random weights; base2novel {' '.join(METHODS)} x seeds {args.seeds}, {args.shots} shots, "
          f"train.max_epoch={args.max_epoch}, precision auto")
    with tempfile.TemporaryDirectory(prefix="promptclip-grid-bench-") as tmp:
        out = Path(tmp)
        dataset = args.dataset
        if args.test_per_class:
            dataset = test_subset(args.dataset, args.root, args.test_per_class, out)
        results = {name: run_variant(name, dataset, args.root, backbone, out, args) for name in ("before", "after")}

    distinct = sum(int(line.split(", ")[1].split()[0]) for line in results["after"]["cache_lines"])
    label = args.dataset + (f" ({args.test_per_class} test images per class)" if args.test_per_class else "")
    print(f"\n{label}: {len(results['after']['records']) // 2} cells, {distinct} distinct test images "
          "(base + novel) encoded by the 'after' grid")
    print("| variant | grid wall s | train s | eval s | image tower s (train / eval) | "
          "image-tower images (train / eval) |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        clock = result["clock"]
        print(f"| {name} | {result['wall']:.1f} | {clock.seconds['train']:.1f} | {clock.seconds['eval']:.1f} | "
              f"{clock.tower_seconds['train']:.1f} / {clock.tower_seconds['eval']:.1f} | "
              f"{clock.tower_images['train']} / {clock.tower_images['eval']} |")
    before, after = results["before"], results["after"]
    b, a = before["clock"], after["clock"]
    print(f"before / after: grid wall {before['wall'] / after['wall']:.2f}x, train "
          f"{b.seconds['train'] / a.seconds['train']:.2f}x, eval {b.seconds['eval'] / a.seconds['eval']:.2f}x")
    print(f"image-tower images at evaluation: before {b.tower_images['eval']}, after {a.tower_images['eval']} "
          f"(= distinct test images: {a.tower_images['eval'] == distinct})")
    same = [(r["accuracy"], r["macro_f1"]) for r in before["records"]] == \
        [(r["accuracy"], r["macro_f1"]) for r in after["records"]]
    print(f"records identical before / after (accuracy, macro-F1 of all {len(after['records'])}): {same}")


if __name__ == "__main__":
    main()
