"""Linear-probe CLIP (CoOp's ``lpclip``, MIT): multinomial logistic regression on the raw frozen image features of
the few-shot training images (no augmentation), with the reference's search over the inverse regularisation C on
the validation split. Needs scikit-learn (``pip install promptclip[sklearn]``).

Fitted by :meth:`fit_features` (:mod:`promptclip.feature_fit`), never by SGD; the learned ``weight``/``bias`` and the
searched C are its adapter. The search (card ``tests/golden/methods/linear_probe.md``):

- sweep C over ``search_list``, scored by val accuracy; the peak is the first maximum;
- ``num_step`` rounds from ``(C_peak/10, 10·C_peak)``: fit both ends, the right wins only if strictly more accurate
  on val; the range halves in log10 space towards the winner; the last round's winner is the classifier.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import ConfigError
from .base import PromptMethod, register
from .tip_adapter import class_ids


@dataclass
class LinearProbeConfig:
    #: The initial sweep of C (``linear_probe.py``'s list).
    search_list: list[float] = field(default_factory=lambda: [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6])
    #: Binary-search rounds after the sweep (``--num_step``; ``linear_probe.sh``: 8).
    num_step: int = 8
    #: LBFGS iterations (sklearn ``max_iter``).
    max_iter: int = 1000

    def __post_init__(self):
        if not self.search_list or any(c <= 0 for c in self.search_list):
            raise ConfigError("linear_probe: search_list needs positive C values")
        if self.num_step < 0 or self.max_iter < 1:
            raise ConfigError("linear_probe: num_step must be >= 0 and max_iter >= 1")


def _logistic_regression(c: float, max_iter: int):
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ConfigError("linear_probe needs scikit-learn: pip install 'promptclip[sklearn]'") from None
    return LogisticRegression(solver="lbfgs", max_iter=max_iter, penalty="l2", C=c)


def _accuracy(clf, x: np.ndarray, y: np.ndarray) -> float:
    return int(np.sum(clf.predict(x) == y)) / len(y)


def pow10(x: float) -> float:
    """``10 ** x`` through numpy's ``power``, as the reference (it rounds differently from Python's ``**``: e.g.
    ``9.999999999999999e-06`` for ``x = -5``)."""
    return np.power(10.0, x)


def search_c(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], search_list: list[float],
             num_step: int, max_iter: int = 1000, test: tuple[np.ndarray, np.ndarray] | None = None
             ) -> dict[str, Any]:
    """The reference's C search. Returns the final classifier (``clf``), ``final_C``, ``init_val_acc``,
    ``peak_idx`` and per round ``c_left``, ``c_right``, ``val_acc_left``, ``val_acc_right``, ``c_final`` (and
    ``test_acc`` of the round's winner when ``test`` is given: the reference prints it; nothing selects on it)."""
    x, y = train
    xv, yv = val

    def fit(c):
        return _logistic_regression(c, max_iter).fit(x, y)

    init = []
    clf = None
    for c in search_list:
        clf = fit(c)
        init.append(_accuracy(clf, xv, yv))
    peak = int(np.argmax(init))
    c_peak = search_list[peak]
    c_left, c_right = 1e-1 * c_peak, 1e1 * c_peak
    c_final = c_peak
    if num_step == 0:
        clf = fit(c_peak)
    steps = []
    for _ in range(num_step):
        left, right = fit(c_left), fit(c_right)
        acc_left, acc_right = _accuracy(left, xv, yv), _accuracy(right, xv, yv)
        step = {"c_left": float(c_left), "c_right": float(c_right), "val_acc_left": acc_left,
                "val_acc_right": acc_right}
        if acc_left < acc_right:
            c_final, clf = c_right, right
            c_left = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_right = np.log10(c_right)
        else:
            c_final, clf = c_left, left
            c_right = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_left = np.log10(c_left)
        step["c_final"] = float(c_final)
        if test is not None:
            step["test_acc"] = 100 * int(np.sum(clf.predict(test[0]) == test[1])) / len(test[1])
        steps.append(step)
        c_left, c_right = pow10(c_left), pow10(c_right)
    return {"clf": clf, "final_C": float(c_final), "init_val_acc": init, "peak_idx": peak, "steps": steps}


def lpclip_fewshot(labels: np.ndarray, shots: int, rng: np.random.RandomState) -> list[int]:
    """The reference's few-shot draw: per sorted label, ``choice(indices of that label, shots, replace=False)``."""
    out: list[int] = []
    for label in np.unique(labels):
        out.extend(int(i) for i in rng.choice(np.where(labels == label)[0], shots, replace=False))
    return out


@register
class LinearProbe(PromptMethod):
    """Logistic regression on frozen image features; C searched on val (CoOp's ``lpclip``)."""

    name = "linear_probe"
    config_class = LinearProbeConfig
    frozen_image_features = True
    follows_text_memory = False  # no text tower at all
    names_in_text = False
    protocols: ClassVar[tuple[str, ...] | None] = ("fewshot",)
    not_applicable_reason: ClassVar[str] = "the probe has one output per training class and no text side"
    fits_on_features = True

    def __init__(self, backbone, config: LinearProbeConfig, classnames, template=None):
        super().__init__(backbone, config, classnames, template)
        dim = backbone.config.embed_dim
        self.register_buffer("weight", torch.zeros(len(classnames), dim, dtype=torch.float64))
        self.register_buffer("bias", torch.zeros(len(classnames), dtype=torch.float64))
        self.register_buffer("C", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("class_ids", torch.tensor(class_ids(classnames), dtype=torch.long))
        self.set_classnames(classnames, template)

    def class_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``weight``/``bias`` rows of the current classes, found by name; a class the probe was not fitted on
        gets a zero row (logit 0: the probe knows nothing of it)."""
        ids, fitted = class_ids(self.classnames), self.class_ids.tolist()
        if ids == fitted:
            return self.weight, self.bias
        row = {c: i for i, c in enumerate(fitted)}
        weight = self.weight.new_zeros(len(ids), self.weight.shape[1])
        bias = self.bias.new_zeros(len(ids))
        for j, c in enumerate(ids):
            if c in row:
                weight[j], bias[j] = self.weight[row[c]], self.bias[row[c]]
        return weight, bias

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        features = self.image_features_of(batch).double()  # raw, unnormalised features, as the reference
        weight, bias = self.class_rows()
        return (features @ weight.t() + bias).float()

    def fit_features(self, data) -> dict[str, Any]:
        x, y = data.split("train")
        xv, yv = data.split("val")
        config = self.config
        found = search_c((x.double().numpy(), y.numpy()), (xv.double().numpy(), yv.numpy()),
                         list(config.search_list), config.num_step, config.max_iter)
        clf = found.pop("clf")
        coef = torch.as_tensor(clf.coef_, dtype=torch.float64)
        intercept = torch.as_tensor(clf.intercept_, dtype=torch.float64)
        if coef.shape[0] == 1 and self.num_classes == 2:  # sklearn's binary layout: one row for class 1
            coef, intercept = torch.cat([torch.zeros_like(coef), coef]), torch.cat([torch.zeros(1), intercept])
        self.weight = coef.to(self.device)
        self.bias = intercept.to(self.device)
        self.C = torch.tensor(found["final_C"], dtype=torch.float64, device=self.device)
        self.class_ids = torch.tensor(class_ids(self.classnames), dtype=torch.long, device=self.device)
        summary = {"search": {"split": "val", **found}, "C": found["final_C"]}
        self.last_search = {**found, "clf": clf}
        return summary

    def trainable_buffers(self):
        return ((n, getattr(self, n)) for n in ("weight", "bias", "C", "class_ids"))

    def load_adapter_state(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        for name in ("weight", "bias", "class_ids"):
            if name in state:
                setattr(self, name, state[name].to(self.device).clone())
        super().load_adapter_state(state, strict)

    @classmethod
    def config_from_reference(cls, trainer: Mapping[str, Any]) -> LinearProbeConfig:
        """From ``linear_probe.py``'s arguments (``num_step``; ``search_list`` where given)."""
        from .base import reference_options

        options = reference_options(trainer, {"num_step", "num_run", "search_list", "dataset", "feature_dir"},
                                    cls.name)
        config = LinearProbeConfig(num_step=int(options.get("num_step", 8)))
        if "search_list" in options:
            config.search_list = [float(c) for c in options["search_list"]]
        return config
