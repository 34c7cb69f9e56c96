#!/usr/bin/env python
"""Build the bundled EuroSAT sample (src/promptclip/data/sample/eurosat/) from the full EuroSAT RGB tar.

    python tools/make_eurosat_sample.py --tar /path/to/eurosat_rgb.tar

The tar must hold CoOp's layout ``eurosat/2750/<Class>/<Class>_<n>.jpg``. Steps:

1. generate the full-EuroSAT split exactly as ``load_splits("eurosat", root)`` / ``prepare`` would from the
   extracted folder (CoOp's per-class 50/20/30 procedure, file names sorted, ``random.Random(split_seed)``,
   class names renamed);
2. draw ``train``/``val``/``test`` images per class from that split with ``random.Random(sample_seed)`` (per split,
   classes in label order, ``rng.sample``), keeping the full split's order;
3. copy the chosen JPEGs byte for byte from the tar, write ``split_zhou_EuroSAT.json`` and ``README.md``.

Re-running with the same arguments reproduces the sample exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from promptclip.data.protocol import split_by_class, write_split  # noqa: E402
from promptclip.data.specs import EUROSAT_RENAMES  # noqa: E402

PREFIX = "eurosat/2750/"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tar", required=True, help="EuroSAT RGB tar in CoOp layout (eurosat/2750/<Class>/*.jpg)")
    ap.add_argument("--out", default=str(REPO / "src/promptclip/data/sample/eurosat"), help="output folder")
    ap.add_argument("--split-seed", type=int, default=1, help="seed of the full-EuroSAT split (default 1, as prepare)")
    ap.add_argument("--sample-seed", type=int, default=1, help="seed of the per-class sample draw")
    ap.add_argument("--train", type=int, default=16)
    ap.add_argument("--val", type=int, default=4)
    ap.add_argument("--test", type=int, default=30)
    args = ap.parse_args(argv)

    tar_path = Path(args.tar)
    with tarfile.open(tar_path) as tf:
        members = {m.name: m for m in tf.getmembers() if m.isfile() and m.name.startswith(PREFIX)}
        listing: dict[str, list[str]] = {}
        for name in members:
            rest = name[len(PREFIX):]
            if rest.count("/") == 1 and rest.lower().endswith(".jpg"):
                folder, fname = rest.split("/")
                listing.setdefault(folder, []).append(fname)
        total = sum(len(v) for v in listing.values())
        print(f"{tar_path}: {len(listing)} classes, {total} images")

        full = split_by_class(listing, random.Random(args.split_seed), "/virtual/eurosat/2750",
                              renames=EUROSAT_RENAMES, source="EuroSAT tar")
        with tempfile.TemporaryDirectory() as tmp:
            full_json = write_split(Path(tmp) / "full.json", *full)
            full_sha = hashlib.sha256(full_json.read_bytes()).hexdigest()
        print(f"full split: train {len(full[0])}, val {len(full[1])}, test {len(full[2])}; sha256 {full_sha}")

        rng = random.Random(args.sample_seed)
        chosen = []
        for part, k in zip(full, (args.train, args.val, args.test), strict=True):
            by_label: dict[int, list] = {}
            for r in part:
                by_label.setdefault(r.label, []).append(r)
            picked = set()
            for label in sorted(by_label):
                picked.update(r.relpath for r in rng.sample(by_label[label], k))
            chosen.append([r for r in part if r.relpath in picked])

        out = Path(args.out)
        if (out / "2750").exists():
            shutil.rmtree(out / "2750")
        size = 0
        for part in chosen:
            for r in part:
                data = tf.extractfile(members[PREFIX + r.relpath]).read()
                dest = out / "2750" / r.relpath
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
                size += len(data)
    split_path = write_split(out / "split_zhou_EuroSAT.json", *chosen)
    counts = [len(p) for p in chosen]
    print(f"sample: train {counts[0]}, val {counts[1]}, test {counts[2]}; {sum(counts)} JPEGs, {size:,} bytes")
    print(f"wrote {split_path}")
    (out / "README.md").write_text(_readme(args, total, full_sha, counts, size, len(listing)), encoding="utf-8")
    return 0


def _readme(args: argparse.Namespace, total: int, full_sha: str, counts: list[int], size: int, n_cls: int) -> str:
    classes = "\n".join(f"| `{k}` | {v} |" for k, v in EUROSAT_RENAMES.items())
    return f"""# Bundled EuroSAT sample

A small real-image subset of **EuroSAT (RGB)** shipped inside promptclip so that the demo and real-image tests work
without any download. Load it with `promptclip.data.load_splits("eurosat-sample")`.

## Source and licence

- EuroSAT: Patrick Helber, Benjamin Bischke, Andreas Dengel, Damian Borth. "EuroSAT: A Novel Dataset and Deep Learning
  Benchmark for Land Use and Land Cover Classification", IEEE Journal of Selected Topics in Applied Earth Observations
  and Remote Sensing, 2019 (and IGARSS 2018). https://github.com/phelber/eurosat
- Licence: MIT (as published by the authors in the EuroSAT repository). Imagery: Copernicus Sentinel-2 data.
- The images are copied byte for byte (64x64 RGB JPEG) from the full EuroSAT RGB release in CoOp's layout
  `eurosat/2750/<Class>/<Class>_<n>.jpg` ({total:,} images, {n_cls} classes).

## How it was sampled

Command (from the repository root):

    python tools/make_eurosat_sample.py --tar eurosat_rgb.tar --split-seed {args.split_seed} \\
        --sample-seed {args.sample_seed} --train {args.train} --val {args.val} --test {args.test}

1. The full split was generated with CoOp's procedure (`DescribableTextures.read_and_split_data`): classes in sorted
   folder order, file names sorted, then per class shuffled with `random.Random({args.split_seed})` and split
   50/20/30 → 13,500 / 5,400 / 8,100. This is the split `promptclip.data.prepare("eurosat", root)` writes for the full
   dataset, sha256 of that JSON:
   `{full_sha}`.
   It is not CoOp's published `split_zhou_EuroSAT.json`, which was not available.
2. From it, `random.Random({args.sample_seed})` drew, split by split (train, val, test) and class by class in
   label order, {args.train} train, {args.val} val and {args.test} test images per class (`rng.sample`); the kept
   images stay in the full split's order.

Result: {counts[0]} train / {counts[1]} val / {counts[2]} test = {sum(counts)} JPEGs, {size:,} bytes of images.
`split_zhou_EuroSAT.json` uses CoOp's format (`[relpath, label, classname]`, relpaths relative to `2750/`).

## Class names (folder → CoOp class name)

| Folder | Class name |
|---|---|
{classes}
"""


if __name__ == "__main__":
    raise SystemExit(main())
