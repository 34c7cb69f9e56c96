"""Training-step time and peak memory per method on ViT-B/16 random weights.

One subprocess per (method, classes, precision), so each peak RSS is its own. A step is the method's own training
step, gradient and optimizer update (``training_step``, ``backward``, its parameter groups and optimizer: as ``fit``
runs them), at batch 4 (the official batch of most methods), images 224x224. Methods fitted on frozen features
(Tip-Adapter, the linear probe) have no training step and are left out.

    python bench/train_step.py                                   # every method, 10 and 100 classes, fp32 and bf16
    python bench/train_step.py --methods coop maple --classes 10 --precisions fp32

Compare variants as ratios within one run: absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from promptclip.clip.architectures import ARCHITECTURES
from promptclip.clip.model import CLIP
from promptclip.methods import create_method, get_method_class, list_methods
from promptclip.precision import autocast, cpu_description
from promptclip.train import TrainConfig, make_optimizer

CLASSNAMES = ["annual crop land", "forest", "herbaceous vegetation land", "highway or road", "industrial buildings",
              "pasture land", "permanent crop land", "residential buildings", "river", "sea or lake"]


def classnames(n: int) -> list[str]:
    return [f"{CLASSNAMES[i % len(CLASSNAMES)]} {i // len(CLASSNAMES)}" for i in range(n)]


def measure(method_name: str, num_classes: int, precision: str, batch: int, steps: int) -> dict:
    backbone = CLIP(ARCHITECTURES["ViT-B/16"]).eval()  # default init: weights do not matter for speed
    cls = get_method_class(method_name)
    names = classnames(num_classes)
    config = None
    if cls.description_field is not None:  # one description per class (CoPrompt): the cost of the bank, not its text
        folder = Path(tempfile.mkdtemp())
        path = folder / "descriptions.json"
        path.write_text(json.dumps({name: [f"a photo of a {name}, seen from above."] for name in names}))
        config = {cls.description_field: str(path)}
    method = create_method(method_name, backbone, names, config, template="a photo of a {}.")
    method.train()
    g = torch.Generator().manual_seed(0)
    data = {"image": torch.randn(batch, 3, 224, 224, generator=g), "label": torch.arange(batch) % num_classes,
            "caption": ["a satellite image of fields and a river"] * batch}
    for view in range(2, cls.train_views + 1):
        data[f"image_view{view}"] = torch.randn(batch, 3, 224, 224, generator=g)
    # The method's own step, gradient and optimizer (Adam, parameter groups, projections), as fit runs them.
    optimizer = make_optimizer(method, TrainConfig())

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, "cpu"):
            _, losses = method.training_step(data)
        method.backward(losses, lambda loss: loss.float())
        optimizer.step()

    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"method": method_name, "classes": num_classes, "precision": precision,
            "step_s": round(statistics.median(times), 3), "trainable": method.num_trainable(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=[
        m for m in list_methods() if m != "zeroshot" and not get_method_class(m).fits_on_features])
    parser.add_argument("--classes", nargs="+", type=int, default=[10, 100])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, classes, precision = args.one
        print(json.dumps(measure(method, int(classes), precision, args.batch, args.steps)))
        return

    print(f"CPU: {cpu_description()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ViT-B/16 random weights, batch {args.batch}, "
          f"median of {args.steps} steps after one warm-up")
    print("| method | classes | trainable | " + " | ".join(f"{p} step s | {p} peak RSS MB" for p in args.precisions)
          + (" | bf16 speed-up |" if {"fp32", "bf16"} <= set(args.precisions) else " |"))
    print("|---|---|---|" + "---|---|" * len(args.precisions) + ("---|" if "bf16" in args.precisions else ""))
    for method in args.methods:
        for classes in args.classes:
            rows = {}
            for precision in args.precisions:
                cmd = [sys.executable, __file__, "--one", method, str(classes), precision, "--batch", str(args.batch),
                       "--steps", str(args.steps)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                rows[precision] = json.loads(done.stdout) if done.returncode == 0 else {
                    "step_s": "failed", "peak_rss_mb": done.stderr.strip().splitlines()[-1][:60], "trainable": "?"}
            cells = " | ".join(f"{rows[p]['step_s']} | {rows[p]['peak_rss_mb']}" for p in args.precisions)
            trainable = next(iter(rows.values()))["trainable"]
            speedup = ""
            if {"fp32", "bf16"} <= set(rows) and all(isinstance(rows[p]["step_s"], float) for p in ("fp32", "bf16")):
                speedup = f" {rows['fp32']['step_s'] / rows['bf16']['step_s']:.2f}x |"
            print(f"| {method} | {classes} | {trainable:,} | {cells} |{speedup}", flush=True)


if __name__ == "__main__":
    main()
