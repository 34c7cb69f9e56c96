"""promptclip: prompt learning on frozen CLIP-style vision-language models.

The top-level names mirror the CLI; they are imported on first use so that ``import promptclip`` stays light.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_backbone": ("api", "load_backbone"),
    "load_adapter": ("api", "load_adapter"),
    "zero_shot": ("api", "zero_shot"),
    "Predictor": ("api", "Predictor"),
    "create_method": ("methods", "create_method"),
    "list_methods": ("methods", "list_methods"),
    "load_plugin": ("methods", "load_plugin"),
    "fit": ("train", "fit"),
    "TrainConfig": ("train", "TrainConfig"),
    "train_config_from_dassl": ("train", "train_config_from_dassl"),
    "evaluate": ("evaluate", "evaluate"),
    "run_protocol": ("protocols", "run_protocol"),
    "load_preset": ("presets", "load_preset"),
    "write_report": ("report", "write_report"),
    "read_records": ("report", "read_records"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module 'promptclip' has no attribute {name!r}")
