"""The benchmark readers on tiny synthetic layouts (CoOp's DATASETS.md trees; images are empty files, never opened)."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptclip.data import imagenet_a_wnids, imagenet_classnames, imagenet_wnids, load_splits, protocol_splits, verify
from promptclip.errors import DataError


def _touch(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_caltech_ignores_folders_and_renames(tmp_path):
    img = tmp_path / "caltech-101" / "101_ObjectCategories"
    for folder in ("BACKGROUND_Google", "Faces_easy", "Faces", "Leopards", "airplanes", "accordion"):
        for i in range(1, 11):
            _touch(img / folder / f"image_{i:04d}.jpg")
    s = load_splits("caltech101", tmp_path)
    # sorted folder order (upper case first), then renamed
    assert s.classnames == ["face", "leopard", "accordion", "airplane"]
    assert s.counts() == {"train": 20, "val": 8, "test": 12}
    assert (tmp_path / "caltech-101" / "split_zhou_Caltech101.json").is_file()


def test_oxford_pets_trainval_generator(tmp_path):
    ds = tmp_path / "oxford_pets"
    (ds / "images").mkdir(parents=True)
    (ds / "annotations").mkdir()
    trainval = [f"Abyssinian_{i} 1 1 1" for i in range(1, 11)] + [f"american_bulldog_{i} 2 2 1" for i in range(1, 4)]
    (ds / "annotations" / "trainval.txt").write_text("\n".join(trainval) + "\n")
    (ds / "annotations" / "test.txt").write_text("Abyssinian_100 1 1 1\namerican_bulldog_100 2 2 1\n")
    s = load_splits("oxford_pets", tmp_path)
    assert s.classnames == ["abyssinian", "american_bulldog"]
    # round(10 * 0.2) = 2 and round(3 * 0.2) = 1 go to val
    assert [sum(r.label == y for r in s.val) for y in (0, 1)] == [2, 1]
    assert len(s.train) == 10 and [r.relpath for r in s.test] == ["Abyssinian_100.jpg", "american_bulldog_100.jpg"]


def test_sun397_generator_class_names(tmp_path):
    ds = tmp_path / "sun397"
    (ds / "SUN397").mkdir(parents=True)
    (ds / "ClassName.txt").write_text("/a/abbey\n/b/bakery/shop\n")
    train = [f"/a/abbey/sun_{i}.jpg" for i in range(5)] + [f"/b/bakery/shop/sun_{i}.jpg" for i in range(5)]
    (ds / "Training_01.txt").write_text("\n".join(train) + "\n")
    (ds / "Testing_01.txt").write_text("/b/bakery/shop/sun_9.jpg\n")
    s = load_splits("sun397", tmp_path)
    assert s.classnames == ["abbey", "shop bakery"]
    assert s.test[0].relpath == "b/bakery/shop/sun_9.jpg" and s.test[0].label == 1
    assert len(s.val) == 2


def test_ucf101_generator_renames_actions(tmp_path):
    ds = tmp_path / "ucf101"
    (ds / "UCF-101-midframes").mkdir(parents=True)
    lists = ds / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 YoYo\n")
    (lists / "trainlist01.txt").write_text(
        "".join(f"ApplyEyeMakeup/v_ApplyEyeMakeup_g0{i}_c01.avi 1\n" for i in range(5))
        + "".join(f"YoYo/v_YoYo_g0{i}_c01.avi 2\n" for i in range(5))
    )
    (lists / "testlist01.txt").write_text("YoYo/v_YoYo_g25_c01.avi\n")
    s = load_splits("ucf101", tmp_path)
    assert s.classnames == ["Apply_Eye_Makeup", "Yo_Yo"]
    assert s.test[0].relpath == "Yo_Yo/v_YoYo_g25_c01.jpg"


def test_fgvc_aircraft_txt_splits(tmp_path):
    ds = tmp_path / "fgvc_aircraft"
    (ds / "images").mkdir(parents=True)
    (ds / "variants.txt").write_text("707-320\nF/A-18\nA300B4\n")
    (ds / "images_variant_train.txt").write_text("0001 707-320\n0002 F/A-18\n0003 A300B4\n")
    (ds / "images_variant_val.txt").write_text("0004 F/A-18\n")
    (ds / "images_variant_test.txt").write_text("0005 A300B4\n")
    s = load_splits("fgvc_aircraft", tmp_path)
    assert s.classnames == ["707-320", "F/A-18", "A300B4"]
    assert [(r.relpath, r.label) for r in s.train] == [("0001.jpg", 0), ("0002.jpg", 1), ("0003.jpg", 2)]
    assert s.test[0].label == 2
    (ds / "images_variant_test.txt").write_text("0005 Boeing 999\n")
    with pytest.raises(DataError, match=r"images_variant_test.txt line 1: variant 'Boeing 999' is not in variants"):
        load_splits("fgvc_aircraft", tmp_path)


def test_imagenet_folders_and_listing_cache(tmp_path):
    wnids = imagenet_wnids()
    chosen = [wnids[0], wnids[4], wnids[999]]
    for part in ("train", "val"):
        for w in chosen:
            for i in range(3 if part == "train" else 1):
                _touch(tmp_path / "imagenet" / "images" / part / w / f"{w}_{i}.JPEG")
    s = load_splits("imagenet", tmp_path)
    assert s.classnames == ["tench", "hammerhead shark", "toilet paper"]
    assert s.wnids == chosen
    assert s.counts() == {"train": 9, "val": 0, "test": 3}
    assert s.test[0].relpath == f"val/{chosen[0]}/{chosen[0]}_0.JPEG"
    assert (tmp_path / "imagenet" / "split_promptclip_ImageNet.json").is_file()
    cached = load_splits("imagenet", tmp_path)
    assert cached.meta["split_source"] == "listing cache" and cached.train == s.train and cached.wnids == chosen
    # ImageNet: no few-shot val (CoOp), train K per class
    fs = protocol_splits("imagenet", tmp_path, num_shots=2, seed=1)
    assert len(fs.train) == 6 and fs.val == [] and len(fs.test) == 3


def test_imagenet_v2_numbered_folders(tmp_path):
    img = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for i in range(1000):
        _touch(img / str(i) / f"{i}.jpeg")
    s = load_splits("imagenetv2", tmp_path)
    assert s.num_classes == 1000 and s.classnames == imagenet_classnames()
    assert len(s.test) == 1000 and s.train == [] and s.val == []
    assert [(r.relpath, r.label, r.classname) for r in (s.test[4], s.test[999])] == [
        ("4/4.jpeg", 4, "hammerhead shark"), ("999/999.jpeg", 999, "toilet paper"),
    ]
    (img / "17" / "17.jpeg").unlink()
    with pytest.raises(DataError, match="class folder .*/17 contains no images"):
        load_splits("imagenetv2", tmp_path)


def test_imagenet_a_classes_are_the_folders_present(tmp_path):
    img = tmp_path / "imagenet-adversarial" / "imagenet-a"
    a = imagenet_a_wnids()
    present = [a[10], a[0], a[199]]
    for w in present:
        _touch(img / w / "x.jpg")
    (img / "README.txt").write_text("not a class")
    s = load_splits("imagenet_a", tmp_path)
    assert s.wnids == sorted(present) and s.num_classes == 3
    all_wnids = imagenet_wnids()
    assert [all_wnids[i] for i in s.imagenet_indices] == s.wnids
    assert s.classnames == [imagenet_classnames()[i] for i in s.imagenet_indices]
    assert [r.label for r in s.test] == [0, 1, 2]
    report = verify("imagenet_a", tmp_path, quiet=True, decode=False)
    assert any("differ from the fixed 200-wnid list" in p for p in report.problems)
    assert any("3 classes, expected 200" in p for p in report.problems)


def test_imagenet_r_rejects_non_wnid_folders(tmp_path):
    _touch(tmp_path / "imagenet-rendition" / "imagenet-r" / "not_a_wnid" / "x.jpg")
    with pytest.raises(DataError, match="not ImageNet wnids"):
        load_splits("imagenet_r", tmp_path)
