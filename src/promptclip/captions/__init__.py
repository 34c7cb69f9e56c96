"""Per-image captions from a multimodal LLM, for MuGCP's semantic conditional prompts (an INFERRED design: the
paper's captioner, instruction and caption length were not available; see docs/mugcp.md).

- :func:`build_captions` / ``promptclip captions build``: batched captioning with any transformers image-text-to-text
  model (optional extra ``promptclip[hf]``) into a resumable JSONL cache keyed by image path, with the model id,
  instruction hash and generation settings on every line;
- :func:`load_captions`: a cache, a user JSONL or a CSV ``path,caption`` file (several files merge);
- :func:`verify_captions` / ``promptclip captions verify``: coverage of a dataset's splits, captioned images missing on
  disk, provenance mismatches and label leakage;
- :func:`mask_class_names` / ``promptclip captions mask``: the masked ablation;
- :class:`CaptionExtras`: ``RunOptions.extras`` that puts each image's caption in its batch (``batch["caption"]``).
"""

_LAZY = {
    "DEFAULT_INSTRUCTION": "settings", "HFCaptioner": "hf",
    "BuildResult": "build", "CoverageReport": "build", "ImageItem": "build", "build_captions": "build",
    "dataset_items": "build", "image_items": "build", "verify_captions": "build",
    "LeakReport": "leak", "leak_report": "leak", "mask_class_names": "leak", "mentions": "leak",
    "CacheWriter": "store", "CaptionEntry": "store", "CaptionExtras": "store", "CaptionSet": "store",
    "load_captions": "store", "read_caption_file": "store",
}

__all__ = sorted(_LAZY)


def __getattr__(name):  # imported on first use: the CLI parser must not import torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
