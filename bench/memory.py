"""Peak memory and time of one training step: CoOp, MaPLe and CoCoOp on ViT-B/16 (random weights), for growing
class counts, with the text tower plain (``text_memory="off"``) or chunked and checkpointed (``"always"``, the same
chunks that the default ``"auto"`` uses above 1024 sequences x tokens; promptclip.memory).

Each configuration runs in its own subprocess, so that its peak RSS (``ru_maxrss``) is its own; the table reports
the RSS before the step (model and method built), the peak during the step(s) and their difference, plus CUDA's
max allocated memory when the device is a GPU. The memory growth per class is the slope of the step memory between
consecutive class counts. ImageNet class names (the first C) give realistic prompt lengths.

    python bench/memory.py                                   # 10 100 1000 classes, batch 32 (CoCoOp: 1)
    python bench/memory.py --classes 10 100 --batch 4 --methods coop
    python bench/memory.py --device cuda

CoOp and MaPLe encode C prompts per step whatever the batch; CoCoOp encodes B x C (its official batch is 1).
The image batch only adds a constant to CoOp/MaPLe's step memory, not to the growth per class.
``--max-gb`` caps each child's address space (CPU): a configuration that needs more reports "over".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MODES = {"plain": "off", "chunked": "always"}
#: MB per class below which a slope is RSS noise (allocator reuse, or another phase of the step setting the peak).
NOISE = 0.05


def classnames(count: int) -> list[str]:
    import promptclip

    path = Path(promptclip.__file__).parent / "data" / "assets" / "imagenet_classnames.txt"
    names = [line.split(" ", 1)[1].strip() for line in path.read_text().splitlines() if line.strip()]
    if count > len(names):
        names = [f"{names[i % len(names)]} {i // len(names)}" for i in range(count)]
    return names[:count]


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> dict:
    from promptclip.clip.architectures import ARCHITECTURES
    from promptclip.clip.model import CLIP
    from promptclip.memory import plan_text_pass, text_memory
    from promptclip.methods import create_method
    from promptclip.precision import autocast

    if args.max_gb and args.device == "cpu":
        limit = int(args.max_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.manual_seed(0)
    device = torch.device(args.device)
    backbone = CLIP(ARCHITECTURES["ViT-B/16"]).to(device)  # random init, no weight recipe (faster)
    method = create_method(args.method, backbone, classnames(args.classes)).to(device)
    method.train()
    optimizer = torch.optim.SGD([p for _, p in method.named_trainable()], lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(args.batch, 3, 224, 224, generator=g).to(device),
             "label": (torch.arange(args.batch) % args.classes).to(device)}
    sequences = args.classes * (args.batch if args.method == "cocoop" else 1)
    tokens = int(method.eot.max()) + 1
    with text_memory(MODES[args.mode]):
        plan = plan_text_pass(sequences, tokens, getattr(method.config, "text_chunk_size", None), needs_grad=True)
    before = rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    times = []
    try:
        for _ in range(args.steps):
            start = time.perf_counter()
            with text_memory(MODES[args.mode]), autocast(args.precision, device):
                logits = method(batch)
                loss = method.loss(batch, logits)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            del logits, loss
    except (MemoryError, RuntimeError) as err:
        if "memory" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        return {"over": True, "error": str(err).splitlines()[0][:120]}
    row = {"sequences": sequences, "tokens": tokens, "chunk": plan.chunk, "checkpoint": plan.checkpoint,
           "rss_before_mb": round(before, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "step_s": round(statistics.median(times[1:] if len(times) > 1 else times), 2)}
    row["step_mb"] = round(row["peak_rss_mb"] - row["rss_before_mb"], 1)
    if device.type == "cuda":
        row["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        row["cuda_step_mb"] = round((torch.cuda.max_memory_allocated() - cuda_before) / 2**20, 1)
    return row


def run_config(args, method: str, classes: int, batch: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--method", method, "--classes", str(classes), "--batch", str(batch),
           "--mode", mode, "--steps", str(args.steps), "--precision", args.precision, "--device", args.device,
           "--threads", str(args.threads), "--max-gb", str(args.max_gb)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    row = {"method": method, "classes": classes, "batch": batch, "mode": mode}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["killed"])[-1]
        row.update(over=True, error=f"exit {done.returncode}: {tail[:120]}")
        return row
    row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return row


def growth(rows: list[dict]) -> list[str]:
    """Step-memory slope (MB per class) between consecutive class counts, plain vs chunked."""
    lines = []
    keys = sorted({(r["method"], r["batch"]) for r in rows})
    for method, batch in keys:
        table = {(r["mode"], r["classes"]): r for r in rows if r["method"] == method and r["batch"] == batch}
        counts = sorted({c for _, c in table})
        for lo, hi in zip(counts, counts[1:], strict=False):
            slopes = {}
            for mode in MODES:
                a, b = table.get((mode, lo)), table.get((mode, hi))
                if a and b and not a.get("over") and not b.get("over"):
                    field = "cuda_step_mb" if "cuda_step_mb" in a else "step_mb"
                    slopes[mode] = (b[field] - a[field]) / (hi - lo)
            if len(slopes) == 2:
                plain, chunked = slopes["plain"], slopes["chunked"]
                if plain < NOISE:
                    shown, ratio = f"{chunked:.2f}", "- (no growth above noise)"
                elif chunked < NOISE:
                    shown, ratio = f"< {NOISE} ({chunked:+.3f})", f"> {plain / NOISE:.0f}x"
                else:
                    shown, ratio = f"{chunked:.2f}", f"{plain / chunked:.1f}x"
                lines.append(f"| {method} | {batch} | {lo} -> {hi} | {plain:.2f} | {shown} | {ratio} |")
            elif slopes:
                shown = ", ".join(f"{m} {v:.2f}" for m, v in slopes.items())
                lines.append(f"| {method} | {batch} | {lo} -> {hi} | {shown} (other mode over the limit) | | |")
    return lines


def print_growth(rows: list[dict]) -> None:
    lines = growth(rows)
    if lines:
        print("\nStep-memory growth per class (MB/class):\n")
        print("| method | batch | classes | plain | chunked + checkpointed | plain / chunked |")
        print("|---|---|---|---|---|---|")
        print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["coop", "maple", "cocoop"])
    parser.add_argument("--classes", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--batch", type=int, default=32, help="image batch of CoOp and MaPLe (default 32)")
    parser.add_argument("--cocoop-batch", type=int, default=1, help="CoCoOp's batch (official: 1)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--steps", type=int, default=1, help="steps per configuration (time: median after the first)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--max-gb", type=float, default=0, help="address-space cap per configuration (CPU), 0: none")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--from-json", help="print the growth table of rows saved with --json, run nothing")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        args.classes = args.classes[0]
        print(json.dumps(child(args)))
        return
    if args.from_json:
        print_growth(json.loads(Path(args.from_json).read_text()))
        return

    from promptclip.precision import cpu_description

    print(f"CPU: {cpu_description()}")
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "none"
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device} (GPU: {gpu}), precision "
          f"{args.precision}, {args.steps} step(s) per configuration")
    rows = []
    header = ("method", "classes", "batch", "mode", "text sequences", "tokens", "chunk", "RSS before MB",
              "peak RSS MB", "step MB", "step s") + (("CUDA max alloc MB",) if args.device.startswith("cuda") else ())
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    for method in args.methods:
        batch = args.cocoop_batch if method == "cocoop" else args.batch
        for classes in args.classes:
            for mode in args.modes:
                row = run_config(args, method, classes, batch, mode)
                rows.append(row)
                if row.get("over"):
                    print(f"| {method} | {classes} | {batch} | {mode} | over: {row['error']} |", flush=True)
                    continue
                cells = [method, classes, batch, mode, row["sequences"], row["tokens"], row["chunk"] or "all",
                         row["rss_before_mb"], row["peak_rss_mb"], row["step_mb"], row["step_s"]]
                if "cuda_max_allocated_mb" in row:
                    cells.append(row["cuda_max_allocated_mb"])
                print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    print_growth(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
