"""ImageDataset / make_loader: explicit randomness, worker independence, extras, and missing / corrupt images."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from promptclip.data import ImageDataset, Record, load_splits, make_loader
from promptclip.errors import DataError


def tiny_transform(img, generator=None):
    """Resize to 32, to a CHW float tensor; with a generator, a random flip and noise drawn from it only."""
    t = torch.from_numpy(np.asarray(img.resize((32, 32)), dtype=np.float32) / 255.0).permute(2, 0, 1)
    if generator is not None:
        if torch.rand((), generator=generator) < 0.5:
            t = t.flip(-1)
        t = t + 0.05 * torch.randn(t.shape, generator=generator)
    return t


def eval_transform(img, generator=None):
    return torch.from_numpy(np.asarray(img.resize((32, 32)), dtype=np.float32) / 255.0).permute(2, 0, 1)


@pytest.fixture(scope="module")
def records():
    s = load_splits("eurosat-sample")
    return s.train[::4]  # 40 real JPEGs, all 10 classes


def _run(loader, epochs=2):
    out = []
    for _ in range(epochs):
        out.append([(b["index"].clone(), b["image"].clone(), b["label"].clone()) for b in loader])
    return out


def test_batches(records):
    ds = ImageDataset(records, eval_transform)
    b = next(iter(make_loader(ds, batch_size=8, shuffle=False, seed=0)))
    assert b["image"].shape == (8, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["label"].tolist() == [r.label for r in records[:8]]
    assert b["index"].tolist() == list(range(8))
    assert b["path"] == [r.path for r in records[:8]]


def test_same_result_for_any_worker_count_and_epochs_differ(records):
    runs = []
    for workers in (0, 2):
        ds = ImageDataset(records, tiny_transform, seed=7)
        runs.append(_run(make_loader(ds, batch_size=6, shuffle=True, seed=11, num_workers=workers)))
    for e in range(2):
        for (i0, x0, y0), (i1, x1, y1) in zip(runs[0][e], runs[1][e], strict=True):
            assert torch.equal(i0, i1) and torch.equal(x0, x1) and torch.equal(y0, y1)
    order = [torch.cat([i for i, _, _ in epoch]).tolist() for epoch in runs[0]]
    assert sorted(order[0]) == list(range(len(records))) and order[0] != order[1]
    # labels always follow the record index
    for i, _, y in runs[0][0]:
        assert y.tolist() == [records[k].label for k in i.tolist()]


def test_augmentation_depends_on_seed_epoch_index_only(records):
    a = ImageDataset(records, tiny_transform, seed=1)
    b = ImageDataset(records, tiny_transform, seed=1)
    assert torch.equal(a[5]["image"], b[5]["image"])
    _ = b[3]  # fetching other samples first changes nothing
    assert torch.equal(a[6]["image"], b[6]["image"])
    b.set_epoch(1)
    assert not torch.equal(a[5]["image"], b[5]["image"])
    c = ImageDataset(records, tiny_transform, seed=2)
    assert not torch.equal(a[5]["image"], c[5]["image"])


def test_set_epoch_reproduces_an_epoch(records):
    loader = make_loader(ImageDataset(records, tiny_transform, seed=3), batch_size=10, shuffle=True, seed=4)
    first = _run(loader, epochs=3)
    loader.set_epoch(2)
    again = _run(loader, epochs=1)[0]
    for (i0, x0, _), (i1, x1, _) in zip(first[2], again, strict=True):
        assert torch.equal(i0, i1) and torch.equal(x0, x1)


def test_global_rng_untouched(records):
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    _run(make_loader(ImageDataset(records, tiny_transform), batch_size=8, shuffle=True, seed=0))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state, strict=True))


def test_extras_by_sequence_and_by_key(records):
    captions = {r.relpath: f"caption of {r.relpath}" for r in records}
    scores = [float(i) for i in range(len(records))]
    ds = ImageDataset(records, eval_transform, extras={"caption": captions, "score": scores})
    batch = next(iter(make_loader(ds, batch_size=5, shuffle=True, seed=9)))
    idx = batch["index"].tolist()
    assert batch["caption"] == [f"caption of {records[i].relpath}" for i in idx]
    assert batch["score"].tolist() == [float(i) for i in idx]
    with pytest.raises(DataError, match="has 3 values for 40 records"):
        ImageDataset(records, eval_transform, extras={"caption": ["a", "b", "c"]})
    missing = ImageDataset(records, eval_transform, extras={"caption": {}})
    with pytest.raises(DataError, match="extra 'caption' has no entry for image"):
        missing[0]


@pytest.fixture
def broken(tmp_path, records):
    """Eight records: real JPEGs, a corrupt file, a truncated JPEG and a missing file, with distinct labels."""
    recs = []
    for i, r in enumerate(records[:8]):
        dest = tmp_path / f"im{i}.jpg"
        shutil.copy(r.path, dest)
        recs.append(Record(str(dest), i, f"c{i}", dest.name))
    Path(recs[2].path).write_bytes(b"this is not a jpeg")
    data = Path(records[0].path).read_bytes()
    Path(recs[5].path).write_bytes(data[: len(data) // 3])
    Path(recs[6].path).unlink()
    return recs


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_raises_naming_the_file(broken, workers):
    loader = make_loader(ImageDataset(broken, eval_transform), batch_size=4, shuffle=False, seed=0,
                         num_workers=workers)
    with pytest.raises(DataError, match=r"cannot decode image .*im2\.jpg"):
        list(loader)


def test_truncated_and_missing_images_raise(broken):
    ds = ImageDataset(broken, eval_transform)
    with pytest.raises(DataError, match=r"cannot decode image .*im5\.jpg"):
        ds[5]
    with pytest.raises(DataError, match=r"image file not found: .*im6\.jpg"):
        ds[6]


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_mode_drops_bad_samples_with_their_labels(broken, workers):
    ds = ImageDataset(broken, eval_transform, on_error="skip")
    loader = make_loader(ds, batch_size=3, shuffle=True, seed=1, num_workers=workers)
    with pytest.warns(UserWarning, match="skipped 3 of 8 images"):
        batches = list(loader)
    seen = {}
    for b in batches:
        for i, y in zip(b["index"].tolist(), b["label"].tolist(), strict=True):
            seen[i] = y
    assert sorted(seen) == [0, 1, 3, 4, 7]
    assert all(seen[i] == broken[i].label for i in seen)  # never a shifted label
    assert sorted(Path(s.path).name for s in loader.skipped) == ["im2.jpg", "im5.jpg", "im6.jpg"]


def test_bad_arguments(records):
    with pytest.raises(DataError, match="on_error"):
        ImageDataset(records, eval_transform, on_error="ignore")
    with pytest.raises(DataError, match="clashes"):
        ImageDataset(records, eval_transform, extras={"label": [0] * len(records)})
