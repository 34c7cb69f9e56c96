"""Custom datasets: image folders and CSV files, by 'folder:' / 'csv:' prefix or by path, and their error paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptclip.data import load_splits, protocol_splits
from promptclip.errors import DataError


def _images(folder: Path, n: int, prefix: str = "img") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{prefix}_{i:03d}.jpg" for i in range(n)]
    for name in names:
        (folder / name).write_bytes(b"\xff\xd8")  # never decoded by the loaders under test
    return names


# ------------------------------------------------------------------------------------------------------------- folders


def test_folder_dataset_generates_and_saves_a_split(tmp_path):
    root = tmp_path / "pets_custom"
    _images(root / "cat", 10)
    _images(root / "dog", 5)
    (root / ".hidden").mkdir()
    (root / "cat" / "notes.txt").write_text("not an image")
    splits = load_splits(f"folder:{root}")
    assert splits.name == "pets_custom"
    assert splits.classnames == ["cat", "dog"]
    # cat: 10 -> 5/2/3 ; dog: 5 -> round(2.5)=2 / 1 / 2
    assert [sum(r.label == y for r in part) for y in (0, 1) for part in (splits.train, splits.val, splits.test)] == [
        5, 2, 3, 2, 1, 2,
    ]
    assert all(r.relpath.startswith(("cat/", "dog/")) and r.relpath.endswith(".jpg") for r in splits.test)
    assert (root / "split_promptclip.json").is_file()
    again = load_splits(root)  # by path
    assert again.meta["split_source"] == "file" and again.train == splits.train
    assert splits.template == "a photo of a {}." and splits.templates[-1] == "a photo of a {}."


def test_folder_dataset_presplit_layout_allows_empty_val(tmp_path):
    root = tmp_path / "ds"
    _images(root / "train" / "a", 3)
    _images(root / "train" / "b", 2)
    _images(root / "test" / "a", 1)
    _images(root / "test" / "b", 2)
    splits = load_splits(f"folder:{root}")
    assert splits.counts() == {"train": 5, "val": 0, "test": 3}
    assert splits.classnames == ["a", "b"]
    assert {r.relpath.split("/")[0] for r in splits.test} == {"test"}


def test_folder_dataset_works_with_the_protocol_and_cache(tmp_path):
    root = tmp_path / "ds"
    for c in ("a", "b", "c", "d"):
        _images(root / c, 20, c)
    out = protocol_splits(f"folder:{root}", num_shots=2, seed=1, subsample="new")
    assert out.classnames == ["c", "d"]
    assert len(out.train) == 4 and len(out.val) == 4 and {r.label for r in out.test} == {0, 1}
    assert (root / "split_fewshot" / "shot_2-seed_1.json").is_file()
    # the cache folder is not mistaken for a class on the next load
    assert load_splits(f"folder:{root}").classnames == ["a", "b", "c", "d"]


def test_folder_empty_class_is_an_error(tmp_path):
    root = tmp_path / "ds"
    _images(root / "a", 4)
    (root / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder .*/ds/b contains no images"):
        load_splits(f"folder:{root}")


def test_folder_missing(tmp_path):
    with pytest.raises(DataError, match="custom dataset folder .*nope not found"):
        load_splits(f"folder:{tmp_path / 'nope'}")


def test_folder_small_classes(tmp_path):
    root = tmp_path / "ds"
    _images(root / "a", 3)  # round(1.5)=2 train, round(0.6)=1 val would leave no test: val gives way
    _images(root / "b", 2)  # 1 / 0 / 1
    s = load_splits(f"folder:{root}", write_split=False)
    assert [sum(r.label == y for r in part) for y in (0, 1) for part in (s.train, s.val, s.test)] == [2, 0, 1, 1, 0, 1]
    _images(root / "c", 1)
    with pytest.raises(DataError, match="class folder 'c' has only 1 image"):
        load_splits(f"folder:{root}")


# ----------------------------------------------------------------------------------------------------------------- CSV


def _csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def test_csv_with_split_column_and_empty_val(tmp_path):
    _images(tmp_path / "im", 4)
    (tmp_path / "classnames.txt").write_text("zero\none\n")
    csv_path = _csv(tmp_path / "data.csv", [
        "path,label,split",
        "im/img_000.jpg,0,train",
        "im/img_001.jpg,1,train",
        "im/img_002.jpg,1,TEST",
        "im/img_003.jpg,0,test",
    ])
    splits = load_splits(f"csv:{csv_path}")
    assert splits.name == "data"
    assert splits.counts() == {"train": 2, "val": 0, "test": 2}
    assert splits.classnames == ["zero", "one"]
    assert [(r.relpath, r.label, r.classname) for r in splits.test] == [
        ("im/img_002.jpg", 1, "one"), ("im/img_003.jpg", 0, "zero"),
    ]
    assert splits.test[0].path == str(tmp_path / "im" / "img_002.jpg")
    assert load_splits(csv_path).counts() == splits.counts()  # by path


def test_csv_with_class_name_labels_and_generated_split(tmp_path):
    names = _images(tmp_path, 12)
    rows = ["path,label"] + [f"{n},{'rose' if i % 2 else 'tulip'}" for i, n in enumerate(names)]
    splits = load_splits(f"csv:{_csv(tmp_path / 'f.csv', rows)}")
    assert splits.classnames == ["rose", "tulip"]
    assert splits.counts() == {"train": 6, "val": 2, "test": 4}  # 6 per class -> 3/1/2
    assert all(splits.classnames[r.label] == r.classname for r in splits.train + splits.val + splits.test)


def test_csv_classname_column(tmp_path):
    _images(tmp_path, 2)
    csv_path = _csv(tmp_path / "f.csv", ["label,path,classname,split", "1,img_000.jpg,b,train", "0,img_001.jpg,a,test"])
    splits = load_splits(f"csv:{csv_path}")
    assert splits.classnames == ["a", "b"] and splits.train[0].label == 1


@pytest.mark.parametrize(
    "rows,names,needle",
    [
        (["path,label,split", "img_000.jpg,0,train", "img_001.jpg,5,test"], "a\nb\n",
         r"line 3: label 5 is out of range 0\.\.1 \(2 classes in classnames.txt\)"),
        (["path,label,split", "img_000.jpg,-1,train"], "a\nb\n", r"line 2: label -1 is out of range"),
        (["path,label,classname,split", "img_000.jpg,0,a,train", "img_001.jpg,2,c,test"], None,
         r"line 3: label 2 is out of range 0\.\.1"),
        (["path,label,split", "img_000.jpg,0,train", "missing.jpg,1,test"], "a\nb\n",
         r"line 3: image not found: .*missing\.jpg"),
        (["path,label,split", "img_000.jpg,0,training"], "a\n", "line 2: split 'training' is not one of"),
        (["path,label", "img_000.jpg,0"], None, "integer labels need class names"),
        (["file,label", "img_000.jpg,0"], None, "must be a header with columns 'path' and 'label'"),
        (["path,label,split", "img_000.jpg,0,train", "img_000.jpg,0,test"], "a\n", "already listed on line 2"),
        (["path,label,split", "img_000.jpg,c,train"], "a\nb\n", "class 'c' is not listed in classnames.txt"),
    ],
)
def test_csv_errors(tmp_path, rows, names, needle):
    _images(tmp_path, 2)
    if names is not None:
        (tmp_path / "classnames.txt").write_text(names)
    csv_path = _csv(tmp_path / "f.csv", rows)
    with pytest.raises(DataError, match=needle) as e:
        load_splits(f"csv:{csv_path}")
    assert str(csv_path) in str(e.value) or "classnames.txt" in str(e.value)


def test_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match="CSV dataset file .*none.csv not found"):
        load_splits(f"csv:{tmp_path / 'none.csv'}")
