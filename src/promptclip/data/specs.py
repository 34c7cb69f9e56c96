"""Declarative specs of the 15 benchmark datasets (CoOp's ``DATASETS.md`` layouts) and of the bundled sample.

A spec says where a dataset lives under the data root, how its splits are read (or generated when CoOp generates
them), its class renames, zero-shot template, expected split sizes and where to download it. The readers that act on
a spec live in :mod:`promptclip.data.datasets`; the download / verify steps in :mod:`promptclip.data.prepare`.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .templates import CUSTOM_TEMPLATES, ensemble_templates

__all__ = [
    "Download",
    "DatasetSpec",
    "list_datasets",
    "get_spec",
    "COOP_DATASETS",
    "CROSS_DATASET_TARGETS",
    "DG_TARGETS",
    "SAMPLE_DIR",
    "imagenet_classnames",
    "imagenet_wnids",
    "imagenet_a_wnids",
    "imagenet_r_wnids",
    "imagenet_subset_indices",
]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"


@dataclass(frozen=True)
class Download:
    """One file of a dataset's public distribution.

    ``checksum`` is ``"md5:<hex>"`` or ``"sha256:<hex>"`` (None when no checksum is published: the sha256 of the
    downloaded file is then reported). ``into`` is where an archive is extracted: ``"dataset"`` (the dataset folder)
    or ``"root"`` (the data root, for archives that already contain the dataset folder).
    """

    url: str
    filename: str
    checksum: str | None = None
    extract: bool = True
    into: str = "dataset"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    coop_name: str
    title: str
    dataset_dir: str
    image_dir: str
    template: str
    num_classes: int
    counts: Mapping[str, int | None]
    reader: str = "split"  # split | fgvc | imagenet | imagenet_v2 | imagenet_folders | imagenet_subset
    split_file: str | None = None
    generator: str | None = None  # folder | pets | sun397 | ucf101
    renames: Mapping[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    test_only: bool = False
    fewshot_val: bool = True
    counts_exact: bool = True
    subset_wnids: str | None = None  # "a" | "r": the fixed 200-wnid list the folders are checked against
    downloads: tuple[Download, ...] = ()
    nested_archives: tuple[str, ...] = ()
    moves: tuple[tuple[str, str], ...] = ()  # (source, destination) relative to the data root, after extraction
    split_url: str | None = None
    manual_steps: tuple[str, ...] = ()
    layout: str = ""
    bundled: bool = False
    notes: str = ""

    @property
    def templates(self) -> tuple[str, ...]:
        """The prompt ensemble of CoOp's ``ZeroshotCLIP2`` for this dataset."""
        return ensemble_templates(self.template, self.coop_name)

    def dataset_path(self, root: str | Path) -> Path:
        return Path(root) / self.dataset_dir

    def image_path(self, root: str | Path) -> Path:
        return self.dataset_path(root) / self.image_dir if self.image_dir else self.dataset_path(root)

    @property
    def has_split_generator(self) -> bool:
        return self.generator is not None or self.reader != "split"


def _counts(train: int | None, val: int | None, test: int | None) -> dict[str, int | None]:
    return {"train": train, "val": val, "test": test}


EUROSAT_RENAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}
CALTECH_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}

_DRIVE = "https://drive.google.com/file/d/{}/view?usp=sharing"
_IMAGENET_CLASSNAMES_STEP = (
    "classnames.txt is not needed: promptclip ships the CLIP class names CoOp's classnames.txt holds "
    "(src/promptclip/data/assets/imagenet_classnames.txt)."
)

_SPECS: tuple[DatasetSpec, ...] = (
    DatasetSpec(
        name="imagenet", coop_name="ImageNet", title="ImageNet (ILSVRC-2012)", dataset_dir="imagenet",
        image_dir="images", template=CUSTOM_TEMPLATES["ImageNet"], num_classes=1000,
        counts=_counts(1_281_167, 0, 50_000), reader="imagenet", fewshot_val=False,
        manual_steps=(
            "Download ILSVRC-2012 train and val from https://image-net.org (account required).",
            "Put (or symlink) them as ROOT/imagenet/images/train/<wnid>/*.JPEG and "
            "ROOT/imagenet/images/val/<wnid>/*.JPEG (val sorted into the 1000 wnid folders).",
            _IMAGENET_CLASSNAMES_STEP,
        ),
        layout="imagenet/\n  images/\n    train/   # 1000 folders n01440764, ...\n    val/     # same 1000 folders",
        notes="test = official val (50,000); no val split (CoOp evaluates the last epoch). The file listing is "
        "cached as split_promptclip_ImageNet.json.",
    ),
    DatasetSpec(
        name="caltech101", coop_name="Caltech101", title="Caltech101", dataset_dir="caltech-101",
        image_dir="101_ObjectCategories", template=CUSTOM_TEMPLATES["Caltech101"], num_classes=100,
        counts=_counts(4128, 1649, 2465), split_file="split_zhou_Caltech101.json", generator="folder",
        renames=CALTECH_RENAMES, ignored=("BACKGROUND_Google", "Faces_easy"),
        downloads=(Download("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip", "caltech-101.zip"),),
        nested_archives=("101_ObjectCategories.tar.gz",),
        split_url=_DRIVE.format("1hyarUivQE36mY6jSomru6Fjd-JzwcCzN"),
        layout="caltech-101/\n  101_ObjectCategories/\n  split_zhou_Caltech101.json",
    ),
    DatasetSpec(
        name="oxford_pets", coop_name="OxfordPets", title="Oxford-IIIT Pets", dataset_dir="oxford_pets",
        image_dir="images", template=CUSTOM_TEMPLATES["OxfordPets"], num_classes=37,
        counts=_counts(2944, 736, 3669), split_file="split_zhou_OxfordPets.json", generator="pets",
        downloads=(
            Download("https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz", "images.tar.gz",
                     "md5:5c4f3ee8e5d25df40f4fd59a7f44e54c"),
            Download("https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz", "annotations.tar.gz",
                     "md5:95a8c909bbe2e81eed6a22bccdf3f68f"),
        ),
        split_url=_DRIVE.format("1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs"),
        layout="oxford_pets/\n  images/\n  annotations/\n  split_zhou_OxfordPets.json",
    ),
    DatasetSpec(
        name="stanford_cars", coop_name="StanfordCars", title="Stanford Cars", dataset_dir="stanford_cars",
        image_dir="", template=CUSTOM_TEMPLATES["StanfordCars"], num_classes=196,
        counts=_counts(6509, 1635, 8041), split_file="split_zhou_StanfordCars.json",
        split_url=_DRIVE.format("1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT"),
        manual_steps=(
            "The original Stanford download links (ai.stanford.edu/~jkrause/car196) are offline; get cars_train/, "
            "cars_test/, devkit/ and cars_test_annos_withlabels.mat from a mirror of the original release.",
            "Put them under ROOT/stanford_cars/ (split file paths look like cars_train/00001.jpg).",
        ),
        layout="stanford_cars/\n  cars_train/\n  cars_test/\n  devkit/\n  cars_test_annos_withlabels.mat\n"
        "  split_zhou_StanfordCars.json",
        notes="CoOp generates this split from .mat annotations; promptclip does not read .mat files, so the split "
        "file is required.",
    ),
    DatasetSpec(
        name="oxford_flowers", coop_name="OxfordFlowers", title="Oxford Flowers102", dataset_dir="oxford_flowers",
        image_dir="jpg", template=CUSTOM_TEMPLATES["OxfordFlowers"], num_classes=102,
        counts=_counts(4093, 1633, 2463), split_file="split_zhou_OxfordFlowers.json",
        downloads=(
            Download("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz", "102flowers.tgz",
                     "md5:52808999861908f626f3c1f4e79d11fa"),
            Download("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat", "imagelabels.mat",
                     "md5:e0620be6f572b9609742df49c70aed4d", extract=False),
        ),
        split_url=_DRIVE.format("1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT"),
        manual_steps=(
            "Optional (CoOp only): cat_to_name.json from " + _DRIVE.format("1AkcxCXeK_RCGCEC_GvmWxjcjaNhu-at0")
            + "; promptclip takes the class names from the split file.",
        ),
        layout="oxford_flowers/\n  jpg/\n  imagelabels.mat\n  cat_to_name.json\n  split_zhou_OxfordFlowers.json",
        notes="CoOp generates this split from imagelabels.mat; promptclip does not read .mat files, so the split "
        "file is required.",
    ),
    DatasetSpec(
        name="food101", coop_name="Food101", title="Food-101", dataset_dir="food-101", image_dir="images",
        template=CUSTOM_TEMPLATES["Food101"], num_classes=101, counts=_counts(50_500, 20_200, 30_300),
        split_file="split_zhou_Food101.json", generator="folder",
        downloads=(Download("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", "food-101.tar.gz",
                            "md5:85eeb15f3717b99a5da872d97d918f87", into="root"),),
        split_url=_DRIVE.format("1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl"),
        layout="food-101/\n  images/\n  meta/\n  split_zhou_Food101.json",
    ),
    DatasetSpec(
        name="fgvc_aircraft", coop_name="FGVCAircraft", title="FGVC Aircraft (variants)", dataset_dir="fgvc_aircraft",
        image_dir="images", template=CUSTOM_TEMPLATES["FGVCAircraft"], num_classes=100,
        counts=_counts(3334, 3333, 3333), reader="fgvc",
        downloads=(Download("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                            "fgvc-aircraft-2013b.tar.gz", into="root"),),
        moves=(("fgvc-aircraft-2013b/data", "fgvc_aircraft"),),
        layout="fgvc_aircraft/\n  images/\n  variants.txt\n  images_variant_train.txt\n  images_variant_val.txt\n"
        "  images_variant_test.txt\n  ...",
        notes="Splits are the official images_variant_{train,val,test}.txt files (no JSON).",
    ),
    DatasetSpec(
        name="sun397", coop_name="SUN397", title="SUN397", dataset_dir="sun397", image_dir="SUN397",
        template=CUSTOM_TEMPLATES["SUN397"], num_classes=397, counts=_counts(15_880, 3970, 19_850),
        split_file="split_zhou_SUN397.json", generator="sun397",
        split_url=_DRIVE.format("1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq"),
        manual_steps=(
            "The original links (vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz and Partitions.zip) are often "
            "offline (CoOp#90); get SUN397.tar.gz and Partitions.zip from a mirror.",
            "Extract both under ROOT/sun397/ so that ROOT/sun397/SUN397/a/abbey/... and ROOT/sun397/ClassName.txt, "
            "Training_01.txt, Testing_01.txt exist.",
        ),
        layout="sun397/\n  SUN397/\n  ClassName.txt\n  Training_01.txt\n  Testing_01.txt\n  split_zhou_SUN397.json",
    ),
    DatasetSpec(
        name="dtd", coop_name="DescribableTextures", title="Describable Textures (DTD)", dataset_dir="dtd",
        image_dir="images", template=CUSTOM_TEMPLATES["DescribableTextures"], num_classes=47,
        counts=_counts(2820, 1128, 1692), split_file="split_zhou_DescribableTextures.json", generator="folder",
        downloads=(Download("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
                            "dtd-r1.0.1.tar.gz", "md5:fff73e5086ae6bdbea199a49dfb8a4c1", into="root"),),
        split_url=_DRIVE.format("1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"),
        layout="dtd/\n  images/\n  imdb/\n  labels/\n  split_zhou_DescribableTextures.json",
    ),
    DatasetSpec(
        name="eurosat", coop_name="EuroSAT", title="EuroSAT (RGB)", dataset_dir="eurosat", image_dir="2750",
        template=CUSTOM_TEMPLATES["EuroSAT"], num_classes=10, counts=_counts(13_500, 5400, 8100),
        split_file="split_zhou_EuroSAT.json", generator="folder", renames=EUROSAT_RENAMES,
        downloads=(Download(
            "https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/"
            "EuroSAT.zip", "EuroSAT.zip", "md5:c8fa014336c82ac7804f0398fcb19387"),),
        split_url=_DRIVE.format("1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o"),
        layout="eurosat/\n  2750/\n    AnnualCrop/AnnualCrop_1.jpg ...\n  split_zhou_EuroSAT.json",
    ),
    DatasetSpec(
        name="ucf101", coop_name="UCF101", title="UCF101 (middle frames)", dataset_dir="ucf101",
        image_dir="UCF-101-midframes", template=CUSTOM_TEMPLATES["UCF101"], num_classes=101,
        counts=_counts(7639, 1898, 3783), split_file="split_zhou_UCF101.json", generator="ucf101",
        split_url=_DRIVE.format("1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y"),
        manual_steps=(
            "Download UCF-101-midframes.zip (the middle frame of every video, made by CoOp's authors) from "
            + _DRIVE.format("10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O") + " and extract it to ROOT/ucf101/.",
        ),
        layout="ucf101/\n  UCF-101-midframes/\n  split_zhou_UCF101.json",
    ),
    DatasetSpec(
        name="imagenetv2", coop_name="ImageNetV2", title="ImageNet-V2 (matched frequency)", dataset_dir="imagenetv2",
        image_dir="imagenetv2-matched-frequency-format-val", template=CUSTOM_TEMPLATES["ImageNetV2"],
        num_classes=1000, counts=_counts(None, None, 10_000), reader="imagenet_v2", test_only=True,
        downloads=(Download("https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/"
                            "imagenetv2-matched-frequency.tar.gz", "imagenetv2-matched-frequency.tar.gz"),),
        manual_steps=(_IMAGENET_CLASSNAMES_STEP,),
        layout="imagenetv2/\n  imagenetv2-matched-frequency-format-val/\n    0/ 1/ ... 999/",
    ),
    DatasetSpec(
        name="imagenet_sketch", coop_name="ImageNetSketch", title="ImageNet-Sketch", dataset_dir="imagenet-sketch",
        image_dir="images", template=CUSTOM_TEMPLATES["ImageNetSketch"], num_classes=1000,
        counts=_counts(None, None, 50_889), counts_exact=False, reader="imagenet_folders", test_only=True,
        manual_steps=(
            "Download ImageNet-Sketch (https://github.com/HaohanWang/ImageNet-Sketch: Google Drive or Kaggle).",
            "Extract so that ROOT/imagenet-sketch/images/<wnid>/*.JPEG holds the 1000 class folders.",
            _IMAGENET_CLASSNAMES_STEP,
        ),
        layout="imagenet-sketch/\n  images/   # 1000 folders n01440764, ...",
    ),
    DatasetSpec(
        name="imagenet_a", coop_name="ImageNetA", title="ImageNet-A", dataset_dir="imagenet-adversarial",
        image_dir="imagenet-a", template=CUSTOM_TEMPLATES["ImageNetA"], num_classes=200,
        counts=_counts(None, None, 7500), reader="imagenet_subset", test_only=True, subset_wnids="a",
        downloads=(Download("https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar", "imagenet-a.tar"),),
        manual_steps=(_IMAGENET_CLASSNAMES_STEP,),
        layout="imagenet-adversarial/\n  imagenet-a/   # 200 folders n01498041, ...",
        notes="Classes = the sorted wnid folders present; logits over these 200 classes only.",
    ),
    DatasetSpec(
        name="imagenet_r", coop_name="ImageNetR", title="ImageNet-R", dataset_dir="imagenet-rendition",
        image_dir="imagenet-r", template=CUSTOM_TEMPLATES["ImageNetR"], num_classes=200,
        counts=_counts(None, None, 30_000), reader="imagenet_subset", test_only=True, subset_wnids="r",
        downloads=(Download("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar", "imagenet-r.tar"),),
        manual_steps=(_IMAGENET_CLASSNAMES_STEP,),
        layout="imagenet-rendition/\n  imagenet-r/   # 200 folders n01443537, ...",
        notes="Classes = the sorted wnid folders present; logits over these 200 classes only.",
    ),
    DatasetSpec(
        name="eurosat-sample", coop_name="EuroSAT", title="EuroSAT sample (bundled, 500 images)",
        dataset_dir="eurosat", image_dir="2750", template=CUSTOM_TEMPLATES["EuroSAT"], num_classes=10,
        counts=_counts(160, 40, 300), split_file="split_zhou_EuroSAT.json", renames=EUROSAT_RENAMES, bundled=True,
        layout="(inside the package) promptclip/data/sample/eurosat/\n  2750/<Class>/*.jpg\n  split_zhou_EuroSAT.json",
        notes="16 train + 4 val + 30 test images per class, drawn from a generated full-EuroSAT split; no root needed.",
    ),
)

_BY_NAME = {s.name: s for s in _SPECS}

#: The 11 CoOp datasets (base-to-novel and few-shot protocols), in the papers' table order.
COOP_DATASETS: tuple[str, ...] = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397",
    "dtd", "eurosat", "ucf101",
)
#: Targets of cross-dataset transfer (source: ImageNet).
CROSS_DATASET_TARGETS: tuple[str, ...] = COOP_DATASETS[1:]
#: Targets of domain generalisation (source: ImageNet).
DG_TARGETS: tuple[str, ...] = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _aliases() -> dict[str, str]:
    table: dict[str, str] = {}
    for s in _SPECS:
        table[_norm(s.name)] = s.name
        if not s.bundled:
            table[_norm(s.coop_name)] = s.name
            table[_norm(s.dataset_dir)] = s.name
    extra = {
        "flowers102": "oxford_flowers", "flowers": "oxford_flowers", "pets": "oxford_pets", "cars": "stanford_cars",
        "aircraft": "fgvc_aircraft", "describabletextures": "dtd", "imagenetadversarial": "imagenet_a",
        "imagenetrendition": "imagenet_r", "ucf": "ucf101", "eurosatsample": "eurosat-sample",
        "sample": "eurosat-sample",
    }
    table.update(extra)
    return table


_ALIASES = _aliases()


def list_datasets() -> list[str]:
    """Names accepted by :func:`get_spec` / ``load_splits``: the 15 benchmarks, then the bundled ``eurosat-sample``."""
    return [s.name for s in _SPECS]


def get_spec(name: str) -> DatasetSpec:
    """A dataset's spec, by canonical name or alias (CoOp class name, folder name; case, ``-`` and ``_`` ignored)."""
    if isinstance(name, DatasetSpec):
        return name
    key = _ALIASES.get(_norm(str(name)))
    if key is None:
        known = list_datasets()
        close = difflib.get_close_matches(str(name).lower(), known, n=1, cutoff=0.5)
        if not close:
            close = [
                _ALIASES[c] for c in difflib.get_close_matches(_norm(str(name)), list(_ALIASES), n=1, cutoff=0.6)
            ]
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataError(
            f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(known)}. Custom datasets: 'folder:PATH' "
            "(one sub-folder per class) or 'csv:PATH' (columns path,label[,split])."
        )
    return _BY_NAME[key]


# --------------------------------------------------------------------------------------------------------------------
# ImageNet class lists
# --------------------------------------------------------------------------------------------------------------------


@functools.cache
def _imagenet_table() -> tuple[tuple[str, ...], tuple[str, ...]]:
    wnids, names = [], []
    with open(ASSETS_DIR / "imagenet_classnames.txt", encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                wnid, name = line.split(" ", 1)
                wnids.append(wnid)
                names.append(name)
    return tuple(wnids), tuple(names)


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet wnids in label order."""
    return list(_imagenet_table()[0])


def imagenet_classnames() -> list[str]:
    """The 1000 CLIP ImageNet class names (CoOp's ``classnames.txt``) in label order."""
    return list(_imagenet_table()[1])


def imagenet_wnid_to_name() -> dict[str, str]:
    wnids, names = _imagenet_table()
    return dict(zip(wnids, names, strict=True))


@functools.cache
def _read_wnid_list(fname: str) -> tuple[str, ...]:
    with open(ASSETS_DIR / fname, encoding="utf-8") as f:
        return tuple(line.strip() for line in f if line.strip())


def imagenet_a_wnids() -> list[str]:
    """The fixed list of ImageNet-A's 200 wnids (sorted), used to check the folders present."""
    return list(_read_wnid_list("imagenet_a_wnids.txt"))


def imagenet_r_wnids() -> list[str]:
    """The fixed list of ImageNet-R's 200 wnids (sorted), used to check the folders present."""
    return list(_read_wnid_list("imagenet_r_wnids.txt"))


def imagenet_subset_indices(wnids: list[str]) -> list[int]:
    """ImageNet label (0..999) of every wnid, e.g. to restrict a 1000-way head to ImageNet-A/-R's classes."""
    index = {w: i for i, w in enumerate(_imagenet_table()[0])}
    missing = [w for w in wnids if w not in index]
    if missing:
        raise DataError(f"wnid(s) not among the 1000 ImageNet classes: {missing[:10]}")
    return [index[w] for w in wnids]
