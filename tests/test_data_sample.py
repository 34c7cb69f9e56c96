"""The bundled real-image EuroSAT sample (promptclip/data/sample/eurosat)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import promptclip.data
from promptclip.data import get_spec, load_splits, protocol_splits, verify

SAMPLE = Path(promptclip.data.__file__).parent / "sample" / "eurosat"
# SPEC 4.1: folders in sorted order and CoOp's renamed class names
FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake"]
NAMES = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
         "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"]


@pytest.fixture(scope="module")
def sample():
    return load_splits("eurosat-sample")  # no root needed


def test_sample_classes_and_counts(sample):
    assert sample.classnames == NAMES
    assert sample.template == "a centered satellite photo of {}."
    for part, k in (("train", 16), ("val", 4), ("test", 30)):
        assert Counter(r.label for r in sample.split(part)) == {y: k for y in range(10)}, part


def test_split_file_agrees_with_the_files(sample):
    on_disk = {p.relative_to(SAMPLE / "2750").as_posix() for p in (SAMPLE / "2750").rglob("*") if p.is_file()}
    records = sample.train + sample.val + sample.test
    assert len(on_disk) == 500
    assert {r.relpath for r in records} == on_disk and len(records) == 500
    raw = json.loads((SAMPLE / "split_zhou_EuroSAT.json").read_text())
    assert sorted(raw) == ["test", "train", "val"]
    for relpath, label, classname in raw["train"] + raw["val"] + raw["test"]:
        folder, fname = relpath.split("/")
        assert label == FOLDERS.index(folder) and classname == NAMES[label]
        assert fname.startswith(folder + "_") and fname.endswith(".jpg")


def test_sample_images_decode_and_size(sample):
    total = 0
    for r in sample.train + sample.val + sample.test:
        with Image.open(r.path) as im:
            im.load()
            assert im.size == (64, 64) and im.mode == "RGB"
        total += Path(r.path).stat().st_size
    assert 1_000_000 < total < 2_500_000


def test_sample_provenance_readme():
    text = (SAMPLE / "README.md").read_text()
    for needle in ("Helber", "MIT", "tools/make_eurosat_sample.py", "--sample-seed", "13,500 / 5,400 / 8,100"):
        assert needle in text


def test_sample_16_shot_base_to_novel():
    before = sorted(p.name for p in SAMPLE.iterdir())
    base = protocol_splits("eurosat-sample", num_shots=16, seed=1, subsample="base")
    new = protocol_splits("eurosat-sample", num_shots=16, seed=1, subsample="new")
    assert base.classnames == NAMES[:5] and new.classnames == NAMES[5:]
    assert base.counts() == {"train": 80, "val": 20, "test": 150}
    assert new.counts() == {"train": 80, "val": 20, "test": 150}
    assert {r.label for r in new.train} == set(range(5))
    assert all(new.classnames[r.label] == r.classname for r in new.train + new.test)
    assert sorted(p.name for p in SAMPLE.iterdir()) == before  # the package folder is never written to
    few = protocol_splits("eurosat-sample", num_shots=2, seed=3)
    assert len(few.train) == 20 and len(few.val) == 20 and len(few.test) == 300


def test_sample_verifies_clean():
    report = verify("eurosat-sample", quiet=True)
    assert report.ok, str(report)
    assert report.images_on_disk == 500 and report.decoded == 500
    assert report.counts == dict(get_spec("eurosat-sample").counts)
