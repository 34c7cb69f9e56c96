"""Dataset specs, templates, class renames, ImageNet class lists and the ImageNet-A/-R 200-class mapping.

Expected values are transcribed from SPEC sections 3.1 / 4.1 (CoOp's DATASETS.md and zsclip.py), not from the code.
"""

from __future__ import annotations

import pytest

from promptclip.data import (
    COOP_DATASETS,
    CROSS_DATASET_TARGETS,
    DG_TARGETS,
    IMAGENET_TEMPLATES,
    IMAGENET_TEMPLATES_SELECT,
    PROMPTSRC_TEMPLATES,
    get_spec,
    imagenet_a_wnids,
    imagenet_classnames,
    imagenet_r_wnids,
    imagenet_subset_indices,
    imagenet_wnids,
    list_datasets,
    load_splits,
)
from promptclip.errors import DataError

# name: (folder, classes, template, (train, val, test), split file)
TABLE = {
    "imagenet": ("imagenet", 1000, "a photo of a {}.", (1_281_167, 0, 50_000), None),
    "caltech101": ("caltech-101", 100, "a photo of a {}.", (4128, 1649, 2465), "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", 37, "a photo of a {}, a type of pet.", (2944, 736, 3669),
                    "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", 196, "a photo of a {}.", (6509, 1635, 8041), "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", 102, "a photo of a {}, a type of flower.", (4093, 1633, 2463),
                       "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", 101, "a photo of {}, a type of food.", (50_500, 20_200, 30_300), "split_zhou_Food101.json"),
    "fgvc_aircraft": ("fgvc_aircraft", 100, "a photo of a {}, a type of aircraft.", (3334, 3333, 3333), None),
    "sun397": ("sun397", 397, "a photo of a {}.", (15_880, 3970, 19_850), "split_zhou_SUN397.json"),
    "dtd": ("dtd", 47, "{} texture.", (2820, 1128, 1692), "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", 10, "a centered satellite photo of {}.", (13_500, 5400, 8100), "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", 101, "a photo of a person doing {}.", (7639, 1898, 3783), "split_zhou_UCF101.json"),
    "imagenetv2": ("imagenetv2", 1000, "a photo of a {}.", (None, None, 10_000), None),
    "imagenet_sketch": ("imagenet-sketch", 1000, "a photo of a {}.", (None, None, 50_889), None),
    "imagenet_a": ("imagenet-adversarial", 200, "a photo of a {}.", (None, None, 7500), None),
    "imagenet_r": ("imagenet-rendition", 200, "a photo of a {}.", (None, None, 30_000), None),
    "eurosat-sample": ("eurosat", 10, "a centered satellite photo of {}.", (160, 40, 300), "split_zhou_EuroSAT.json"),
}

RENAMES = {
    "eurosat": {
        "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
        "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
        "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
        "SeaLake": "Sea or Lake",
    },
    "caltech101": {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"},
}
RENAMES["eurosat-sample"] = RENAMES["eurosat"]

SELECT_7 = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
            "a {} in a video game.", "art of the {}.", "a photo of the small {}."]


def test_list_datasets_covers_the_spec_table():
    assert sorted(list_datasets()) == sorted(TABLE)
    assert len([n for n in list_datasets() if not get_spec(n).bundled]) == 15
    assert set(COOP_DATASETS) | set(DG_TARGETS) | {"eurosat-sample"} == set(TABLE)
    assert len(COOP_DATASETS) == 11 and len(CROSS_DATASET_TARGETS) == 10 and "imagenet" not in CROSS_DATASET_TARGETS


@pytest.mark.parametrize("name", list_datasets())
def test_spec_matches_table(name):
    spec = get_spec(name)
    folder, classes, template, counts, split_file = TABLE[name]
    assert spec.dataset_dir == folder
    assert spec.num_classes == classes
    assert spec.template == template
    assert template.count("{}") == 1
    assert (spec.counts["train"], spec.counts["val"], spec.counts["test"]) == counts
    assert spec.split_file == split_file
    assert dict(spec.renames) == RENAMES.get(name, {})
    # CoOp's ZeroshotCLIP2 ensemble: the 7 selected templates, plus the dataset's own unless it is ImageNet
    expected = SELECT_7 if name == "imagenet" else SELECT_7 + [template]
    assert list(spec.templates) == expected
    if spec.test_only:
        assert spec.counts["train"] is None and spec.reader.startswith("imagenet")
    # every dataset either downloads or explains how to get it
    assert spec.bundled or spec.downloads or spec.manual_steps


def test_caltech_ignores_the_two_extra_folders():
    assert set(get_spec("caltech101").ignored) == {"BACKGROUND_Google", "Faces_easy"}


@pytest.mark.parametrize(
    "alias,name",
    [("EuroSAT", "eurosat"), ("DescribableTextures", "dtd"), ("OxfordFlowers", "oxford_flowers"),
     ("flowers102", "oxford_flowers"), ("food-101", "food101"), ("ImageNet-A", "imagenet_a"),
     ("imagenet-sketch", "imagenet_sketch"), ("eurosat_sample", "eurosat-sample"), ("Caltech101", "caltech101")],
)
def test_aliases(alias, name):
    assert get_spec(alias).name == name


def test_unknown_dataset_lists_known_names_and_suggests():
    with pytest.raises(DataError) as e:
        get_spec("eurosatt")
    msg = str(e.value)
    assert "unknown dataset 'eurosatt'" in msg
    assert "Did you mean 'eurosat'" in msg
    for n in ("imagenet", "dtd", "ucf101", "eurosat-sample"):
        assert n in msg
    with pytest.raises(DataError, match="unknown dataset 'no_such_thing'"):
        load_splits("no_such_thing")


def test_template_lists():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert list(IMAGENET_TEMPLATES_SELECT) == SELECT_7
    assert set(IMAGENET_TEMPLATES_SELECT) <= set(IMAGENET_TEMPLATES)
    assert len(PROMPTSRC_TEMPLATES) == 60 and len(set(PROMPTSRC_TEMPLATES)) == 60
    assert PROMPTSRC_TEMPLATES[0] == "a photo of a {}."
    assert set(PROMPTSRC_TEMPLATES) <= set(IMAGENET_TEMPLATES)
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)


def test_imagenet_classnames():
    wnids, names = imagenet_wnids(), imagenet_classnames()
    assert len(wnids) == len(set(wnids)) == 1000 and wnids == sorted(wnids)
    assert len(names) == 1000
    # CLIP's cleaned names (not WordNet's first lemmas)
    assert names[:7] == ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray",
                         "stingray"]
    assert wnids[:2] == ["n01440764", "n01443537"] and wnids[-1] == "n15075141"
    assert names[-1] == "toilet paper"


@pytest.mark.parametrize(
    "which,get,first", [("a", imagenet_a_wnids, "n01498041"), ("r", imagenet_r_wnids, "n01443537")]
)
def test_imagenet_ar_200_class_mapping(which, get, first):
    wnids = get()
    assert len(wnids) == 200 and len(set(wnids)) == 200 and wnids == sorted(wnids)
    all_wnids = imagenet_wnids()
    assert set(wnids) <= set(all_wnids)
    idx = imagenet_subset_indices(wnids)
    assert [all_wnids[i] for i in idx] == wnids
    assert idx == sorted(idx) and len(set(idx)) == 200
    assert wnids[0] == first
    # n01498041 (stingray) is ImageNet class 6; n01443537 (goldfish) is class 1
    assert idx[0] == {"n01498041": 6, "n01443537": 1}[first]


def test_subset_indices_rejects_unknown_wnid():
    with pytest.raises(DataError, match="n99999999"):
        imagenet_subset_indices(["n01440764", "n99999999"])
