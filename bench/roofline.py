"""Roofline of the image tower: achieved GFLOP/s against the matmul peak measured in the same process.

    python bench/roofline.py                              # ViT-B/16, batch 16, fp32 and bf16, before vs after
    python bench/roofline.py --batches 8 16 32 --threads 1 2
    python bench/roofline.py --compile                    # adds torch.compile of every block (minutes of compile)

Random weights (speed does not depend on their values); the tower is frozen, as every method holds it.

- **peak**: the best rate of the matmul kernels this torch build has, on the tower's own MLP product
  (``[B*197, 768] x [768, 3072]``) and on 2048^3: fp32 through ``torch.mm`` (the default BLAS, MKL in the official
  wheels) and oneDNN; bf16 through ``torch.mm`` on bf16 tensors (oneDNN).
- **forward**: ``encode_image`` without gradients (evaluation; CoOp/CoCoOp/KgCoOp training).
- **forward + input gradient**: the blocks with a gradient flowing back to their input and no weight gradients:
  what deep-prompt methods (VPT, IVLP, MaPLe, PromptSRC, DCP) pay per training step.
- FLOPs are counted analytically (matmuls, attention, patch convolution; printed next to
  ``torch.utils.flop_counter``'s count of the same forward on PyTorch's reference kernels).
- Variants: ``before`` is the code before the tower's kernel changes (fp32 products through the default BLAS,
  QuickGELU allocating three temporaries), ``after`` the defaults.
- The time breakdown (torch.profiler, ``after``, forward) says where the rest of the gap is.

Compare the variants of one run as ratios; the load average is printed because a shared machine slows every row.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time
from collections import defaultdict

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from promptclip.clip import kernels
from promptclip.clip.architectures import ARCHITECTURES
from promptclip.clip.kernels import cpu_linear
from promptclip.clip.model import CLIP, QuickGELU
from promptclip.precision import autocast, cpu_description
from timing import median_time  # bench/timing.py


def tower_flops(model: CLIP, batch: int) -> tuple[float, float]:
    """(forward, input-gradient backward) FLOPs of the ViT image tower for ``batch`` images, counted by hand."""
    visual = model.visual
    n, w, layers = visual.num_tokens, visual.width, len(visual.blocks)
    linear = 2 * n * w * (3 * w + w + 4 * w + 4 * w)  # qkv, out, c_fc, c_proj
    attention = 2 * 2 * n * n * w  # scores and weighted values, all heads
    patch = 2 * (n - 1) * w * 3 * visual.patch_size**2
    head = 2 * w * visual.output_dim
    forward = batch * (layers * (linear + attention) + patch + head)
    backward = batch * (layers * (linear + 2 * attention) + head)  # dX of every product, no weight gradients
    return float(forward), float(backward)


def linear_flops(model: CLIP, batch: int) -> float:
    """FLOPs of the blocks' linear layers (qkv, out, c_fc, c_proj) in one forward of ``batch`` images."""
    visual = model.visual
    n, w = visual.num_tokens, visual.width
    return float(batch * len(visual.blocks) * 2 * n * w * 12 * w)


def counted_forward_flops(model: CLIP, images: torch.Tensor) -> float:
    """torch.utils.flop_counter on PyTorch's reference kernels (it does not know oneDNN or CPU flash attention)."""
    with cpu_linear("blas"), sdpa_kernel(SDPBackend.MATH), torch.no_grad(), FlopCounterMode(display=False) as count:
        model.encode_image(images)
    return float(count.get_total_flops())


def matmul_peak(batch_rows: int, width: int, repeats: int) -> dict[str, dict[str, float]]:
    """GFLOP/s of each kernel on the tower's MLP product and on 2048^3, best of ``repeats``."""
    shapes = {"mlp": (batch_rows, width, 4 * width), "2048^3": (2048, 2048, 2048)}
    g = torch.Generator().manual_seed(0)
    rates: dict[str, dict[str, float]] = defaultdict(dict)
    with torch.no_grad():
        for label, (m, k, n) in shapes.items():
            x, weight = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
            flops = 2 * m * k * n
            runs = {"fp32 BLAS (torch.mm)": lambda x=x, weight=weight: x @ weight.t()}
            if kernels.onednn_available():
                runs["fp32 oneDNN"] = lambda x=x, weight=weight: torch.ops.mkldnn._linear_pointwise(
                    x, weight, None, "none", [], "")
            xb, wb = x.bfloat16(), weight.bfloat16()
            runs["bf16 (torch.mm)"] = lambda xb=xb, wb=wb: xb @ wb.t()
            for name, fn in runs.items():
                fn()
                best = min(_timed(fn) for _ in range(repeats))
                rates[name][label] = flops / best / 1e9
    return rates


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _allocating_quick_gelu(self, x):
    return x * torch.sigmoid(1.702 * x)


@contextlib.contextmanager
def variant(name: str):
    """``before``: the default BLAS for fp32 products and the allocating QuickGELU (the code before the change)."""
    if name == "after":
        yield
        return
    original = QuickGELU.forward
    QuickGELU.forward = _allocating_quick_gelu  # bench-only: replays the former formula in one process
    try:
        with cpu_linear("blas"):
            yield
    finally:
        QuickGELU.forward = original


def tower_runs(model: CLIP, images: torch.Tensor, precision: str):
    visual = model.visual

    def forward():
        with torch.no_grad(), autocast(precision, "cpu"):
            model.encode_image(images)

    with torch.no_grad(), autocast(precision, "cpu"):
        embedded = visual.embed(images).float()

    def forward_backward():
        x = embedded.detach().requires_grad_(True)
        with autocast(precision, "cpu"):
            out = visual.pool(visual.forward_blocks(x))
        out.float().sum().backward()

    return forward, forward_backward


#: Op family -> (exact op names, substrings of op names).
FAMILIES = {
    "matmul": ({"addmm", "mm", "bmm", "_linear_pointwise", "matmul", "linear"}, ()),
    "attention": (set(), ("scaled_dot_product", "flash_attention")),
    "GELU / elementwise": ({"mul", "mul_", "sigmoid", "sigmoid_", "add", "add_", "div"}, ()),
    "layer norm": (set(), ("layer_norm",)),
    "copies / casts": ({"copy_", "_to_copy", "cat", "clone", "contiguous"}, ()),
    "patch conv": (set(), ("convolution",)),
}


def family_of(op: str) -> str:
    for family, (names, parts) in FAMILIES.items():
        if op in names or any(part in op for part in parts):
            return family
    return "other"


def breakdown(forward) -> dict[str, float]:
    """Share of self CPU time per op family in one forward (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    forward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward()
    shares: dict[str, float] = defaultdict(float)
    total = 0.0
    for event in prof.key_averages():
        self_time = event.self_cpu_time_total
        total += self_time
        shares[family_of(event.key.split("::")[-1])] += self_time
    return {family: 100 * t / total for family, t in shares.items()} if total else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B/16")
    parser.add_argument("--batches", nargs="+", type=int, default=[16])
    parser.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of every block")
    args = parser.parse_args()

    model = CLIP(ARCHITECTURES[args.model]).eval().requires_grad_(False)
    print(f"CPU: {cpu_description()}")
    print(f"torch {torch.__version__}, {args.model} random weights, load average {os.getloadavg()[0]:.2f} at start; "
          f"oneDNN linear available: {kernels.onednn_available()}, default fp32 CPU linear: "
          f"{kernels.resolved_backend()}; median of {args.repeats}")
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 3, model.visual.input_resolution, model.visual.input_resolution, generator=g)
    forward_flops, backward_flops = tower_flops(model, 1)
    print(f"FLOPs per image: forward {forward_flops / 1e9:.2f} G (flop_counter on reference kernels: "
          f"{counted_forward_flops(model, probe) / 2e9:.2f} G), input-gradient backward {backward_flops / 1e9:.2f} G")

    rows, shares, shares_pending, compile_errors = [], {}, {}, {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            images = torch.randn(batch, 3, model.visual.input_resolution, model.visual.input_resolution,
                                 generator=g)
            fwd_flops, bwd_flops = tower_flops(model, batch)
            first_peaks = matmul_peak(batch * model.visual.num_tokens, model.visual.width, args.repeats)
            timings = []
            for precision in args.precisions:
                runs = {"before": tower_runs(model, images, precision), "after": tower_runs(model, images, precision)}
                if args.compile:  # a copy, so that nothing compiled is left in the model the other rows time
                    compiled = copy.deepcopy(model)
                    for block in compiled.visual.blocks:
                        block.compile()
                    runs["after + compile"] = tower_runs(compiled, images, precision)
                    with torch.no_grad(), autocast(precision, "cpu"):
                        eager, fused = model.encode_image(images[:2]), compiled.encode_image(images[:2])
                    compile_errors[precision] = ((fused.float() - eager.float()).abs().max()
                                                 / eager.float().abs().max()).item()
                for name, (forward, forward_backward) in runs.items():
                    with variant("after" if name.startswith("after") else name):
                        t_fwd = median_time(forward, args.repeats)
                        t_bwd = median_time(forward_backward, args.repeats)
                        if name == "after" and threads == args.threads[-1] and batch == args.batches[-1]:
                            shares_pending[(precision, name)] = (breakdown(forward), t_fwd, batch)
                    timings.append((precision, name, t_fwd, t_bwd))
                if args.compile:
                    del compiled, runs
                    torch._dynamo.reset()
            # The peak is measured before and after the tower runs and the better one is kept: on a shared machine
            # a single measurement can land in a busy moment.
            last_peaks = matmul_peak(batch * model.visual.num_tokens, model.visual.width, args.repeats)
            peaks = {k: {shape: max(v[shape], last_peaks[k][shape]) for shape in v} for k, v in first_peaks.items()}
            peak_of = {"fp32": max(max(v.values()) for k, v in peaks.items() if k.startswith("fp32")),
                       "bf16": max(peaks["bf16 (torch.mm)"].values())}
            print(f"\nmatmul peak, {threads} thread(s), GFLOP/s: " + "; ".join(
                f"{name} " + ", ".join(f"{shape} {rate:.0f}" for shape, rate in by_shape.items())
                for name, by_shape in peaks.items()))
            for precision, name, t_fwd, t_bwd in timings:
                rows.append((precision, name, batch, threads, batch / t_fwd, fwd_flops / t_fwd / 1e9,
                             batch / t_bwd, (fwd_flops + bwd_flops) / t_bwd / 1e9, peak_of[precision]))
                if (precision, name) in shares_pending:
                    shares[precision] = (*shares_pending.pop((precision, name)), peak_of[precision])

    print("\n| precision | variant | batch | threads | fwd img/s | fwd GFLOP/s | fwd share of peak | fwd+grad img/s "
          "| fwd+grad GFLOP/s | fwd+grad share | peak GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for precision, name, batch, threads, ips, gf, ips_b, gf_b, peak in rows:
        print(f"| {precision} | {name} | {batch} | {threads} | {ips:.2f} | {gf:.0f} | {100 * gf / peak:.0f}% | "
              f"{ips_b:.2f} | {gf_b:.0f} | {100 * gf_b / peak:.0f}% | {peak:.0f} |")
    by_key = {(p, n, b, t): (ips, ips_b) for p, n, b, t, ips, _, ips_b, _, _ in rows}
    for (precision, name, batch, threads), (ips, ips_b) in by_key.items():
        if name != "before" and (precision, "before", batch, threads) in by_key:
            base, base_b = by_key[(precision, "before", batch, threads)]
            print(f"{precision} batch {batch}, {threads} thread(s): {name} / before = {ips / base:.2f}x forward, "
                  f"{ips_b / base_b:.2f}x forward + input gradient")
    for precision, error in compile_errors.items():
        print(f"{precision}: torch.compile'd tower vs eager, max |difference| / max |feature| = {error:.2e} "
              "(the last batch size)")
    for precision, (family_shares, t_fwd, batch, peak) in shares.items():
        parts = ", ".join(f"{family} {share:.0f}%" for family, share in
                          sorted(family_shares.items(), key=lambda item: -item[1]))
        print(f"{precision} forward time by op family (after, batch {batch}, profiler self time): {parts}")
        matmul_seconds = t_fwd * family_shares.get("matmul", 0.0) / 100
        if matmul_seconds:
            rate = linear_flops(model, batch) / matmul_seconds / 1e9
            print(f"  the linear layers alone run at {rate:.0f} GFLOP/s = {100 * rate / peak:.0f}% of the peak; "
                  f"{100 - family_shares.get('matmul', 0.0):.0f}% of the time is outside them")


if __name__ == "__main__":
    main()
