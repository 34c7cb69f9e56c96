"""Datasets and the CoOp benchmark protocol: specs, split files, Dassl-identical few-shot sampling, base/novel
subsampling, custom folder / CSV datasets, the bundled EuroSAT sample, loaders, and prepare / verify."""

from .datasets import load_splits, protocol_splits
from .files import IMAGE_EXTENSIONS
from .folder import load_csv_dataset, load_folder_dataset
from .loader import ImageDataset, PromptLoader, SeededShuffleSampler, make_loader, open_image
from .prepare import PrepareReport, VerifyReport, download_file, extract_archive, prepare, verify
from .protocol import (
    DEFAULT_SPLIT_SEED,
    fewshot,
    fewshot_splits,
    import_dassl_fewshot,
    load_dassl_pickle,
    load_fewshot_cache,
    read_split,
    save_fewshot_cache,
    subsample_classes,
    write_split,
)
from .records import DatasetSplits, Record
from .specs import (
    COOP_DATASETS,
    CROSS_DATASET_TARGETS,
    DG_TARGETS,
    DatasetSpec,
    Download,
    get_spec,
    imagenet_a_wnids,
    imagenet_classnames,
    imagenet_r_wnids,
    imagenet_subset_indices,
    imagenet_wnids,
    list_datasets,
)
from .templates import (
    CUSTOM_TEMPLATES,
    IMAGENET_TEMPLATES,
    IMAGENET_TEMPLATES_SELECT,
    PROMPTSRC_TEMPLATES,
    ensemble_templates,
)

__all__ = [
    "COOP_DATASETS",
    "CROSS_DATASET_TARGETS",
    "CUSTOM_TEMPLATES",
    "DEFAULT_SPLIT_SEED",
    "DG_TARGETS",
    "DatasetSpec",
    "DatasetSplits",
    "Download",
    "IMAGENET_TEMPLATES",
    "IMAGENET_TEMPLATES_SELECT",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "PROMPTSRC_TEMPLATES",
    "PrepareReport",
    "PromptLoader",
    "Record",
    "SeededShuffleSampler",
    "VerifyReport",
    "download_file",
    "ensemble_templates",
    "extract_archive",
    "fewshot",
    "fewshot_splits",
    "get_spec",
    "imagenet_a_wnids",
    "imagenet_classnames",
    "imagenet_r_wnids",
    "imagenet_subset_indices",
    "imagenet_wnids",
    "import_dassl_fewshot",
    "list_datasets",
    "load_csv_dataset",
    "load_dassl_pickle",
    "load_fewshot_cache",
    "load_folder_dataset",
    "load_splits",
    "make_loader",
    "open_image",
    "prepare",
    "protocol_splits",
    "read_split",
    "save_fewshot_cache",
    "subsample_classes",
    "verify",
    "write_split",
]
