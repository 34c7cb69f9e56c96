"""Evaluation: top-1 accuracy, macro-F1 and per-class accuracy (Dassl's classification evaluator's numbers)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .precision import autocast


@dataclass
class EvalResult:
    accuracy: float  # percent
    macro_f1: float  # percent
    per_class_accuracy: dict[str, float]
    num_samples: int
    predictions: list[int] = field(default_factory=list, repr=False)
    labels: list[int] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "num_samples": self.num_samples}


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor, classnames: list[str]) -> EvalResult:
    """Accuracy, macro-F1 over the classes present in labels or predictions (as sklearn's default), per class."""
    predictions, labels = predictions.long().cpu(), labels.long().cpu()
    n = len(classnames)
    confusion = torch.zeros(n, n, dtype=torch.long)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    true_pos = confusion.diag().double()
    support = confusion.sum(dim=1).double()
    predicted = confusion.sum(dim=0).double()
    present = (support > 0) | (predicted > 0)
    precision = torch.where(predicted > 0, true_pos / predicted.clamp(min=1), torch.zeros_like(true_pos))
    recall = torch.where(support > 0, true_pos / support.clamp(min=1), torch.zeros_like(true_pos))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(denom))
    macro_f1 = float(f1[present].mean()) * 100 if present.any() else 0.0
    per_class = {classnames[c]: float(recall[c]) * 100 for c in range(n) if support[c] > 0}
    accuracy = float((predictions == labels).double().mean()) * 100 if len(labels) else 0.0
    return EvalResult(accuracy, macro_f1, per_class, len(labels), predictions.tolist(), labels.tolist())


def move_batch(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def predict_logits(method, batches: Iterable[Mapping[str, Any]], device: str | torch.device = "cpu",
                   precision: str = "auto", progress: bool = True, desc: str = "eval"
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits for every batch (and the labels when batches carry them)."""
    method.eval()
    all_logits, all_labels = [], []
    # Advanced by hand: tqdm.auto's bar calls iter() on what it wraps when created (a second loader pass).
    bar = tqdm(total=len(batches) if isinstance(batches, Sized) else None, desc=desc, disable=not progress,
               leave=False, unit="batch")
    for batch in batches:
        batch = move_batch(batch, device)
        with autocast(precision, device):
            logits = method(batch)
        all_logits.append(logits.float().cpu())
        if "label" in batch:
            all_labels.append(batch["label"].cpu())
        bar.update(1)
    bar.close()
    logits = torch.cat(all_logits) if all_logits else torch.zeros(0, method.num_classes)
    labels = torch.cat(all_labels) if all_labels else None
    return logits, labels


def evaluate(method, batches: Iterable[Mapping[str, Any]], device: str | torch.device = "cpu",
             precision: str = "auto", progress: bool = True, desc: str = "eval") -> EvalResult:
    """Evaluate ``method`` on labelled batches over its current class names."""
    logits, labels = predict_logits(method, batches, device, precision, progress, desc)
    if labels is None:
        raise ValueError("evaluate needs batches with a 'label' entry")
    return classification_metrics(logits.argmax(dim=1), labels, list(method.classnames))
