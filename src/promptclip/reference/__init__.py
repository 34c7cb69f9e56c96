"""The reference repositories' own files, read safely: Dassl checkpoints (:mod:`.dassl`) through a restricted
unpickler of ``torch.save`` archives (:mod:`.unpickle`).

- :func:`import_checkpoint` / ``promptclip import``: a Dassl checkpoint file or output folder -> an adapter;
- :func:`read_checkpoint`, :func:`find_checkpoint`, :func:`load_into_method`: the steps, for a method built by hand;
- :func:`load_torch_file`: any ``torch.save`` archive, without running code from it.
"""

_LAZY = {
    "DasslCheckpoint": "dassl", "DasslCheckpointError": "dassl", "FrozenWeightsWarning": "dassl",
    "ImportReport": "dassl", "ImportResult": "dassl", "LAYOUTS": "dassl", "find_checkpoint": "dassl",
    "import_checkpoint": "dassl", "load_into_method": "dassl", "read_checkpoint": "dassl",
    "ForbiddenGlobalError": "unpickle", "TorchFileError": "unpickle", "load_torch_file": "unpickle",
}

__all__ = sorted(_LAZY)


def __getattr__(name):  # imported on first use: the CLI parser must not import torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
