"""PNG plots of the protocol tables. matplotlib is optional (the ``plot`` extra) and imported only when plotting.

Every plot function takes what it draws, the output folder and the ``(Figure, FigureCanvasAgg)`` pair from
:func:`load_matplotlib`, draws on its own :class:`~matplotlib.figure.Figure` (no pyplot, no global state), writes
through :func:`save_png` (which adds the random-weights banner when asked) and returns the written paths.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import PromptClipError
from .curves import CurveGroup
from .formatting import RANDOM_WEIGHTS_BANNER, n_datasets
from .order import dataset_sort_key
from .stats import is_nan
from .tables import B2NTable, FewShotTable

PLOT_INSTALL_HINT = 'pip install "promptclip[plot]"'


def load_matplotlib():
    """(Figure, FigureCanvasAgg), imported lazily. Uses the Agg canvas directly: no pyplot, no global backend."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PromptClipError(
            f"plots need matplotlib, which is not installed: {PLOT_INSTALL_HINT} (or turn plots off: "
            "write_report(..., plots=False) / --no-plots)"
        ) from e
    return Figure, FigureCanvasAgg


def safe_name(name: str) -> str:
    """``name`` usable in a file name (runs of other characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def save_png(fig, canvas_cls, path: Path, random_weights: bool) -> Path:
    """Render ``fig`` on ``canvas_cls`` into ``path`` (PNG, 100 dpi), with the random-weights banner if asked."""
    if random_weights:
        fig.text(0.5, 0.005, f"WARNING: {RANDOM_WEIGHTS_BANNER}", ha="center", va="bottom", color="red",
                 fontsize=9, fontweight="bold")
    canvas_cls(fig)
    fig.savefig(path, format="png", dpi=100)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Protocol tables


def _fewshot_axes(ax, series: dict[str, list[tuple[int, float, float]]], title: str) -> None:
    all_k: set[int] = set()
    for label, points in series.items():
        points = sorted(points)
        ks = [p[0] for p in points]
        all_k.update(ks)
        means = [p[1] for p in points]
        errs = [p[2] for p in points]  # nan (one seed) draws no error bar
        has_err = any(not is_nan(e) for e in errs)
        ax.errorbar(ks, means, yerr=errs if has_err else None, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ticks = sorted(all_k)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(k) for k in ticks])
    ax.minorticks_off()
    ax.set_xlabel("shots per class K (log2 scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def fewshot_plots(table: FewShotTable, out_dir: Path, figure_cls, canvas_cls) -> list[Path]:
    paths = []
    series: dict[str, list] = {}
    counts = {len(a.datasets) for a in table.averages}
    for a in table.averages:
        name = a.label + (f" ({n_datasets(len(a.datasets))})"
                          if len(counts) > 1 else "")
        series.setdefault(name, []).append((a.shots, a.accuracy.mean, a.accuracy.std))
    fig = figure_cls(figsize=(6.4, 4.4))
    over = f"{counts.pop()} dataset(s)" if len(counts) == 1 else "datasets (count in the legend)"
    _fewshot_axes(fig.add_subplot(1, 1, 1), series, f"Few-shot accuracy, average over {over}")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    paths.append(save_png(fig, canvas_cls, out_dir / "fewshot_average.png",
                          any(a.random_weights for a in table.averages)))
    for dataset in sorted({r.dataset for r in table.rows}, key=dataset_sort_key):
        series = {}
        rows = [r for r in table.rows if r.dataset == dataset]
        for r in rows:
            series.setdefault(r.label, []).append((r.shots, r.accuracy.mean, r.accuracy.std))
        fig = figure_cls(figsize=(6.4, 4.4))
        _fewshot_axes(fig.add_subplot(1, 1, 1), series, f"Few-shot accuracy: {dataset} (mean ± std over seeds)")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        paths.append(save_png(fig, canvas_cls, out_dir / f"fewshot_{safe_name(dataset)}.png",
                              any(r.random_weights for r in rows)))
    return paths


def _bars(ax, groups: list[tuple[str, float, float, float, float, float]], title: str, values: bool = False) -> None:
    """Grouped Base / Novel / HM bars; each group = (label, base, base_std, novel, novel_std, hm)."""
    width = 0.26
    xs = list(range(len(groups)))
    specs = (("Base", 1, 2, "#4C72B0"), ("Novel", 3, 4, "#DD8452"), ("HM", 5, None, "#55A868"))
    for j, (name, vi, si, color) in enumerate(specs):
        heights = [g[vi] for g in groups]
        errs = [math.nan if si is None else g[si] for g in groups]  # nan (one seed) draws no error bar
        has_err = any(not is_nan(e) for e in errs)
        bars = ax.bar([x + (j - 1) * width for x in xs], heights, width, yerr=errs if has_err else None,
                      capsize=2, label=name, color=color)
        if values:
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([g[0] for g in groups], rotation=20 if len(groups) > 3 else 0, ha="right"
                       if len(groups) > 3 else "center", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)


def b2n_plots(table: B2NTable, out_dir: Path, figure_cls, canvas_cls) -> list[Path]:
    paths = []
    several_k = len({a.shots for a in table.averages}) > 1
    counts = {len(a.datasets) for a in table.averages}
    groups = [(a.label + (f" K={a.shots}" if several_k else "") + (f"\n({n_datasets(len(a.datasets))})"
                                                                     if len(counts) > 1 else ""),
               a.base.mean, a.base.std, a.novel.mean, a.novel.std, a.hm) for a in table.averages]
    fig = figure_cls(figsize=(max(6.4, 1.3 * len(groups) + 2), 4.4))
    over = f"{counts.pop()} dataset(s)" if len(counts) == 1 else "each method's datasets"
    _bars(fig.add_subplot(1, 1, 1), groups, f"Base-to-novel, average over {over} (HM of the averages)", values=True)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    paths.append(save_png(fig, canvas_cls, out_dir / "base2novel_average.png",
                          any(a.random_weights for a in table.averages)))

    datasets = sorted({r.dataset for r in table.rows}, key=dataset_sort_key)
    ncols = min(3, len(datasets))
    nrows = math.ceil(len(datasets) / ncols)
    fig = figure_cls(figsize=(4.6 * ncols, 3.6 * nrows + 0.3))
    for i, dataset in enumerate(datasets):
        rows = [r for r in table.rows if r.dataset == dataset]
        groups = [(r.label + (f" K={r.shots}" if len({x.shots for x in rows}) > 1 else ""), r.base.mean, r.base.std,
                   r.novel.mean, r.novel.std, r.hm) for r in rows]
        _bars(fig.add_subplot(nrows, ncols, i + 1), groups, dataset)
    fig.suptitle("Base-to-novel per dataset (mean ± std over seeds; HM of the means)")
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    paths.append(save_png(fig, canvas_cls, out_dir / "base2novel_per_dataset.png",
                          any(r.random_weights for r in table.rows)))
    return paths


# --------------------------------------------------------------------------------------------------------------------
# Training curves


def curve_plots(groups: list[CurveGroup], out_dir: Path, figure_cls, canvas_cls) -> list[Path]:
    """One PNG per run group (``curves_<protocol>_<dataset>_<method>.png``): training loss and learning rate per
    step, training accuracy per epoch; one line per shots × seed."""
    paths = []
    for group in groups:
        fig = figure_cls(figsize=(13.5, 3.8))
        loss_ax, acc_ax, lr_ax = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
        for series in group.series:
            steps = [s["step"] for s in series.steps]
            loss_ax.plot(steps, [s["loss"] for s in series.steps], linewidth=1, label=series.label)
            lr_ax.plot(steps, [s["lr"] for s in series.steps], linewidth=1, label=series.label)
            acc_ax.plot([e["epoch"] for e in series.epochs], [e["train_acc"] for e in series.epochs], marker="o",
                        markersize=3, label=series.label)
        for ax, title, xlabel in ((loss_ax, "training loss", "step"), (acc_ax, "training accuracy (%)", "epoch"),
                                  (lr_ax, "learning rate", "step")):
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(xlabel)
            ax.grid(True, alpha=0.3)
        loss_ax.legend(fontsize=7, loc="best")
        fig.suptitle(f"Training curves: {group.title}")
        fig.tight_layout(rect=(0, 0.03, 1, 0.95))
        name = f"curves_{safe_name(group.protocol)}_{safe_name(group.dataset)}_{safe_name(group.label)}.png"
        paths.append(save_png(fig, canvas_cls, out_dir / name, group.random_weights))
    return paths
