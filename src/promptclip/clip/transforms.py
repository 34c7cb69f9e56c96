"""Image transforms of CLIP evaluation and CoOp/Dassl training, on PIL + numpy + torch (no torchvision).

They reproduce torchvision's ``Resize``/``CenterCrop``/``RandomResizedCrop``/``RandomHorizontalFlip``/``ToTensor``/
``Normalize`` on PIL images, with one difference: training randomness comes only from the ``torch.Generator`` passed
to ``__call__``. ``sample_crop`` makes the same torch calls in the same order as torchvision makes them on the global
RNG, so a generator in the same state as the global RNG gives the same crop.

Every transform has the signature ``transform(image, generator=None) -> Tensor [3, size, size]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_CROP_ATTEMPTS = 10


# --- colour modes ---------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB version of ``image``; alpha is dropped (as ``convert('RGB')`` does, like the reference loaders).

    16-bit integer modes are scaled to 8 bits (65535 -> 255) instead of clipped as PIL does. Mode ``I`` is read as
    16-bit data (PIL opens 16-bit PNG/TIFF files as ``I``), values outside 0..65535 clipped. Mode ``F`` is read as
    intensities in [0, 1].
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        return _gray_to_rgb(gray)
    if image.mode == "F":
        return _gray_to_rgb(np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * 255.0)
    if image.mode in ("P", "PA") and "transparency" in image.info:
        # Going through RGBA gives the same colours without PIL's warning about byte transparency.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    gray8 = np.rint(gray).astype(np.uint8)
    return Image.fromarray(np.repeat(gray8[:, :, None], 3, axis=2), mode="RGB")


# --- geometry ---------------------------------------------------------------------------------------------------------


def shorter_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Output ``(height, width)`` of a resize of the shorter side to ``size`` (torchvision's rule for an int size)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    new_height, new_width = shorter_side_shape(image.height, image.width, size)
    return image.resize((new_width, new_height), Image.Resampling.BICUBIC)


def center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """``(top, left)`` of a centred ``size`` x ``size`` crop; negative where torchvision would zero-pad first."""
    return _center_offset(height, size), _center_offset(width, size)


def _center_offset(length: int, crop: int) -> int:
    if crop > length:
        return -((crop - length) // 2)
    return int(round((length - crop) / 2.0))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Centred square crop; PIL fills the parts outside the image with zeros, which is torchvision's padding."""
    top, left = center_crop_offsets(image.height, image.width, size)
    return image.crop((left, top, left + size, top + size))


def sample_crop(
    height: int,
    width: int,
    generator: torch.Generator,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop, drawn like torchvision's ``RandomResizedCrop.get_params``.

    Up to 10 attempts: an area fraction uniform in ``scale`` and an aspect ratio log-uniform in ``ratio``; the first
    crop that fits gets a uniform position. Otherwise a central crop of the whole image, its ratio clamped to
    ``ratio``.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(_CROP_ATTEMPTS):
        area_fraction = torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        log_aspect = torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=generator)
        aspect = torch.exp(log_aspect).item()
        target_area = area * area_fraction
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    return _central_fallback_crop(height, width, ratio)


def _central_fallback_crop(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int, int, int]:
    image_ratio = width / height
    w, h = width, height
    if image_ratio < min(ratio):
        h = int(round(width / min(ratio)))
    elif image_ratio > max(ratio):
        w = int(round(height * max(ratio)))
    return (height - h) // 2, (width - w) // 2, h, w


# --- tensors ----------------------------------------------------------------------------------------------------------


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 ``[3, H, W]`` in [0, 1]."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    return pixels.permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype)[:, None, None]
    std_t = torch.as_tensor(std, dtype=tensor.dtype)[:, None, None]
    return (tensor - mean_t) / std_t


# --- transforms -------------------------------------------------------------------------------------------------------


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


def _check_range(name: str, bounds: Sequence[float], low: float) -> None:
    if len(bounds) != 2 or not low <= bounds[0] <= bounds[1]:
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max, got {tuple(bounds)!r}")


@dataclass(frozen=True)
class EvalTransform:
    """to_rgb -> resize the shorter side (bicubic) -> centre crop -> tensor -> normalize. Deterministic."""

    image_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        _check_image_size(self.image_size)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        image = center_crop(resize_shorter_side(to_rgb(image), self.image_size), self.image_size)
        return normalize(to_tensor(image), self.mean, self.std)


@dataclass(frozen=True)
class TrainTransform:
    """CoOp/Dassl training augmentation: random resized crop (bicubic) -> horizontal flip -> tensor -> normalize.

    All randomness comes from the generator given to ``__call__``: the crop draws first, then the flip.
    """

    image_size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        _check_image_size(self.image_size)
        _check_range("scale", self.scale, 0.0)
        _check_range("ratio", self.ratio, 0.0)
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob!r}")

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None:
            raise ValueError(
                "TrainTransform needs an explicit torch.Generator (transform(image, generator)): training "
                "augmentation never draws from the global RNG."
            )
        image = to_rgb(image)
        top, left, h, w = sample_crop(image.height, image.width, generator, self.scale, self.ratio)
        # Crop before resizing: resize(box=...) would let the bicubic filter read pixels outside the crop.
        image = image.crop((left, top, left + w, top + h))
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        if torch.rand(1, generator=generator) < self.flip_prob:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return normalize(to_tensor(image), self.mean, self.std)


def clip_eval_transform(image_size: int, mean: tuple[float, float, float] = CLIP_MEAN,
                        std: tuple[float, float, float] = CLIP_STD) -> EvalTransform:
    """CLIP's evaluation preprocessing (also CoOp's test transform) at ``image_size``."""
    return EvalTransform(image_size, mean, std)


def coop_train_transform(image_size: int) -> TrainTransform:
    """CoOp's training augmentation (Dassl: random_resized_crop, random_flip, normalize) at ``image_size``."""
    return TrainTransform(image_size)
