"""Reports from protocol records: aggregation rules, CSV/markdown/PNG outputs, record reading, published numbers.

Every expected number is computed by hand in the test (or from the formula written out here), never by the code under
test.
"""

import csv
import json
import math
import sys
import warnings

import pytest

from promptclip import published as pub
from promptclip.errors import PromptClipError
from promptclip.report import (
    RecordWarning,
    base2novel_table,
    cross_dataset_table,
    dataset_sort_key,
    dg_table,
    fewshot_table,
    harmonic_mean,
    mean_std,
    read_records,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rec(protocol, method, dataset, split, seed, accuracy, shots=16, eval_dataset=None, **extra):
    r = {
        "protocol": protocol, "method": method, "method_label": extra.pop("method_label", method),
        "dataset": dataset, "eval_dataset": eval_dataset or dataset, "split": split, "seed": seed, "shots": shots,
        "accuracy": accuracy, "macro_f1": accuracy - 1.0, "num_samples": 100, "backbone": "ViT-B/16",
        "config_hash": "abc123", "run_dir": f"runs/{protocol}/{dataset}/{method}/seed{seed}",
    }
    r.update(extra)
    return r


def hm(b, n):  # the formula, written out independently of the code under test
    return 2 * b * n / (b + n)


def b2n(method, dataset, seed, base, novel, **extra):
    return [rec("base2novel", method, dataset, "base", seed, base, **extra),
            rec("base2novel", method, dataset, "novel", seed, novel, **extra)]


# --------------------------------------------------------------------------------------------------------------------
# Aggregation


def test_mean_std_is_sample_std_and_undefined_for_one_value():
    s = mean_std([80.0, 82.0])
    assert s.mean == pytest.approx(81.0)
    assert s.std == pytest.approx(math.sqrt(((80 - 81) ** 2 + (82 - 81) ** 2) / (2 - 1)))  # ddof = 1 -> sqrt(2)
    assert s.n == 2
    one = mean_std([75.0])
    assert one.mean == 75.0 and math.isnan(one.std) and one.n == 1
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_base2novel_row_means_std_and_hm_of_means():
    records = b2n("maple", "eurosat", 1, 80.0, 60.0) + b2n("maple", "eurosat", 2, 82.0, 64.0)
    table = base2novel_table(records)
    (row,) = table.rows
    assert (row.dataset, row.label, row.shots, row.seeds) == ("eurosat", "maple", 16, (1, 2))
    assert row.base.mean == pytest.approx(81.0)
    assert row.novel.mean == pytest.approx(62.0)
    assert row.base.std == pytest.approx(math.sqrt(2.0))  # deviations ±1, n-1 = 1
    assert row.novel.std == pytest.approx(math.sqrt(8.0))  # deviations ±2
    assert row.hm == pytest.approx(2 * 81 * 62 / (81 + 62))  # 70.2378..., HM of the means
    per_seed = [2 * 80 * 60 / 140, 2 * 82 * 64 / 146]
    assert row.hm_std == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2))
    (avg,) = table.averages
    assert avg.base.mean == pytest.approx(81.0) and avg.novel.mean == pytest.approx(62.0)
    assert avg.datasets == ("eurosat",)


def test_average_hm_is_hm_of_averaged_b_and_n_not_mean_of_hms():
    # dataset A: B 90, N 10 -> HM 18; dataset B: B 50, N 90 -> HM 64.29. Mean of HMs = 41.14,
    # HM of the averages (B 70, N 50) = 58.33: very different on purpose.
    records = b2n("coop", "dtd", 1, 90.0, 10.0) + b2n("coop", "eurosat", 1, 50.0, 90.0)
    table = base2novel_table(records)
    (avg,) = table.averages
    expected = 2 * 70.0 * 50.0 / (70.0 + 50.0)
    mean_of_hms = (2 * 90 * 10 / 100 + 2 * 50 * 90 / 140) / 2
    assert avg.base.mean == pytest.approx(70.0)
    assert avg.novel.mean == pytest.approx(50.0)
    assert avg.hm == pytest.approx(expected)
    assert abs(avg.hm - mean_of_hms) > 10
    # one seed everywhere: the std is undefined, not zero
    assert all(math.isnan(r.base.std) and math.isnan(r.novel.std) for r in table.rows)
    assert math.isnan(avg.base.std) and avg.seed_counts == (1, 1)


def test_average_std_over_seeds_of_per_seed_averages():
    records = (b2n("maple", "dtd", 1, 80.0, 50.0) + b2n("maple", "dtd", 2, 82.0, 54.0)
               + b2n("maple", "eurosat", 1, 60.0, 70.0) + b2n("maple", "eurosat", 2, 70.0, 70.0))
    (avg,) = base2novel_table(records).averages
    # per-seed base averages: seed 1 (80+60)/2 = 70, seed 2 (82+70)/2 = 76 -> mean 73, std |76-70|/sqrt(2)
    assert avg.base.mean == pytest.approx(73.0)
    assert avg.base.std == pytest.approx(6 / math.sqrt(2))
    # per-seed novel averages: 60 and 62
    assert avg.novel.mean == pytest.approx(61.0)
    assert avg.novel.std == pytest.approx(2 / math.sqrt(2))
    assert avg.hm == pytest.approx(hm(73.0, 61.0))


def test_seed_without_its_pair_is_left_out_and_reported():
    records = b2n("coop", "dtd", 1, 70.0, 40.0) + [rec("base2novel", "coop", "dtd", "base", 2, 99.0)]
    with pytest.warns(RecordWarning, match="seed"):
        table = base2novel_table(records)
    (row,) = table.rows
    assert row.seeds == (1,) and row.base.mean == 70.0
    assert any("seed(s) 2" in n for n in table.notes)


def test_rows_sorted_in_standard_order_and_methods_stable():
    records = []
    for d in ("my_custom", "eurosat-sample", "eurosat", "imagenet", "dtd"):
        for m in ("maple", "zeroshot", "coop"):
            records += b2n(m, d, 1, 70.0, 60.0)
    rows = base2novel_table(records).rows
    assert [r.dataset for r in rows][::3] == ["imagenet", "dtd", "eurosat", "eurosat-sample", "my_custom"]
    assert [r.method for r in rows[:3]] == ["zeroshot", "coop", "maple"]
    names = ["zzz", "imagenet_r", "ucf101", "imagenet", "eurosat-sample", "aaa", "imagenetv2"]
    assert sorted(names, key=dataset_sort_key) == [
        "imagenet", "ucf101", "imagenetv2", "imagenet_r", "eurosat-sample", "aaa", "zzz"]


def test_method_label_separates_rows_and_falls_back_to_method():
    records = (b2n("dcp", "dtd", 1, 70.0, 60.0, method_label="dcp (paper)")
               + b2n("dcp", "dtd", 1, 72.0, 61.0, method_label="dcp (code)"))
    no_label = b2n("coop", "dtd", 1, 75.0, 50.0)
    for r in no_label:
        del r["method_label"]
    rows = base2novel_table(records + no_label).rows
    assert [r.label for r in rows] == ["coop", "dcp (code)", "dcp (paper)"]


def test_two_backbones_never_share_a_row():
    records = b2n("coop", "dtd", 1, 70.0, 60.0) + b2n("coop", "dtd", 1, 50.0, 40.0, backbone="RN50")
    labels = sorted(r.label for r in base2novel_table(records).rows)
    assert labels == ["coop [RN50]", "coop [ViT-B/16]"]


def test_non_vit_b16_backbone_is_flagged(tmp_path):
    write_report(b2n("coop", "dtd", 1, 50.0, 40.0, backbone="tiny"), tmp_path, plots=False)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "published numbers are for ViT-B/16; these records also use tiny" in md


def test_fewshot_table_and_average_per_k():
    records = [
        rec("fewshot", "coop", "dtd", "all", 1, 40.0, shots=1), rec("fewshot", "coop", "dtd", "all", 2, 44.0, shots=1),
        rec("fewshot", "coop", "dtd", "all", 1, 45.0, shots=2), rec("fewshot", "coop", "dtd", "all", 2, 47.0, shots=2),
        rec("fewshot", "coop", "eurosat", "all", 1, 50.0, shots=1),
        rec("fewshot", "coop", "eurosat", "all", 2, 54.0, shots=1),
    ]
    table = fewshot_table(records)
    assert [(r.dataset, r.shots) for r in table.rows] == [("dtd", 1), ("dtd", 2), ("eurosat", 1)]
    dtd1 = table.rows[0]
    assert dtd1.accuracy.mean == pytest.approx(42.0) and dtd1.accuracy.std == pytest.approx(math.sqrt(8.0))
    assert dtd1.macro_f1.mean == pytest.approx(41.0)
    avg = {a.shots: a for a in table.averages}
    assert avg[1].accuracy.mean == pytest.approx((42.0 + 52.0) / 2)
    assert avg[1].datasets == ("dtd", "eurosat")
    # per-seed averages at K=1: (40+50)/2 = 45 and (44+54)/2 = 49
    assert avg[1].accuracy.std == pytest.approx(4 / math.sqrt(2))
    assert avg[2].accuracy.mean == pytest.approx(46.0) and avg[2].datasets == ("dtd",)


def test_cross_dataset_average_excludes_the_source():
    records = []
    for seed, (src, cal, dtd) in enumerate([(70.0, 90.0, 40.0), (72.0, 92.0, 44.0)], start=1):
        records += [rec("cross_dataset", "maple", "imagenet", "all", seed, src, eval_dataset="imagenet"),
                    rec("cross_dataset", "maple", "imagenet", "all", seed, cal, eval_dataset="caltech101"),
                    rec("cross_dataset", "maple", "imagenet", "all", seed, dtd, eval_dataset="dtd")]
    table = cross_dataset_table(records)
    source = table.cell("maple", "imagenet")
    assert source.is_source and source.accuracy.mean == pytest.approx(71.0)
    (avg,) = table.averages
    assert avg.targets == ("caltech101", "dtd")
    assert avg.accuracy.mean == pytest.approx((91.0 + 42.0) / 2)  # 66.5, the source's 71 not included
    # per-seed target averages: 65 and 68
    assert avg.accuracy.std == pytest.approx(3 / math.sqrt(2))


def test_dg_source_separate_and_mean_of_four_targets():
    values = {"imagenet": 70.0, "imagenet_v2": 63.0, "imagenet_sketch": 48.0, "imagenet_a": 50.0, "imagenet_r": 77.0}
    records = [rec("domain_generalization", "coop", "imagenet", "all", 1, v, eval_dataset=d) for d, v in values.items()]
    table = dg_table(records)
    (avg,) = table.averages
    assert avg.targets == ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    assert avg.accuracy.mean == pytest.approx((63 + 48 + 50 + 77) / 4)
    assert math.isnan(avg.accuracy.std)
    assert table.cell("coop", "imagenet").accuracy.mean == 70.0


# --------------------------------------------------------------------------------------------------------------------
# Reading records


def write_lines(path, lines):
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_read_records_truncated_last_line_is_skipped_with_warning(tmp_path):
    a = json.dumps(rec("fewshot", "coop", "dtd", "all", 1, 40.0, shots=1))
    b = json.dumps(rec("fewshot", "coop", "dtd", "all", 2, 44.0, shots=1))
    path = write_lines(tmp_path / "records.jsonl", [a + "\n", b + "\n", b[: len(b) // 2]])
    with pytest.warns(RecordWarning, match=r"records\.jsonl:3"):
        records = read_records(path)
    assert [r["seed"] for r in records] == [1, 2]


def test_read_records_malformed_middle_line_names_file_and_line(tmp_path):
    a = json.dumps(rec("fewshot", "coop", "dtd", "all", 1, 40.0, shots=1))
    path = write_lines(tmp_path / "bad.jsonl", [a + "\n", "{not json\n", a.replace('"seed": 1', '"seed": 2') + "\n"])
    with pytest.raises(PromptClipError, match=r"bad\.jsonl:2"):
        read_records(path)


def test_read_records_missing_field_is_an_error(tmp_path):
    r = rec("fewshot", "coop", "dtd", "all", 1, 40.0, shots=1)
    del r["accuracy"]
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(r) + "\n"])
    with pytest.raises(PromptClipError, match=r"r\.jsonl:1.*accuracy"):
        read_records(path)


def test_read_records_duplicates_keep_last_and_warn(tmp_path):
    first = rec("fewshot", "coop", "dtd", "all", 1, 40.0, shots=1)
    second = rec("fewshot", "coop", "dtd", "all", 1, 41.5, shots=1)
    other_hash = rec("fewshot", "coop", "dtd", "all", 1, 43.0, shots=1, config_hash="zzz")
    p1 = write_lines(tmp_path / "a.jsonl", [json.dumps(first) + "\n", json.dumps(other_hash) + "\n"])
    p2 = write_lines(tmp_path / "b.jsonl", ["\n", json.dumps(second) + "\n"])
    with pytest.warns(RecordWarning, match=r"b\.jsonl:2: duplicate of the record at .*a\.jsonl:1"):
        records = read_records([p1, p2])
    assert sorted(r["accuracy"] for r in records) == [41.5, 43.0]
    # a directory means every *.jsonl below it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecordWarning)
        assert len(read_records(tmp_path)) == 2
    with pytest.raises(PromptClipError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")


def test_same_seed_with_two_config_hashes_uses_the_last_with_a_warning():
    records = [rec("fewshot", "coop", "dtd", "all", 1, 40.0, shots=1),
               rec("fewshot", "coop", "dtd", "all", 1, 50.0, shots=1, config_hash="other")]
    with pytest.warns(RecordWarning, match="several records for seed 1"):
        table = fewshot_table(records)
    assert table.rows[0].accuracy.mean == 50.0 and table.rows[0].n_seeds == 1


# --------------------------------------------------------------------------------------------------------------------
# Report outputs


def report_records():
    records = (b2n("maple", "eurosat", 1, 80.0, 60.0) + b2n("maple", "eurosat", 2, 82.0, 64.0)
               + b2n("maple", "dtd", 1, 70.0, 50.0) + b2n("maple", "dtd", 2, 74.0, 52.0)
               + b2n("coop", "eurosat", 1, 90.0, 40.0)
               + b2n("zeroshot", "eurosat-sample", 1, 55.0, 66.0))
    for k, accs in {1: (40.0, 42.0), 2: (45.0, 49.0), 4: (50.0, 51.0), 16: (60.0, 64.0)}.items():
        for seed, acc in enumerate(accs, start=1):
            records.append(rec("fewshot", "coop", "dtd", "all", seed, acc, shots=k))
            records.append(rec("fewshot", "dcp", "dtd", "all", seed, acc + 3, shots=k, method_label="dcp (paper)"))
            records.append(rec("fewshot", "coop", "eurosat", "all", seed, acc + 10, shots=k))
    for seed in (1, 2):
        for d, v in {"imagenet": 70.0, "caltech101": 90.0, "dtd": 40.0}.items():
            records.append(rec("cross_dataset", "maple", "imagenet", "all", seed, v + seed, eval_dataset=d))
        for d, v in {"imagenet": 70.0, "imagenet_v2": 62.0, "imagenet_sketch": 48.0, "imagenet_a": 50.0,
                     "imagenet_r": 76.0}.items():
            records.append(rec("domain_generalization", "maple", "imagenet", "all", seed, v + seed, eval_dataset=d))
    return records


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    paths = write_report(report_records(), out, plots=True)
    return out, paths


def read_csv(path):
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_write_report_lists_its_files(report_dir):
    out, paths = report_dir
    names = [p.name for p in paths]
    assert names[0] == "report.md"
    for expected in ("base2novel.csv", "fewshot.csv", "cross_dataset.csv", "domain_generalization.csv",
                     "base2novel_average.png", "base2novel_per_dataset.png", "fewshot_average.png",
                     "fewshot_dtd.png", "fewshot_eurosat.png"):
        assert expected in names
    assert all(p.parent == out and p.is_file() for p in paths)


def test_base2novel_csv_round_trip(report_dir):
    out, _ = report_dir
    rows = read_csv(out / "base2novel.csv")
    assert {"dataset", "method", "label", "shots", "n_seeds", "base_mean", "base_std", "novel_mean", "novel_std",
            "hm", "published_hm", "published_status"} <= set(rows[0])
    by_key = {(r["dataset"], r["label"]): r for r in rows}
    m = by_key[("eurosat", "maple")]
    assert int(m["n_seeds"]) == 2 and m["seeds"] == "1;2" and int(m["shots"]) == 16
    assert float(m["base_mean"]) == pytest.approx(81.0, abs=1e-4)
    assert float(m["base_std"]) == pytest.approx(math.sqrt(2), abs=1e-4)
    assert float(m["novel_mean"]) == pytest.approx(62.0, abs=1e-4)
    assert float(m["hm"]) == pytest.approx(hm(81.0, 62.0), abs=1e-4)
    assert (m["published_base"], m["published_novel"], m["published_hm"]) == ("94.07", "73.23", "82.35")
    assert m["published_status"] == "confirmed"
    c = by_key[("eurosat", "coop")]
    assert int(c["n_seeds"]) == 1 and c["base_std"] == "" and c["novel_std"] == ""  # std undefined with one seed
    assert c["published_status"] == "paper, recalled"
    avg = by_key[("Average", "maple")]
    # maple: eurosat B 81 N 62, dtd B 72 N 51 -> averages 76.5 / 56.5
    assert float(avg["base_mean"]) == pytest.approx(76.5, abs=1e-4)
    assert float(avg["hm"]) == pytest.approx(hm(76.5, 56.5), abs=1e-4)
    assert avg["datasets"] == "dtd;eurosat" and int(avg["n_datasets"]) == 2
    assert avg["published_hm"] == "78.55"


def test_fewshot_and_transfer_csv_round_trip(report_dir):
    out, _ = report_dir
    fs = {(r["dataset"], r["label"], int(r["shots"])): r for r in read_csv(out / "fewshot.csv")}
    r = fs[("dtd", "coop", 2)]
    assert float(r["accuracy_mean"]) == pytest.approx(47.0) and float(r["accuracy_std"]) == pytest.approx(
        math.sqrt(8), abs=1e-4)
    assert float(r["macro_f1_mean"]) == pytest.approx(46.0)
    assert float(fs[("Average", "coop", 1)]["accuracy_mean"]) == pytest.approx((41.0 + 51.0) / 2)
    assert ("dtd", "dcp (paper)", 16) in fs

    cross = {(r["eval_dataset"], r["label"]): r for r in read_csv(out / "cross_dataset.csv")}
    assert cross[("imagenet", "maple")]["role"] == "source"
    assert float(cross[("caltech101", "maple")]["accuracy_mean"]) == pytest.approx(91.5)
    avg = cross[("Avg (targets)", "maple")]
    assert avg["role"] == "average" and float(avg["accuracy_mean"]) == pytest.approx((91.5 + 41.5) / 2)
    assert avg["published_accuracy"] == "66.30"

    dg = {(r["eval_dataset"], r["label"]): r for r in read_csv(out / "domain_generalization.csv")}
    assert float(dg[("Avg (targets)", "maple")]["accuracy_mean"]) == pytest.approx((63.5 + 49.5 + 51.5 + 77.5) / 4)
    assert dg[("imagenet_a", "maple")]["published_status"] == "confirmed"
    assert dg[("imagenet_v2", "maple")]["published_status"] == "paper, recalled"


def test_report_markdown_rows(report_dir):
    out, _ = report_dir
    md = (out / "report.md").read_text(encoding="utf-8")
    for section in ("## Base-to-novel", "## Few-shot", "## Cross-dataset transfer", "## Domain generalisation"):
        assert section in md
    expected_hm = f"{hm(81.0, 62.0):.2f}"
    assert (f"| eurosat | maple | 16 | 2 | 81.00 ± 1.41 | 62.00 ± 2.83 | {expected_hm} | "
            "94.07 / 73.23 / 82.35 [confirmed] |") in md
    assert "| eurosat | coop | 16 | 1 | 90.00 | 40.00 |" in md  # no ± with a single seed
    assert "| Average (2 datasets) | maple | 16 | 2 | 76.50 ± " in md
    assert f"**{hm(76.5, 56.5):.2f}**" in md
    assert "82.28 / 75.14 / 78.55 [confirmed]" in md
    # the sample is compared to the full EuroSAT number only with a note
    line = next(x for x in md.splitlines() if x.startswith("| eurosat-sample | zeroshot"))
    assert "56.48 / 64.05 / 60.03" in line and "500-image sample" in line
    assert "sample standard deviation" in md and "ddof = 1" in md
    assert "| dtd | coop | 2 | 41.00 ± 1.41 | 47.00 ± 2.83 | 50.50 ± 0.71 | 62.00 ± 2.83 |" in md
    assert "| maple — published [paper, recalled] |" in md
    assert "random weights" not in md
    # the report says which CoOp baseline row it used and lists the other one
    sources = md[md.index("## Published numbers shown"):]
    assert "base2novel · coop · eurosat, average: [" not in sources  # average is [confirmed], eurosat recalled
    assert "base2novel · coop · average: [confirmed] MaPLe / PromptSRC READMEs" in sources
    assert "other published row, not used above — base2novel · coop · average: 82.63 / 67.99 / 74.60" in sources


def test_plots_are_valid_non_blank_pngs(report_dir):
    from matplotlib.image import imread

    out, paths = report_dir
    pngs = [p for p in paths if p.suffix == ".png"]
    assert len(pngs) == 5
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000
        image = imread(p)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_random_weights_banner(tmp_path):
    records = report_records()
    records[0]["random_weights"] = True
    paths = write_report(records, tmp_path, plots=False)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "random weights — accuracy meaningless" in md
    assert md.index("random weights") < md.index("## Base-to-novel")  # a banner, at the top
    assert all(p.suffix != ".png" for p in paths)
    rows = read_csv(tmp_path / "base2novel.csv")
    flagged = {r["dataset"]: r["random_weights"] for r in rows if r["label"] == "maple"}
    assert flagged["eurosat"] == "True" and flagged["dtd"] == "False" and flagged["Average"] == "True"


def test_unknown_record_fields_are_ignored(tmp_path):
    records = b2n("coop", "dtd", 1, 70.0, 60.0, precision="bf16", seconds=12.5, created="2025-01-01", extra={"a": 1})
    write_report(records, tmp_path, plots=False)
    assert "| dtd | coop | 16 | 1 | 70.00 | 60.00 |" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_missing_matplotlib_gives_install_hint(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    records = b2n("coop", "dtd", 1, 70.0, 60.0)
    with pytest.raises(PromptClipError, match=r'pip install "promptclip\[plot\]"'):
        write_report(records, tmp_path / "out", plots=True)
    assert not (tmp_path / "out" / "report.md").exists()  # nothing half-written
    paths = write_report(records, tmp_path / "out", plots=False)
    assert [p.name for p in paths] == ["report.md", "base2novel.csv"]


def test_no_records_is_an_error(tmp_path):
    with pytest.raises(PromptClipError, match="no records"):
        write_report([], tmp_path, plots=False)


# --------------------------------------------------------------------------------------------------------------------
# Published numbers

# SPEC §5.1, transcribed here independently of promptclip.published: method -> (B, N, HM), all [confirmed].
SPEC_AVERAGES = {
    "zeroshot": (69.34, 74.22, 71.70),
    "coop": (82.69, 63.22, 71.66),
    "cocoop": (80.47, 71.69, 75.83),
    "kgcoop": (80.73, 73.60, 77.00),
    "maple": (82.28, 75.14, 78.55),
    "promptsrc": (84.26, 76.10, 79.97),
}
ELEVEN = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
          "sun397", "dtd", "eurosat", "ucf101")


@pytest.mark.parametrize("method", sorted(SPEC_AVERAGES))
def test_published_per_dataset_rows_average_to_the_published_averages(method):
    b_avg, n_avg, hm_avg = SPEC_AVERAGES[method]
    for metric, value in zip(("base", "novel", "hm"), SPEC_AVERAGES[method], strict=True):
        p = pub.published("base2novel", method, "average", metric)
        assert p.value == value and p.status == "confirmed" and p.source
    rows = [[pub.published("base2novel", method, d, m) for m in ("base", "novel", "hm")] for d in ELEVEN]
    assert all(v is not None for row in rows for v in row)
    b = sum(r[0].value for r in rows) / 11
    n = sum(r[1].value for r in rows) / 11
    assert b == pytest.approx(b_avg, abs=0.01)
    assert n == pytest.approx(n_avg, abs=0.01)
    assert 2 * b * n / (b + n) == pytest.approx(hm_avg, abs=0.02)  # HM of the averages, not the mean of HMs
    for base, novel, h in rows:  # each row's HM is consistent with its B and N (paper rounding)
        assert 2 * base.value * novel.value / (base.value + novel.value) == pytest.approx(h.value, abs=0.01)


def test_published_statuses_and_special_cells():
    statuses = {v.status for v in pub.published_table()}
    assert statuses == {"confirmed", "paper, recalled"}
    maple_eurosat = pub.published("base2novel", "maple", "eurosat", "hm")
    assert maple_eurosat.value == 82.35 and maple_eurosat.status == "confirmed"
    assert "issues/28" in maple_eurosat.source
    assert pub.published("base2novel", "maple", "dtd", "base").status == "paper, recalled"
    assert pub.published("b2n", "CLIP", "Flowers102", "N").value == 77.80  # aliases
    assert pub.published("base2novel", "dcp", "dtd", "hm") is None
    assert pub.published("base2novel", "maple", "eurosat-sample", "hm") is None  # the sample is not EuroSAT
    coop_rows = pub.published_all("base2novel", "coop", "average", "hm")
    assert [v.value for v in coop_rows] == [71.66, 74.60] and coop_rows[0].primary and not coop_rows[1].primary
    ivlp = pub.published_all("base2novel", "ivlp", "average", "hm")
    assert sorted(v.value for v in ivlp) == [77.51, 77.56, 77.90] and ivlp[0].value == 77.90
    assert pub.published("base2novel", "vpt", "average", "base").value == 80.24
    # ImageNet-A is confirmed for all but CoOp
    for method, status in (("zeroshot", "confirmed"), ("coop", "paper, recalled"), ("maple", "confirmed")):
        assert pub.published("domain_generalization", method, "imagenet_a", "accuracy").status == status
    assert pub.published("dg", "maple", "ImageNet-V2", "accuracy").value == 64.07


@pytest.mark.parametrize("method", ["coop", "cocoop", "maple", "promptsrc"])
def test_published_transfer_averages_match_their_rows(method):
    targets = [pub.published("cross_dataset", method, d, "accuracy").value for d in ELEVEN[1:]]
    avg = pub.published("cross_dataset", method, "average", "accuracy").value
    assert sum(targets) / 10 == pytest.approx(avg, abs=0.01)
    dg = [pub.published("domain_generalization", method, d, "accuracy").value for d in pub.DG_TARGETS]
    assert sum(dg) / 4 == pytest.approx(pub.published("domain_generalization", method, "average", "accuracy").value,
                                        abs=0.01)
    # the ImageNet source accuracy is the same model in both protocols
    assert pub.published("cross_dataset", method, "imagenet", "accuracy").value == pub.published(
        "domain_generalization", method, "imagenet", "accuracy").value


def test_published_spot_values_against_spec():
    # a handful of cells typed again from SPEC §5.2–5.4
    assert pub.published("base2novel", "promptsrc", "oxford_flowers", "base").value == 98.07
    assert pub.published("base2novel", "cocoop", "fgvc_aircraft", "novel").value == 23.71
    assert pub.published("base2novel", "kgcoop", "sun397", "hm").value == 78.36
    assert pub.published("base2novel", "coop", "dtd", "novel").value == 41.18
    assert pub.published("cross_dataset", "cocoop", "eurosat", "accuracy").value == 45.37
    assert pub.published("cross_dataset", "kgcoop", "average", "accuracy").value == 65.5
    assert pub.published("domain_generalization", "zeroshot", "imagenet_sketch", "accuracy").value == 46.15
    assert pub.published("domain_generalization", "promptsrc", "imagenet_r", "accuracy").value == 77.80
