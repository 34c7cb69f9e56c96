"""Backbone throughput: image and text encoders, fp32 vs bf16 autocast, EOT-truncated vs 77-token text.

Random weights (no download). Each model runs in its own subprocess so that its peak RSS is its own.

    python bench/backbone.py                       # ViT-B/16 and ViT-B/32
    python bench/backbone.py --models ViT-B/32 --repeats 5

Absolute figures depend on the machine: compare the variants of one run as ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from promptclip.clip.architectures import build_random
from promptclip.clip.tokenizer import tokenize
from promptclip.precision import autocast, cpu_description
from timing import median_time  # bench/timing.py

PROMPTS = [f"a photo of a {name}, a type of object number {i}." for i, name in
           enumerate(["cat", "dog", "annual crop land", "sea or lake", "herbaceous vegetation land"] * 20)]


def bench_model(name: str, image_batch: int, repeats: int) -> dict:
    model = build_random(name, seed=0)
    size = model.visual.input_resolution
    images = torch.randn(image_batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = tokenize(PROMPTS)
    row = {"model": name, "image_batch": image_batch, "text_prompts": len(PROMPTS),
           "eot_length": int(tokens.argmax(-1).max()) + 1}
    with torch.no_grad():
        for precision in ("fp32", "bf16"):
            with autocast(precision, "cpu"):
                t_img = median_time(lambda: model.encode_image(images), repeats)
                t_cut = median_time(lambda: model.encode_text(tokens, truncate=True), repeats)
                t_full = median_time(lambda: model.encode_text(tokens, truncate=False), repeats)
            row[f"{precision}_images_per_s"] = round(image_batch / t_img, 2)
            row[f"{precision}_text_eot_prompts_per_s"] = round(len(PROMPTS) / t_cut, 1)
            row[f"{precision}_text_77_prompts_per_s"] = round(len(PROMPTS) / t_full, 1)
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-B/16", "ViT-B/32"])
    parser.add_argument("--image-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(bench_model(args.one, args.image_batch, args.repeats)))
        return

    print(f"CPU: {cpu_description()}")
    print(f"torch {torch.__version__}, {args.threads} threads, image batch {args.image_batch}, "
          f"{len(PROMPTS)} prompts, median of {args.repeats}")
    rows = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--one", name, "--image-batch", str(args.image_batch),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    header = ("model", "precision", "images/s", "text @EOT /s", "text @77 /s", "EOT speed-up", "peak RSS MB")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        for precision in ("fp32", "bf16"):
            cut, full = row[f"{precision}_text_eot_prompts_per_s"], row[f"{precision}_text_77_prompts_per_s"]
            print(f"| {row['model']} | {precision} | {row[f'{precision}_images_per_s']} | {cut} | {full} | "
                  f"{cut / full:.2f}x | {row['peak_rss_mb']} |")
    for row in rows:
        ratio = row["bf16_images_per_s"] / row["fp32_images_per_s"]
        print(f"{row['model']}: bf16/fp32 image throughput ratio {ratio:.2f}x (EOT length {row['eot_length']})")


if __name__ == "__main__":
    main()
