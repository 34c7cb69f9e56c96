"""The ``--device`` check: a device string torch knows, on hardware this torch build can use, before anything loads."""

from __future__ import annotations

import torch

from .errors import ConfigError

CUDA_INSTALL_HINT = ("install a CUDA build of torch, e.g. `pip install torch --index-url "
                     "https://download.pytorch.org/whl/cu124` (pick the CUDA version of your driver at "
                     "https://pytorch.org/get-started/locally/; without promptclip's constraints/cpu.txt), or use "
                     "--device cpu")


def check_device(name: str) -> str:
    """``name`` if it is a device promptclip can run on here (cpu, cuda[:N] with a visible GPU, mps), else a
    ConfigError that says what torch reports and what to do."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N (a GPU index) or mps") from None
    if device.type == "cpu":
        return name
    if device.type == "cuda":
        return _check_cuda(name, device)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {name}: torch {torch.__version__} reports no MPS device (Apple-silicon GPUs "
                              "with macOS 12.3+ only); use --device cpu")
        return name
    raise ConfigError(f"--device {name!r}: promptclip runs on cpu, cuda or mps, not {device.type}")


def _check_cuda(name: str, device: torch.device) -> str:
    if not torch.backends.cuda.is_built():
        raise ConfigError(f"--device {name}: this torch ({torch.__version__}) is a CPU-only build (torch reports "
                          f"'Torch not compiled with CUDA enabled'); to use a GPU, {CUDA_INSTALL_HINT}")
    if not torch.cuda.is_available():
        try:
            torch.cuda.init()
            reason = "torch.cuda.is_available() is False"
        except Exception as err:  # noqa: BLE001 - its message is the reason we report
            reason = " ".join(str(err).split()).rstrip(".")
        raise ConfigError(f"--device {name}: torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable "
                          f"GPU: {reason}. Check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or use "
                          "--device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"--device {name}: only {count} GPU(s) are visible (cuda:0 to cuda:{count - 1})")
    return name
