"""MuGCP (INFERRED design) cost on ViT-B/16 random weights: text sequences per batch, training-step and evaluation
time against MaPLe (cached class text) and CoCoOp (B x C text), and where MuGCP's forward time goes.

One subprocess per (method variant, classes) so each peak RSS is its own. Training step: forward + loss + backward +
SGD at batch 4; evaluation: no-grad forward of a batch of 16 images (``--eval-batch``; text features cached where the
method allows).

    python bench/mugcp_cost.py                          # 10 and 100 classes, fp32
    python bench/mugcp_cost.py --classes 10 --threads 2

Compare rows as ratios within one run: absolute times depend on the machine (CPU line printed first).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from promptclip.clip.architectures import ARCHITECTURES
from promptclip.clip.model import CLIP
from promptclip.methods import create_method
from promptclip.precision import autocast, cpu_description
from timing import median_time  # bench/timing.py

VARIANTS = {
    "mugcp": ("mugcp", {}),
    "mugcp-late": ("mugcp", {"fusion": "late"}),
    "mugcp-no-mpf": ("mugcp", {"use_mpf": False}),
    "maple": ("maple", {}),
    "cocoop": ("cocoop", {}),
}
CAPTION = "an aerial view of green fields crossed by a straight road, with a few houses and a river on the left"


def classnames(n: int) -> list[str]:
    return [f"land cover type number {i}" for i in range(n)]


class TextCounter:
    def __init__(self, model):
        self.sequences = 0
        model.transformer.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.sequences += args[0].shape[0]


def measure(variant: str, num_classes: int, precision: str, repeats: int, eval_size: int) -> dict:
    name, config = VARIANTS[variant]
    backbone = CLIP(ARCHITECTURES["ViT-B/16"]).eval()  # default init: the weights do not matter for speed
    method = create_method(name, backbone, classnames(num_classes), config, template="a photo of a {}.")
    counter = TextCounter(backbone)
    g = torch.Generator().manual_seed(0)

    def batch_of(n):
        return {"image": torch.randn(n, 3, 224, 224, generator=g), "label": torch.arange(n) % num_classes,
                "caption": [CAPTION] * n}

    train_batch, eval_batch = batch_of(4), batch_of(eval_size)
    optimizer = torch.optim.SGD([p for _, p in method.named_trainable()], lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, "cpu"):
            loss = method.loss(train_batch, method(train_batch))["loss"]
        loss.float().backward()
        optimizer.step()

    method.train()
    counter.sequences = 0
    step()
    train_sequences = counter.sequences
    step_s = median_time(step, repeats)

    def evaluate():
        with torch.no_grad(), autocast(precision, "cpu"):
            method(eval_batch)

    method.eval()
    evaluate()  # fills the class-text cache where the method has one
    counter.sequences = 0
    evaluate()
    eval_sequences = counter.sequences
    eval_s = median_time(evaluate, repeats)
    row = {"variant": variant, "classes": num_classes, "precision": precision, "trainable": method.num_trainable(),
           "train_text_sequences": train_sequences, "eval_text_sequences": eval_sequences,
           "train_step_s": round(step_s, 3), "train_ms_per_image": round(1000 * step_s / 4, 1),
           "eval_images_per_s": round(eval_size / eval_s, 2)}
    if name == "mugcp":
        row.update(breakdown(method, eval_batch, precision, repeats))
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def breakdown(method, batch, precision: str, repeats: int) -> dict:
    """Eval time of MuGCP's stages for one batch: caption encoding + SCP, AMG image pass, text side."""
    images, captions = batch["image"], batch["caption"]
    size = images.shape[0]
    with torch.no_grad(), autocast(precision, "cpu"):
        scp, _ = method.semantic_prompts(captions)
        _, refined, vcps = method.encode_image(images, scp)
        t_scp = median_time(lambda: method.semantic_prompts(captions), repeats)
        t_img = median_time(lambda: method.encode_image(images, scp), repeats)
        if method.instance_text:
            t_txt = median_time(lambda: method.instance_text_features(refined, vcps, size), repeats)
        else:
            t_txt = median_time(method.encode_classes, repeats)
    total = t_scp + t_img + t_txt
    return {"share_captions_scp": round(t_scp / total, 3), "share_image_amg": round(t_img / total, 3),
            "share_text": round(t_txt / total, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--classes", nargs="+", type=int, default=[10, 100])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.precision, args.repeats, args.eval_batch)))
        return

    print(f"CPU: {cpu_description()}")
    print(f"torch {torch.__version__}, {args.threads} threads, {args.precision}, ViT-B/16 random weights, train batch "
          f"4, eval batch {args.eval_batch}, median of {args.repeats} after one warm-up")
    rows = []
    for classes in args.classes:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--one", variant, str(classes), "--precision", args.precision,
                   "--repeats", str(args.repeats), "--threads", str(args.threads), "--eval-batch", str(args.eval_batch)]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    header = ("variant", "classes", "learned", "text seqs / train batch of 4",
              f"text seqs / eval batch of {args.eval_batch}", "train ms / image", "eval images/s", "peak RSS MB")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['variant']} | {r['classes']} | {r['trainable']:,} | {r['train_text_sequences']} | "
              f"{r['eval_text_sequences']} | {r['train_ms_per_image']} | {r['eval_images_per_s']} | "
              f"{r['peak_rss_mb']} |")
    print()
    print("MuGCP eval time by stage (share of captions->SCP / AMG image pass / text side):")
    for r in rows:
        if "share_text" in r:
            print(f"  {r['variant']:13s} {r['classes']:4d} classes: {r['share_captions_scp']:.0%} / "
                  f"{r['share_image_amg']:.0%} / {r['share_text']:.0%}")


if __name__ == "__main__":
    main()
