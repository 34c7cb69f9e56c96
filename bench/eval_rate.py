"""Evaluation throughput per method, and what an evaluation batch computes, on ViT-B/16 random weights.

    python bench/eval_rate.py                                   # every method, 10 classes, fp32 before/after, bf16
    python bench/eval_rate.py --methods ivlp promptsrc --batches 5

For each method: images/s of ``method(batch)`` in eval mode under ``no_grad`` (what ``evaluate`` runs per batch),
batch 16 at 224 px, median over ``--batches`` batches after one warm-up batch (which encodes the class prompts
once; evaluation caches them). Beside the rate, what one evaluation batch pushes through the towers, counted with
forward hooks on the first block of each tower:

- image sequences: 16 means one image-tower pass per image; 32 would mean a second pass (e.g. a frozen teacher
  that only the training loss needs);
- text sequences: 0 means the class features came from the cache; anything else is text-tower work per batch.

Variants, in one process: ``fp32 before`` (the default BLAS for fp32 products, the allocating QuickGELU: the code
before the tower-kernel change), ``fp32 after`` and ``bf16 after`` (the defaults). Compare them as ratios of one run.
"""

from __future__ import annotations

import argparse

import torch

from promptclip.clip.architectures import ARCHITECTURES
from promptclip.clip.model import CLIP
from promptclip.methods import create_method, list_methods
from promptclip.precision import autocast, cpu_description
from roofline import variant  # bench/roofline.py: the "before" code path
from timing import median_time  # bench/timing.py

CLASSNAMES = ["annual crop land", "forest", "herbaceous vegetation land", "highway or road", "industrial buildings",
              "pasture land", "permanent crop land", "residential buildings", "river", "sea or lake"]
VARIANTS = (("fp32 before", "fp32", "before"), ("fp32 after", "fp32", "after"), ("bf16 after", "bf16", "after"))


class SequenceCounter:
    """Sequences entering the first block of each tower (one per image or text pass)."""

    def __init__(self, backbone: CLIP):
        self.images = 0
        self.texts = 0
        self._handles = [
            backbone.visual.blocks[0].register_forward_pre_hook(self._count("images")),
            backbone.text.blocks[0].register_forward_pre_hook(self._count("texts")),
        ]

    def _count(self, attribute: str):
        def hook(_module, args):
            setattr(self, attribute, getattr(self, attribute) + args[0].shape[0])
        return hook

    def reset(self) -> None:
        self.images = self.texts = 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def measure(method, batch: dict, precision: str, batches: int, counter: SequenceCounter) -> tuple[float, int, int]:
    """Images/s (median over ``batches`` evaluation batches after a warm-up batch, which encodes and caches the class
    features at this precision) and the sequences of one batch."""
    method.eval()

    def one_batch():
        counter.reset()
        method(batch)

    with torch.no_grad(), autocast(precision, "cpu"):
        seconds = median_time(one_batch, batches)
    return batch["image"].shape[0] / seconds, counter.images, counter.texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list_methods())
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"CPU: {cpu_description()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ViT-B/16 random weights, "
          f"{len(CLASSNAMES)} classes, eval batch {args.batch}, median of {args.batches} batches after one warm-up")
    backbone = CLIP(ARCHITECTURES["ViT-B/16"]).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(args.batch, 3, 224, 224, generator=g),
             "label": torch.arange(args.batch) % len(CLASSNAMES),
             "caption": ["a satellite image of fields and a river"] * args.batch}
    counter = SequenceCounter(backbone)
    header = " | ".join(f"{name} img/s" for name, _, _ in VARIANTS)
    print(f"| method | {header} | fp32 after/before | image sequences per batch | text sequences per batch |")
    print("|---|" + "---|" * len(VARIANTS) + "---|---|---|")
    for name in args.methods:
        method = create_method(name, backbone, CLASSNAMES, template="a photo of a {}.")
        rates, images, texts = {}, set(), set()
        for label, precision, code in VARIANTS:
            with variant(code):
                rate, n_images, n_texts = measure(method, batch, precision, args.batches, counter)
            rates[label] = rate
            images.add(n_images)
            texts.add(n_texts)
        cells = " | ".join(f"{rates[label]:.2f}" for label, _, _ in VARIANTS)
        ratio = rates["fp32 after"] / rates["fp32 before"]
        print(f"| {name} | {cells} | {ratio:.2f}x | {'/'.join(map(str, sorted(images)))} | "
              f"{'/'.join(map(str, sorted(texts)))} |", flush=True)
    counter.remove()


if __name__ == "__main__":
    main()
