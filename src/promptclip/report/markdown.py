"""``report.md``: the header notes, one section per protocol table, the notes, the published sources."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from ..published import DG_TARGETS, STANDARD_DATASETS, PublishedValue, canonical_dataset, published, published_all
from .formatting import (
    AVERAGE,
    AVG_TARGETS,
    RANDOM_WEIGHTS_BANNER,
    STD_CONVENTION,
    n_datasets,
    num,
    pm,
    seed_counts_text,
)
from .order import dataset_sort_key, method_sort_key
from .records import PROTOCOLS, UNLABELED_NOVEL_MARK
from .tables import B2NTable, FewShotAverage, FewShotRow, FewShotTable, TransferTable

_SAMPLE_NOTE = (
    "eurosat-sample is the bundled 500-image EuroSAT sample (30 test images per class): its published comparison is "
    "the full EuroSAT number and is not a like-for-like comparison."
)


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines


def header_markdown(records: Sequence[dict], protocols: Sequence[str]) -> list[str]:
    """The title and the notes about all records: random weights, backbones, the bundled sample."""
    n_random = sum(1 for r in records if r.get("random_weights") is True)
    md = ["# promptclip results report", ""]
    if n_random:
        md += [f"> **WARNING: {RANDOM_WEIGHTS_BANNER}.** {n_random} of {len(records)} records were produced "
               "with random backbone weights (`random_weights: true`): their accuracies say nothing about the "
               "methods.", ""]
    backbones = sorted({str(r.get("backbone", "?")) for r in records})
    md += [f"Built from {len(records)} records (protocols: {', '.join(protocols)}; backbone(s): "
           f"{', '.join(backbones)}). Accuracies in %, mean over seeds ± sample std (ddof = 1).", ""]
    other = [b for b in backbones if re.sub(r"[^a-z0-9]", "", b.lower()) != "vitb16"]
    if other:
        md += [f"> Note: published numbers are for ViT-B/16; these records also use {', '.join(other)}, so the "
               "published columns are not a like-for-like comparison for those rows.", ""]
    n_unlabeled = sum(1 for r in records if r.get("unlabeled_novel_images") is True)
    if n_unlabeled:
        md += [f"> Note: rows marked {UNLABELED_NOVEL_MARK} ({n_unlabeled} records, `unlabeled_novel_images: true`) "
               "trained on all the unlabelled training images of every class, the novel classes included (the "
               "transductive setting of PromptKD; K does not apply to their training data); their novel accuracy is "
               "not comparable with rows trained on labelled base-class images only.", ""]
    if any(canonical_dataset(str(r.get(k, ""))) == "eurosat-sample" for r in records
           for k in ("dataset", "eval_dataset")):
        md += [f"> Note: {_SAMPLE_NOTE}", ""]
    return md


class PublishedLog:
    """Collects the published values a report shows, to list their sources once."""

    def __init__(self) -> None:
        self.used: dict[tuple, list[PublishedValue]] = {}

    def b2n(self, method: str, dataset: str) -> tuple[list[PublishedValue], str] | None:
        """(B, N, HM) published values and a note, or None."""
        lookup = "eurosat" if canonical_dataset(dataset) == "eurosat-sample" else dataset
        values = [published("base2novel", method, lookup, m) for m in ("base", "novel", "hm")]
        if any(v is None for v in values):
            return None
        note = " (full EuroSAT; this row is the 500-image sample, not comparable)" if lookup != dataset else ""
        self._remember("base2novel", method, values[0].dataset)
        return values, note

    def single(self, protocol: str, method: str, dataset: str) -> PublishedValue | None:
        value = published(protocol, method, dataset, "accuracy")
        if value is not None:
            self._remember(protocol, method, value.dataset)
        return value

    def _remember(self, protocol: str, method: str, dataset: str) -> None:
        key = (protocol, method, dataset)
        if key not in self.used:
            metrics = ("base", "novel", "hm") if protocol == "base2novel" else ("accuracy",)
            self.used[key] = [v for m in metrics for v in published_all(protocol, method, dataset, m)]

    def lines(self) -> list[str]:
        if not self.used:
            return []
        out = ["## Published numbers shown", "",
               "ViT-B/16 numbers from the papers and repositories. [confirmed] numbers were checked against the "
               "named public source; [paper, recalled] numbers were recalled from the paper tables and are not "
               "verified — orientation only, not acceptance bars.", ""]
        # Primary values: one line per protocol · method · status · source, listing the datasets.
        grouped: dict[tuple, list[str]] = {}
        alternates: list[tuple[str, str, str, list[PublishedValue]]] = []
        for (protocol, method, dataset), values in sorted(
                self.used.items(), key=lambda kv: (PROTOCOLS.index(kv[0][0]), method_sort_key(kv[0][1]),
                                                   dataset_sort_key(kv[0][2]))):
            by_row: dict[tuple, list[PublishedValue]] = {}
            for v in values:
                by_row.setdefault((v.variant, v.source, v.primary), []).append(v)
            for (_variant, source, primary), vs in by_row.items():
                if primary:
                    notes = sorted({v.note for v in vs if v.note and v.note != "source dataset"})
                    key = (protocol, method, vs[0].status, source, "; ".join(notes))
                    grouped.setdefault(key, []).append(dataset)
                else:
                    alternates.append((protocol, method, dataset, vs))
        for (protocol, method, status, source, note), datasets in grouped.items():
            out.append(f"- {protocol} · {method} · {', '.join(datasets)}: [{status}] {source}"
                       + (f" ({note})" if note else ""))
        for protocol, method, dataset, vs in alternates:
            nums = " / ".join(f"{v.value:.2f}" for v in vs)
            notes = "; ".join(sorted({v.note for v in vs if v.note}))
            out.append(f"- other published row, not used above — {protocol} · {method} · {dataset}: {nums} "
                       f"[{vs[0].status}] {vs[0].source}, {vs[0].variant}" + (f" ({notes})" if notes else ""))
        out.append("")
        return out


def _b2n_published_text(log: PublishedLog, method: str, dataset: str) -> str:
    found = log.b2n(method, dataset)
    if found is None:
        return "–"
    values, note = found
    status = ", ".join(sorted({v.status for v in values}))
    return " / ".join(f"{v.value:.2f}" for v in values) + f" [{status}]" + note


def b2n_markdown(table: B2NTable, log: PublishedLog) -> list[str]:
    out = ["## Base-to-novel generalisation", ""]
    rows = [
        (r.dataset, r.label, str(r.shots), str(r.n_seeds), pm(r.base), pm(r.novel), num(r.hm),
         _b2n_published_text(log, r.method, r.dataset))
        for r in table.rows
    ]
    out += _md_table(("Dataset", "Method", "K", "Seeds", "Base", "Novel", "HM", "Published B / N / HM"), rows)
    out += ["", "### Average over datasets", ""]
    avg_rows = []
    for a in table.averages:
        pub = _b2n_published_text(log, a.method, "average")
        standard = tuple(sorted(a.datasets, key=dataset_sort_key)) == STANDARD_DATASETS
        if pub != "–" and not standard:
            pub += f" (published: the 11 datasets; this average covers {len(a.datasets)})"
        avg_rows.append((f"{AVERAGE} ({n_datasets(len(a.datasets))})", a.label, str(a.shots),
                         seed_counts_text(a.seed_counts), pm(a.base), pm(a.novel), f"**{num(a.hm)}**", pub))
    out += _md_table(("Row", "Method", "K", "Seeds", "Base", "Novel", "HM", "Published B / N / HM"), avg_rows)
    out += [""]
    for a in table.averages:
        if tuple(sorted(a.datasets, key=dataset_sort_key)) != STANDARD_DATASETS:
            out.append(f"- {a.label} (K={a.shots}) average covers: {', '.join(a.datasets)}.")
    out += [
        "- HM = 2·B·N/(B+N) of the mean B and mean N over seeds. The Average row averages B and N over its datasets "
        "first and takes the HM of those two averages (not the mean of the per-dataset HMs).",
        f"- {STD_CONVENTION} Average-row std: over seeds of the per-seed averages, only when all its datasets have "
        "the same seeds. Only seeds with both a base and a novel record are used.",
        "",
    ]
    return out


def fewshot_markdown(table: FewShotTable) -> list[str]:
    shots = table.shots
    out = ["## Few-shot classification", ""]
    grid: dict[tuple, dict[int, FewShotRow]] = {}
    for r in table.rows:
        grid.setdefault((r.dataset, r.method, r.label), {})[r.shots] = r
    rows = []
    for (dataset, _method, label), by_k in grid.items():
        cells = [pm(by_k[k].accuracy) if k in by_k else "–" for k in shots]
        rows.append((dataset, label, seed_counts_text(r.n_seeds for r in by_k.values()), *cells))
    out += _md_table(("Dataset", "Method", "Seeds", *(f"K={k}" for k in shots)), rows)
    out += ["", "### Average over datasets", ""]
    avg: dict[tuple, dict[int, FewShotAverage]] = {}
    for a in table.averages:
        avg.setdefault((a.method, a.label), {})[a.shots] = a
    avg_rows = []
    for (_method, label), by_k in avg.items():
        cells = [pm(by_k[k].accuracy) if k in by_k else "–" for k in shots]
        n_datasets = sorted({len(a.datasets) for a in by_k.values()})
        counts = [c for a in by_k.values() for c in a.seed_counts]
        avg_rows.append((label, seed_counts_text(n_datasets), seed_counts_text(counts), *cells))
    out += _md_table(("Method", "Datasets", "Seeds", *(f"K={k}" for k in shots)), avg_rows)
    out += ["", f"- Accuracy (%). {STD_CONVENTION} Average: mean over datasets of the per-dataset means.", ""]
    return out


def transfer_markdown(table: TransferTable, log: PublishedLog, title: str) -> list[str]:
    out = [f"## {title}", ""]
    sources = sorted({c.source for c in table.cells}, key=dataset_sort_key)
    for source in sources:
        cells = [c for c in table.cells if c.source == source]
        targets = sorted({c.eval_dataset for c in cells if not c.is_source}, key=dataset_sort_key)
        source_names = sorted({c.eval_dataset for c in cells if c.is_source}, key=dataset_sort_key)
        columns = [*source_names, *targets]
        header = ("Method", "K", "Seeds", *(f"{d} (source)" for d in source_names), *targets, AVG_TARGETS)
        rows = []
        keys = sorted({(c.method, c.label, c.shots) for c in cells},
                      key=lambda k: (method_sort_key(k[0], k[1]), k[2]))
        for method, label, shots in keys:
            mine = {c.eval_dataset: c for c in cells if c.label == label and c.shots == shots}
            average = next((a for a in table.averages
                            if a.source == source and a.label == label and a.shots == shots), None)
            row_cells = [pm(mine[d].accuracy) if d in mine else "–" for d in columns]
            rows.append((label, str(shots), seed_counts_text(c.n_seeds for c in mine.values()), *row_cells,
                         pm(average.accuracy) if average else "–"))
            if canonical_dataset(source) != "imagenet":
                continue  # published transfer numbers are for ImageNet as the source
            pubs = [log.single(table.protocol, method, d) for d in columns]
            pub_avg = log.single(table.protocol, method, "average")
            present = [p for p in [*pubs, pub_avg] if p is not None]
            if not present:
                continue
            statuses = [p.status for p in present]
            common = max(set(statuses), key=statuses.count)

            def fmt(p: PublishedValue | None, common=common) -> str:
                if p is None:
                    return "–"
                return f"{p.value:.2f}" + ("" if p.status == common else f" ({p.status})")

            avg_text = fmt(pub_avg)
            if pub_avg is not None and average is not None and tuple(
                    canonical_dataset(t) for t in average.targets) != _published_targets(table.protocol):
                avg_text += " (published targets differ)"
            rows.append((f"{label} — published [{common}]", "", "", *(fmt(p) for p in pubs), avg_text))
        if len(sources) > 1:
            out += [f"Source: {source}", ""]
        out += _md_table(header, rows)
        out += [""]
    out += [f"- Accuracy (%). {STD_CONVENTION} {AVG_TARGETS}: mean of the per-target means, the source excluded; "
            "its std is over seeds of the per-seed averages, only when all targets have the same seeds.", ""]
    return out


def _published_targets(protocol: str) -> tuple[str, ...]:
    return STANDARD_DATASETS[1:] if protocol == "cross_dataset" else DG_TARGETS


def not_applicable_markdown(records: Sequence[dict]) -> list[str]:
    """One row per (protocol, method, dataset) whose cells were not run because the method does not apply."""
    if not records:
        return []
    rows = {}
    for r in records:
        key = (r["protocol"], str(r.get("method_label") or r["method"]), r["dataset"])
        shots = rows.setdefault(key, (set(), r.get("reason", "")))[0]
        shots.add(r["shots"])
    md = ["## Not applicable", "", "Cells not run: the method does not apply to the protocol.", ""]
    md += _md_table(["Protocol", "Method", "Dataset", "Shots", "Result"],
                    [[p, m, d, ", ".join(map(str, sorted(shots))), f"not applicable: {reason}"]
                     for (p, m, d), (shots, reason) in sorted(rows.items())])
    return [*md, ""]


def footer_markdown(notes: Sequence[str], log: PublishedLog) -> list[str]:
    """The tables' notes, the published sources shown and the std convention."""
    md: list[str] = []
    if notes:
        md += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    md += log.lines()
    md += ["---", "", f"Std convention: {STD_CONVENTION}", ""]
    return md
