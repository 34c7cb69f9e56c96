"""Break one engine or method detail at a time and show that the trajectory parity checks catch it.

Each mutation is a temporary patch of promptclip (undone afterwards); the replay of the goldens it concerns then runs
the real engine, and the worst error of each quantity is printed as a multiple of its bar (> 1 fails the tests in
tests/test_trajectory.py). The unmutated run is printed first.

    python tools/trajectory_mutations.py
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from parity import run_replay, trajectory_errors  # noqa: E402
from promptclip import train  # noqa: E402
from promptclip.methods.cocoop import CoCoOp  # noqa: E402
from promptclip.methods.promptsrc import PromptSRC  # noqa: E402

COLUMNS = ("lr", "loss", "epoch_params", "final_params", "logits", "frozen")


@contextlib.contextmanager
def patched(owner, name: str, replacement: Callable) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, replacement(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def lr_one_epoch_late(original):
    return lambda epoch, config: original(max(epoch - 1, 0), config)


def momentum_reset_each_epoch(original):
    def run_epoch(method, loader, config, optimizer, *args, **kwargs):
        optimizer.state.clear()
        return original(method, loader, config, optimizer, *args, **kwargs)
    return run_epoch


def decay_without_gradient(original):
    def clip_and_step(method, optimizer, scaler, grad_clip):
        for _, p in method.named_trainable():
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # SGD then applies weight decay (and momentum) to it
        return original(method, optimizer, scaler, grad_clip)
    return clip_and_step


def gpa_off(original):
    return lambda self, *args: None


def context_shared_across_batch(original):
    def image_bias(self, image_features):
        bias = original(self, image_features)
        return bias.mean(dim=0, keepdim=True).expand_as(bias)
    return image_bias


MUTATIONS = [
    ("LR one epoch late", train, "dassl_lr", lr_one_epoch_late, ["coop_ctx16", "maple", "promptsrc"]),
    ("momentum reset at every epoch start", train, "_run_epoch", momentum_reset_each_epoch,
     ["coop_ctx16", "maple", "promptsrc"]),
    ("weight decay on gradient-free tensors", train, "_clip_and_step", decay_without_gradient, ["cmpa"]),
    ("GPA off (no aggregation)", PromptSRC, "on_train_end", gpa_off, ["promptsrc"]),
    ("CoCoOp context shared across the batch", CoCoOp, "image_bias", context_shared_across_batch, ["cocoop"]),
]


def row(label: str, name: str) -> None:
    errors = trajectory_errors(run_replay(name))
    failed = [c for c in COLUMNS if (errors[c] > 0 if c == "frozen" else errors[c] > 1)]
    cells = " | ".join(f"{errors[c]:.3g}" for c in COLUMNS)
    print(f"| {label} | {name} | {cells} | {'FAILS: ' + ', '.join(failed) if failed else 'passes'} |", flush=True)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads. Errors as multiples of their bar "
          "(frozen: max abs change, must be 0).\n")
    print("| mutation | golden | lr | loss | epoch params | final params | eval.logits | frozen moved | verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    names = sorted({n for *_, goldens in MUTATIONS for n in goldens})
    for name in names:
        row("none", name)
    for label, owner, attr, replacement, goldens in MUTATIONS:
        with patched(owner, attr, replacement):
            for name in goldens:
                row(label, name)


if __name__ == "__main__":
    main()
