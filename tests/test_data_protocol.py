"""Split files, CoOp's split generators, base/novel subsampling, the JSON few-shot cache, safe Dassl pickle import."""

from __future__ import annotations

import json
import os
import pickle
import random
import sys
import types
from pathlib import Path

import pytest

from promptclip.data import (
    Record,
    fewshot,
    fewshot_splits,
    import_dassl_fewshot,
    load_dassl_pickle,
    load_splits,
    read_split,
    subsample_classes,
    write_split,
)
from promptclip.data.protocol import split_by_class, split_trainval
from promptclip.errors import DataError

GOLDEN_SPLIT = Path(__file__).parent / "golden" / "split_zhou_DescribableTextures.json"


def _touch_images(folder: Path, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")


@pytest.fixture
def dtd(tmp_path):
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_bytes(GOLDEN_SPLIT.read_bytes())
    return load_splits("dtd", tmp_path, write_split=False)


# ---------------------------------------------------------------------------------------------------------- split files


def test_read_split_keeps_json_order_and_joins_paths(tmp_path):
    raw = json.loads(GOLDEN_SPLIT.read_text())
    train, val, test = read_split(GOLDEN_SPLIT, tmp_path / "images")
    assert [[r.relpath, r.label, r.classname] for r in train] == raw["train"]
    assert [[r.relpath, r.label, r.classname] for r in test] == raw["test"]
    assert train[0].path == str(tmp_path / "images" / Path(raw["train"][0][0]))


def test_write_split_round_trip(tmp_path):
    train, val, test = read_split(GOLDEN_SPLIT, tmp_path)
    out = write_split(tmp_path / "copy.json", train, val, test)
    assert json.loads(out.read_text()) == json.loads(GOLDEN_SPLIT.read_text())
    assert read_split(out, tmp_path) == (train, val, test)


@pytest.mark.parametrize(
    "content,needle",
    [
        ("not json", "is not valid JSON"),
        ('{"train": [], "val": []}', "has no key(s) ['test']"),
        ('{"train": [["a.jpg", 0]], "val": [], "test": []}', "entry 0 of 'train' is not [relpath, label, classname]"),
        ('{"train": [["a.jpg", "x", "c"]], "val": [], "test": []}', "non-integer label 'x'"),
        ('{"train": [["a.jpg", 0, "c"], ["b.jpg", 0, "d"]], "val": [], "test": []}', "label 0 has two class names"),
        ('{"train": [["a.jpg", 0, "c"], ["b.jpg", 2, "d"]], "val": [], "test": []}', "missing [1]"),
    ],
)
def test_bad_split_file_messages_name_the_file(tmp_path, content, needle):
    root = tmp_path / "root"
    (root / "dtd" / "images").mkdir(parents=True)
    split = root / "dtd" / "split_zhou_DescribableTextures.json"
    split.write_text(content)
    with pytest.raises(DataError) as e:
        load_splits("dtd", root)
    assert needle in str(e.value) and str(split) in str(e.value)


# ---------------------------------------------------------------------------------------------------- split generation


def test_folder_generator_rounding_and_renames(tmp_path):
    # 10 -> 5/2/3; 7 -> round(3.5)=4 / round(1.4)=1 / 2; 5 -> round(2.5)=2 (banker's) / 1 / 2
    sizes = {"AnnualCrop": 10, "Forest": 7, "SeaLake": 5}
    listing = {c: [f"{c}_{i}.jpg" for i in range(1, n + 1)] for c, n in sizes.items()}
    train, val, test = split_by_class(listing, random.Random(0), str(tmp_path), renames={"SeaLake": "Sea or Lake"})
    per = {c: [sum(r.label == lab for r in part) for part in (train, val, test)] for lab, c in enumerate(sorted(sizes))}
    assert per == {"AnnualCrop": [5, 2, 3], "Forest": [4, 1, 2], "SeaLake": [2, 1, 2]}
    assert {r.classname for r in train if r.label == 2} == {"Sea or Lake"}
    assert {r.classname for r in train if r.label == 0} == {"AnnualCrop"}
    # disjoint, complete
    rels = [r.relpath for r in train + val + test]
    assert len(rels) == len(set(rels)) == 22


def test_folder_generator_is_seeded_and_listing_order_independent(tmp_path):
    listing = {"b": [f"b{i}.jpg" for i in range(20)], "a": [f"a{i}.jpg" for i in range(20)]}
    shuffled = {k: list(reversed(v)) for k, v in reversed(list(listing.items()))}
    one = split_by_class(listing, random.Random(5), "/x")
    two = split_by_class(shuffled, random.Random(5), "/x")
    other = split_by_class(listing, random.Random(6), "/x")
    assert one == two
    assert one != other
    # the procedure: per class in sorted order, sorted names shuffled by the same stream, first 50% train
    rng = random.Random(5)
    expected_train = []
    for c in ("a", "b"):
        names = [f"{c}/{n}" for n in sorted(listing[c])]
        rng.shuffle(names)
        expected_train += names[:10]
    assert [r.relpath for r in one[0]] == expected_train


def test_generated_split_is_saved_and_reused(tmp_path):
    for c in ("Forest", "River"):
        _touch_images(tmp_path / "eurosat" / "2750" / c, [f"{c}_{i}.jpg" for i in range(1, 11)])
    splits = load_splits("eurosat", tmp_path)
    saved = tmp_path / "eurosat" / "split_zhou_EuroSAT.json"
    assert saved.is_file() and splits.meta["split_source"] == "generated+saved"
    assert splits.classnames == ["Forest", "River"]
    again = load_splits("eurosat", tmp_path)
    assert again.meta["split_source"] == "file"
    assert (again.train, again.val, again.test) == (splits.train, splits.val, splits.test)
    # a different split seed gives a different assignment
    saved.unlink()
    assert load_splits("eurosat", tmp_path, split_seed=2, write_split=False).train != splits.train


def test_split_trainval_takes_round_20_percent_per_label():
    items = [Record(f"/x/{i}", 0 if i < 10 else 1, "c", f"{i}") for i in range(13)]
    train, val = split_trainval(items, random.Random(0))
    assert sum(r.label == 0 for r in val) == 2 and sum(r.label == 1 for r in val) == 1  # round(0.6) = 1
    assert sorted(r.relpath for r in train + val) == sorted(r.relpath for r in items)


# ------------------------------------------------------------------------------------------------- few-shot / subsample


def test_fewshot_small_classes_keep_everything_and_k0_is_identity():
    items = [Record(f"/x/{i}", i % 3, str(i % 3), str(i)) for i in range(7)]  # class sizes 3, 2, 2
    out = fewshot(items, 3, seed=1)
    assert sorted(r.relpath for r in out if r.label != 0) == ["1", "2", "4", "5"]
    assert fewshot(items, 0, seed=1) == items
    with pytest.raises(TypeError):
        fewshot(items, 1)


def test_subsample_base_new_partition(dtd):
    fs = fewshot_splits(dtd, 2, 1)
    base, new = subsample_classes(fs, "base"), subsample_classes(fs, "new")
    assert base.num_classes == 24 and new.num_classes == 23  # ceil(47 / 2)
    assert base.classnames + new.classnames == dtd.classnames
    assert {r.label for r in new.test} == set(range(23))
    assert len(base.test) + len(new.test) == len(dtd.test)
    with pytest.raises(DataError, match="'base' or 'new'"):
        subsample_classes(fs, "novel")


def test_fewshot_json_cache(dtd, tmp_path):
    cache = tmp_path / "split_fewshot"
    first = fewshot_splits(dtd, 4, 2, cache_dir=cache)
    path = cache / "shot_4-seed_2.json"
    assert path.is_file() and first.meta["fewshot_source"] == "sampled"
    data = json.loads(path.read_text())
    assert data["num_shots"] == 4 and data["seed"] == 2 and len(data["train"]) == 47 * 4
    again = fewshot_splits(dtd, 4, 2, cache_dir=cache)
    assert again.meta["fewshot_source"] == "cache:shot_4-seed_2.json"
    assert (again.train, again.val) == (first.train, first.val)
    # a cache drawn from another split is refused
    other = dtd.replace(train=dtd.train[1:])
    with pytest.raises(DataError, match="different split file"):
        fewshot_splits(other, 4, 2, cache_dir=cache)


# -------------------------------------------------------------------------------------------------- Dassl pickle import


def _fake_dassl(monkeypatch):
    """Register a stand-in for dassl.data.datasets.base_dataset.Datum (same attributes as Dassl's)."""
    mod = types.ModuleType("dassl.data.datasets.base_dataset")

    class Datum:
        def __init__(self, impath="", label=0, domain=0, classname=""):
            self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

    Datum.__module__ = mod.__name__
    Datum.__qualname__ = "Datum"
    mod.Datum = Datum
    for name in ("dassl", "dassl.data", "dassl.data.datasets"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return Datum


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_import_dassl_fewshot_pickle(dtd, tmp_path, monkeypatch, protocol):
    expected = fewshot_splits(dtd, 2, 3)
    with monkeypatch.context() as m:
        Datum = _fake_dassl(m)
        other_machine = "/home/someone/data/dtd/images/"
        data = {
            "train": [Datum(other_machine + r.relpath, r.label, 0, r.classname) for r in expected.train],
            "val": [Datum(other_machine + r.relpath, r.label, 0, r.classname) for r in expected.val],
        }
        blob = pickle.dumps(data, protocol=protocol)
    assert "dassl.data.datasets.base_dataset" not in sys.modules  # the loader never needs Dassl
    pkl = tmp_path / "split_fewshot" / "shot_2-seed_3.pkl"
    pkl.parent.mkdir()
    pkl.write_bytes(blob)
    train, val = import_dassl_fewshot(pkl, dtd)
    assert (train, val) == (expected.train, expected.val)
    # through fewshot_splits: the pickle is imported and a JSON twin written
    out = fewshot_splits(dtd, 2, 3, cache_dir=pkl.parent)
    assert out.meta["fewshot_source"] == "dassl-pickle:shot_2-seed_3.pkl"
    assert (out.train, out.val) == (expected.train, expected.val)
    assert (pkl.parent / "shot_2-seed_3.json").is_file()


def test_dassl_pickle_label_mismatch_is_reported(dtd, tmp_path, monkeypatch):
    r = dtd.train[0]
    with monkeypatch.context() as m:
        Datum = _fake_dassl(m)
        blob = pickle.dumps({"train": [Datum("/d/" + r.relpath, r.label + 1, 0, r.classname)], "val": []})
    pkl = tmp_path / "x.pkl"
    pkl.write_bytes(blob)
    with pytest.raises(DataError, match="has label"):
        import_dassl_fewshot(pkl, dtd)


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("make", ["system", "eval", "nested"])
def test_malicious_pickle_is_refused(tmp_path, make):
    marker = tmp_path / "pwned"
    payload = {"system": _Evil(str(marker)), "eval": _EvalEvil(), "nested": {"train": [_Evil(str(marker))]}}[make]
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps(payload))
    with pytest.raises(DataError, match="refused to load .*evil.pkl.*is not allowed"):
        load_dassl_pickle(pkl)
    assert not marker.exists()


def test_truncated_pickle_is_a_data_error(tmp_path):
    pkl = tmp_path / "cut.pkl"
    pkl.write_bytes(pickle.dumps({"train": [1, 2, 3]})[:-4])
    with pytest.raises(DataError, match="cut.pkl"):
        load_dassl_pickle(pkl)
