"""Print the parity tables of docs/parity.md: for every one-step golden in tests/golden/, the largest errors of our
implementation against the reference (eval logits, training loss, gradients) next to the README's tolerance; for
every trajectory golden, the worst error of each quantity of a whole replayed run as a multiple of its bar.

    python tools/parity_table.py                    # both tables
    python tools/parity_table.py trajectory         # the trajectory table only
    python tools/parity_table.py [trajectory] tcp   # only the goldens named
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from parity import (  # noqa: E402
    NOISE_GRADIENT,
    build_method,
    golden_batch,
    load_golden,
    method_for,
    method_golden_names,
    run_replay,
    trajectory_errors,
    trajectory_golden_names,
)

TRAJECTORY_COLUMNS = ("lr", "loss", "epoch_params", "final_params", "logits_init", "logits", "frozen")


def errors(name: str) -> tuple[str, float, float, float, int]:
    golden = load_golden(name)
    method, name_map = build_method(golden)
    method.eval()
    with torch.no_grad():
        logits = method(golden_batch(golden, train=False))
    g = golden.tensors["eval.logits"]
    logit_err = (logits - g).abs().max().item() / max(1.0, g.abs().max().item())
    method.train()
    _, losses = method.training_step(golden_batch(golden, train=True))  # as the tests and fit run a step
    loss = losses["loss"]
    ref_loss = golden.tensors["train.loss"].item()
    loss_err = abs(loss.item() - ref_loss) / max(1.0, abs(ref_loss))
    method.backward(losses, lambda value: value)
    params = dict(method.named_trainable())
    grad_err, checked = 0.0, 0
    largest = max(((g or {}).get("max_abs", 0.0) for g in golden.meta.get("grads", {}).values()), default=0.0)
    for ref, ours in name_map.items():
        if ref in golden.meta["params_without_grad"]:
            continue
        ref_grad = golden.tensors.get(f"grad.{ref}", golden.tensors.get(f"gradrows.{ref}"))
        grad = params[ours].grad
        if grad.shape != ref_grad.shape:  # gradrows: the first rows of reshape(shape[0], -1) of a large tensor
            grad = grad.reshape(grad.shape[0], -1)[: ref_grad.shape[0]] if ref_grad.dim() == 2 else \
                grad[: ref_grad.shape[0]]
        scale = ref_grad.abs().max().item()
        if scale < NOISE_GRADIENT * largest:  # float noise (zero in exact arithmetic): at the step's scale
            scale = largest
        grad_err = max(grad_err, (grad - ref_grad).abs().max().item() / scale)
        checked += 1
    return method_for(golden), logit_err, loss_err, grad_err, checked


def _selected(names: list[str], only: list[str]) -> list[str]:
    return [name for name in names if not only or name in only]


def trajectory_table(only: list[str] = ()) -> None:
    print("| golden | our method | steps | lr | loss and terms | epoch<e> params | final params | eval.logits_init | "
          "eval.logits | gradient-free tensors moved (max abs) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in _selected(trajectory_golden_names(), only):
        replay = run_replay(name)
        errors = trajectory_errors(replay)
        cells = " | ".join(f"{errors[c]:.2g}" for c in TRAJECTORY_COLUMNS[:-1])
        frozen = len(replay.golden.meta["params_without_grad"])
        moved = f"{errors['frozen']:.1g} ({frozen} tensors)" if frozen else "—"
        print(f"| {name} | {method_for(replay.golden)} | {len(replay.steps)} | {cells} | {moved} |")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; each column is the worst error as a "
          "multiple of its bar in tests/golden/TRAJECTORY_README.md (<= 1 passes; parameter movement bars never below "
          "one float32 ulp of the value per optimizer step, docs/parity.md)")


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["trajectory"]:
        trajectory_table(args[1:])
        return
    one_step_table(args)
    print()
    trajectory_table(args)


def one_step_table(only: list[str] = ()) -> None:
    print("| golden | reference trainer | our method | logits err / max(1, max\\|g\\|) | loss err | "
          "max grad err / max\\|g\\| | tensors with gradient checked |")
    print("|---|---|---|---|---|---|---|")
    for name in _selected(method_golden_names(), only):
        golden = load_golden(name)
        method, logit_err, loss_err, grad_err, checked = errors(name)
        print(f"| {name} | {golden.trainer_class} | {method} | {logit_err:.1e} | {loss_err:.1e} | {grad_err:.1e} | "
              f"{checked} |")
    print(f"\ntorch {torch.__version__}; tolerance 1e-4 for every column (tests/golden/README.md)")


if __name__ == "__main__":
    main()
