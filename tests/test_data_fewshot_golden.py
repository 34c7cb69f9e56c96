"""Golden equality of the Dassl few-shot sampler + CoCoOp base/novel subsampling (tests/golden/fewshot_dtd.json).

Everything is driven by the golden file: its runs ("seed{S}_shots{K}_{sub}"), its split file name and checksum, its
test lists. The DTD images are not available: the records come from the split file alone (an empty images/ folder),
so no image is ever opened.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from promptclip.data import fewshot, fewshot_splits, get_spec, list_datasets, load_splits, subsample_classes

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN = json.loads((GOLDEN_DIR / "fewshot_dtd.json").read_text())
RUN_RE = re.compile(r"seed(\d+)_shots(\d+)_(all|base|new)")


def _spec_for_split_file(fname: str):
    matches = [get_spec(n) for n in list_datasets() if get_spec(n).split_file == fname and not get_spec(n).bundled]
    assert len(matches) == 1, fname
    return matches[0]


@pytest.fixture(scope="module")
def full_splits(tmp_path_factory):
    split_name = GOLDEN["meta"]["split"]["file"]
    src = GOLDEN_DIR / split_name
    assert hashlib.sha256(src.read_bytes()).hexdigest() == GOLDEN["meta"]["split"]["sha256"]
    spec = _spec_for_split_file(split_name)
    root = tmp_path_factory.mktemp("golden_root")
    (root / spec.dataset_dir / spec.image_dir).mkdir(parents=True)  # empty: images are never opened
    shutil.copy(src, root / spec.dataset_dir / split_name)
    splits = load_splits(spec.name, root, write_split=False)
    assert splits.counts() == GOLDEN["meta"]["split"]["counts"]
    return splits


def _pairs(records):
    return [[r.relpath, r.label] for r in records]


@pytest.mark.parametrize("run", sorted(GOLDEN["runs"]))
def test_fewshot_and_subsample_match_golden(full_splits, run):
    m = RUN_RE.fullmatch(run)
    assert m, run
    seed, shots, sub = int(m.group(1)), int(m.group(2)), m.group(3)
    expected = GOLDEN["runs"][run]

    out = subsample_classes(fewshot_splits(full_splits, shots, seed), sub)

    assert _pairs(out.train) == expected["train"]
    assert _pairs(out.val) == expected["val"]
    assert out.classnames == expected["classnames"]
    assert _pairs(out.test) == GOLDEN["test"][sub]
    # every record keeps a class name consistent with its (relabelled) label
    assert all(out.classnames[r.label] == r.classname for r in out.train + out.val + out.test)


@pytest.mark.parametrize("run", sorted(r for r in GOLDEN["runs"] if r.endswith("_all")))
def test_train_then_val_share_one_stream(full_splits, run):
    """The val selection is the continuation of the train stream: sampling val from a fresh seed must differ."""
    m = RUN_RE.fullmatch(run)
    seed, shots = int(m.group(1)), int(m.group(2))
    expected_val = GOLDEN["runs"][run]["val"]
    assert _pairs(fewshot(full_splits.train, shots, seed)) == GOLDEN["runs"][run]["train"]
    fresh_val = _pairs(fewshot(full_splits.val, min(shots, 4), seed))
    assert fresh_val != expected_val


def test_sampler_does_not_touch_global_random(full_splits):
    import random

    state = random.getstate()
    fewshot_splits(full_splits, 16, 1)
    assert random.getstate() == state
