"""``write_report``: the whole report folder (markdown, CSVs, plots) from a list of records."""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike
from pathlib import Path

from ..errors import PromptClipError
from .csv_files import b2n_csv, fewshot_csv, transfer_csv
from .curves import training_curves
from .markdown import (
    PublishedLog,
    b2n_markdown,
    fewshot_markdown,
    footer_markdown,
    header_markdown,
    not_applicable_markdown,
    transfer_markdown,
)
from .plots import b2n_plots, curve_plots, fewshot_plots, load_matplotlib
from .records import PROTOCOLS, not_applicable, validate_record
from .tables import base2novel_table, cross_dataset_table, dg_table, fewshot_table


def write_report(records: Iterable[dict], out_dir: str | PathLike, plots: bool = True,
                 records_dir: str | PathLike | None = None) -> list[Path]:
    """Write ``report.md``, one CSV per protocol present and (``plots=True``) PNG plots into ``out_dir``.

    Returns the written paths: ``report.md`` first, then the CSVs (``base2novel.csv``, ``fewshot.csv``,
    ``cross_dataset.csv``, ``domain_generalization.csv``), then the PNGs (``base2novel_average.png``,
    ``base2novel_per_dataset.png``, ``fewshot_average.png``, ``fewshot_<dataset>.png``, and one
    ``curves_<protocol>_<dataset>_<method>.png`` per group of trained runs whose ``metrics.jsonl`` is found: in the
    recorded run directory or, for a moved output, under ``records_dir``). With ``plots=True`` and matplotlib
    missing, raises :class:`PromptClipError` before writing anything.
    """
    records = list(records)
    if not records:
        raise PromptClipError("no records to report")
    for i, r in enumerate(records):
        validate_record(r, f"record {i}")
    skipped = [r for r in records if not_applicable(r)]
    records = [r for r in records if not not_applicable(r)]
    figure_cls = canvas_cls = None
    if plots:
        figure_cls, canvas_cls = load_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    protocols = [p for p in PROTOCOLS if any(r["protocol"] == p for r in records)]
    md = header_markdown(records, protocols)

    log = PublishedLog()
    csvs: list[Path] = []
    pngs: list[Path] = []
    notes: list[str] = []
    if "base2novel" in protocols:
        table = base2novel_table(records)
        md += b2n_markdown(table, log)
        csvs.append(b2n_csv(table, out / "base2novel.csv"))
        notes += table.notes
        if plots and table.rows:
            pngs += b2n_plots(table, out, figure_cls, canvas_cls)
    if "fewshot" in protocols:
        fs = fewshot_table(records)
        md += fewshot_markdown(fs)
        csvs.append(fewshot_csv(fs, out / "fewshot.csv"))
        notes += fs.notes
        if plots and fs.rows:
            pngs += fewshot_plots(fs, out, figure_cls, canvas_cls)
    for protocol, title, fn in (("cross_dataset", "Cross-dataset transfer", cross_dataset_table),
                                ("domain_generalization", "Domain generalisation", dg_table)):
        if protocol in protocols:
            tt = fn(records)
            md += transfer_markdown(tt, log, title)
            csvs.append(transfer_csv(tt, out / f"{protocol}.csv"))
            notes += tt.notes
    md += not_applicable_markdown(skipped)
    if plots:
        pngs += curve_plots(training_curves(records, records_dir), out, figure_cls, canvas_cls)
    md += footer_markdown(notes, log)
    report = out / "report.md"
    report.write_text("\n".join(md), encoding="utf-8")
    return [report, *csvs, *pngs]
