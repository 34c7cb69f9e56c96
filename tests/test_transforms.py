"""Image transforms: colour-mode conversion, CLIP eval preprocessing, and torchvision-equivalent train augmentation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from promptclip.clip.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    EvalTransform,
    TrainTransform,
    center_crop,
    center_crop_offsets,
    clip_eval_transform,
    coop_train_transform,
    resize_shorter_side,
    sample_crop,
    shorter_side_shape,
    to_rgb,
)


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), mode="RGB")


def _expected_normalized(pixels: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> normalized CHW float32, in torchvision's order of float32 operations."""
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(torch.float32) / 255
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


# --- to_rgb -----------------------------------------------------------------------------------------------------------


def test_rgb_is_unchanged():
    image = _noise_image(5, 4)
    assert np.array_equal(_pixels(to_rgb(image)), np.asarray(image))


def test_grayscale_becomes_three_equal_channels():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = _pixels(to_rgb(Image.fromarray(gray, mode="L")))
    assert out.shape == (3, 4, 3)
    for channel in range(3):
        assert np.array_equal(out[:, :, channel], gray)


def test_grayscale_alpha_drops_alpha():
    image = Image.new("LA", (2, 2), (90, 0))
    assert _pixels(to_rgb(image)).tolist() == [[[90, 90, 90]] * 2] * 2


def test_rgba_drops_alpha_without_compositing():
    image = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    assert _pixels(to_rgb(image)).tolist() == [[[10, 20, 30], [10, 20, 30]]]


def _palette_image() -> Image.Image:
    image = Image.new("P", (2, 1), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * (3 * 254))
    image.putpixel((1, 0), 1)
    return image


@pytest.mark.parametrize("transparency", [None, 0, bytes([0, 255])])
def test_palette_uses_palette_colours_and_drops_transparency(transparency):
    image = _palette_image()
    if transparency is not None:
        image.info["transparency"] = transparency
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _pixels(to_rgb(image))
    assert out.tolist() == [[[255, 0, 0], [0, 255, 0]]]


def test_cmyk_and_ycbcr_follow_pil_conversion():
    cmyk = Image.new("CMYK", (1, 1), (0, 0, 0, 0))
    assert _pixels(to_rgb(cmyk)).tolist() == [[[255, 255, 255]]]
    cyan = Image.new("CMYK", (1, 1), (255, 0, 0, 0))
    assert _pixels(to_rgb(cyan)).tolist() == [[[0, 255, 255]]]
    ycbcr = Image.new("YCbCr", (3, 2), (120, 90, 200))
    assert np.array_equal(_pixels(to_rgb(ycbcr)), np.asarray(ycbcr.convert("RGB")))


def test_bilevel_image():
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    assert _pixels(to_rgb(image)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


SIXTEEN_BIT_VALUES = [0, 257, 1000, 32768, 65535]
SIXTEEN_BIT_EXPECTED = [0, 1, 4, 128, 255]  # v * 255 / 65535 rounded; 1000 would clip to 255 in PIL


def _sixteen_bit_image(mode: str) -> Image.Image:
    byte_order = ">" if mode == "I;16B" else "<"
    data = np.array([SIXTEEN_BIT_VALUES], dtype=f"{byte_order}u2").tobytes()
    return Image.frombytes(mode, (len(SIXTEEN_BIT_VALUES), 1), data)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_sixteen_bit_is_scaled_not_clipped(mode):
    image = _sixteen_bit_image(mode)
    assert image.getpixel((1, 0)) == 257  # the image holds what we meant
    out = _pixels(to_rgb(image))
    assert out[0, :, 0].tolist() == SIXTEEN_BIT_EXPECTED
    assert np.array_equal(out[:, :, 0], out[:, :, 1]) and np.array_equal(out[:, :, 0], out[:, :, 2])


def test_32bit_integer_is_read_as_16bit_range():
    values = np.array([[-5, 0, 257, 1000, 65535, 70000]], dtype=np.int32)
    image = Image.fromarray(values, mode="I")
    assert _pixels(to_rgb(image))[0, :, 1].tolist() == [0, 0, 1, 4, 255, 255]


def test_float_is_read_as_unit_range():
    values = np.array([[-1.0, 0.0, 0.25, 1.0, 3.0]], dtype=np.float32)
    image = Image.fromarray(values, mode="F")
    assert _pixels(to_rgb(image))[0, :, 2].tolist() == [0, 0, 64, 255, 255]


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "I;16", "I", "F", "1"])
def test_every_mode_gives_8bit_rgb_of_same_size(mode):
    out = to_rgb(Image.new(mode, (7, 3)))
    assert out.mode == "RGB" and out.size == (7, 3)


# --- eval transform ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "size", "expected"),
    [(480, 640, 224, (224, 298)), (640, 480, 224, (298, 224)), (100, 100, 32, (32, 32)), (30, 50, 32, (32, 53))],
)
def test_shorter_side_rule(height, width, size, expected):
    assert shorter_side_shape(height, width, size) == expected
    image = Image.new("RGB", (width, height))
    assert resize_shorter_side(image, size).size == (expected[1], expected[0])


@pytest.mark.parametrize(
    ("height", "width", "size", "expected"),
    [
        (298, 224, 224, (37, 0)),
        (224, 298, 224, (0, 37)),
        (229, 224, 224, (2, 0)),  # round(2.5) == 2: Python rounds halves to even, as torchvision does
        (231, 224, 224, (4, 0)),  # round(3.5) == 4
        (2, 3, 6, (-2, -1)),  # smaller than the crop: zero padding before the crop
    ],
)
def test_center_crop_offsets(height, width, size, expected):
    assert center_crop_offsets(height, width, size) == expected


def test_center_crop_pads_small_image_with_zeros():
    image = Image.new("RGB", (3, 2), (255, 255, 255))
    out = _pixels(center_crop(image, 6))
    expected = np.zeros((6, 6, 3), dtype=np.uint8)
    expected[2:4, 1:4] = 255  # padding (left, top, right, bottom) = (1, 2, 2, 2)
    assert np.array_equal(out, expected)


def test_eval_constant_colour_is_exactly_normalized():
    image = Image.new("RGB", (50, 30), (200, 100, 50))
    out = EvalTransform(32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = _expected_normalized(np.full((32, 32, 3), (200, 100, 50), dtype=np.uint8))
    assert torch.equal(out, expected)


def test_eval_pipeline_on_non_square_image():
    image = _noise_image(40, 60)  # width 40, height 60
    resized = image.resize((32, 48), Image.Resampling.BICUBIC)
    cropped = np.asarray(resized)[8:40, 0:32]
    out = clip_eval_transform(32)(image)
    assert torch.equal(out, _expected_normalized(cropped))


def test_eval_converts_mode_first_and_ignores_generator():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    out = EvalTransform(8)(gray, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, EvalTransform(8)(gray.convert("RGB")))


def test_eval_custom_mean_std():
    image = Image.new("RGB", (4, 4), (51, 51, 51))
    out = EvalTransform(4, mean=(0.0, 0.0, 0.0), std=(0.5, 0.5, 0.5))(image)
    assert torch.allclose(out, torch.full((3, 4, 4), 0.4))


# --- random resized crop: parity with torchvision's sampler on the global RNG ---------------------------------------


def _global_rng_crop(height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params algorithm, drawing from torch's global RNG (test oracle)."""
    area = height * width
    log_lo, log_hi = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_lo, log_hi)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return (i, j, h, w), False
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return ((height - h) // 2, (width - w) // 2, h, w), True


DEFAULT_SCALE, DEFAULT_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
CROP_CASES = [  # height, width, scale, ratio, every draw ends in the fallback
    (224, 224, DEFAULT_SCALE, DEFAULT_RATIO, False),
    (375, 500, DEFAULT_SCALE, DEFAULT_RATIO, False),
    (500, 333, (0.5, 1.0), DEFAULT_RATIO, False),
    (17, 3, DEFAULT_SCALE, DEFAULT_RATIO, False),
    (1, 1000, DEFAULT_SCALE, DEFAULT_RATIO, True),  # too wide for any ratio in range
    (1000, 1, DEFAULT_SCALE, DEFAULT_RATIO, True),
    (1000, 5, DEFAULT_SCALE, DEFAULT_RATIO, True),  # fallback height round(5 / 0.75) = 7
    (5, 1000, DEFAULT_SCALE, DEFAULT_RATIO, True),
    (1, 1, DEFAULT_SCALE, DEFAULT_RATIO, False),
    (2, 3, (0.9, 1.0), (1.0, 1.0), False),
    (64, 48, (1.0, 1.0), (1.0, 1.0), False),
]


@pytest.mark.parametrize(("height", "width", "scale", "ratio", "always_fallback"), CROP_CASES)
def test_sample_crop_matches_global_rng_algorithm(height, width, scale, ratio, always_fallback):
    fallbacks = 0
    for seed in range(60):
        torch.manual_seed(seed)
        expected, fell_back = _global_rng_crop(height, width, scale, ratio)
        expected_next = torch.rand(1)
        generator = torch.Generator().manual_seed(seed)
        assert sample_crop(height, width, generator, scale, ratio) == expected, seed
        assert torch.equal(torch.rand(1, generator=generator), expected_next)  # same number of draws
        fallbacks += fell_back
    if always_fallback:
        assert fallbacks == 60


def test_sample_crop_stays_inside_image():
    generator = torch.Generator().manual_seed(0)
    for height, width in [(10, 10), (7, 300), (300, 7), (1, 1), (123, 45)]:
        for _ in range(50):
            top, left, h, w = sample_crop(height, width, generator)
            assert 0 < h <= height and 0 < w <= width
            assert 0 <= top <= height - h and 0 <= left <= width - w


def test_sample_crop_hits_fallback_case():
    torch.manual_seed(3)
    _, fell_back = _global_rng_crop(1, 1000, DEFAULT_SCALE, DEFAULT_RATIO)
    assert fell_back
    assert sample_crop(1, 1000, torch.Generator().manual_seed(3)) == (0, 499, 1, 1)
    assert sample_crop(1000, 5, torch.Generator().manual_seed(3)) == (496, 0, 7, 5)
    assert sample_crop(5, 1000, torch.Generator().manual_seed(3)) == (0, 496, 5, 7)


# --- train transform ---------------------------------------------------------------------------------------------


def test_train_matches_torchvision_pipeline_order():
    image = _noise_image(45, 30, seed=4)
    transform = TrainTransform(16)
    for seed in range(8):
        torch.manual_seed(seed)
        (top, left, h, w), _ = _global_rng_crop(30, 45, DEFAULT_SCALE, DEFAULT_RATIO)
        flip = bool(torch.rand(1) < 0.5)
        expected = image.crop((left, top, left + w, top + h)).resize((16, 16), Image.Resampling.BICUBIC)
        if flip:
            expected = expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out = transform(image, torch.Generator().manual_seed(seed))
        assert torch.equal(out, _expected_normalized(np.asarray(expected))), seed


def test_train_is_deterministic_per_seed():
    image = _noise_image(40, 32, seed=1)
    transform = coop_train_transform(24)
    first = transform(image, torch.Generator().manual_seed(7))
    again = transform(image, torch.Generator().manual_seed(7))
    other = transform(image, torch.Generator().manual_seed(8))
    assert first.shape == (3, 24, 24) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_train_does_not_touch_global_rng():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    TrainTransform(8)(_noise_image(10, 10), torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)


def test_train_requires_generator():
    with pytest.raises(ValueError, match="generator"):
        TrainTransform(8)(_noise_image(10, 10))


@pytest.mark.parametrize("flip_prob", [0.0, 0.3, 1.0])
def test_flip_probability(flip_prob):
    image = _noise_image(6, 6, seed=2)
    transform = TrainTransform(6, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=flip_prob)
    plain = _expected_normalized(np.asarray(image))
    flipped = _expected_normalized(np.asarray(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    generator = torch.Generator().manual_seed(11)
    draws = 2000
    flips = 0
    for _ in range(draws):
        out = transform(image, generator)
        is_flipped = torch.equal(out, flipped)
        assert is_flipped or torch.equal(out, plain)
        flips += is_flipped
    tolerance = 4 * math.sqrt(flip_prob * (1 - flip_prob) / draws)
    assert abs(flips / draws - flip_prob) <= tolerance


@pytest.mark.parametrize(
    "kwargs", [{"scale": (1.0, 0.5)}, {"ratio": (2.0, 1.0)}, {"flip_prob": 1.5}, {"image_size": 0}]
)
def test_train_rejects_bad_parameters(kwargs):
    arguments = {"image_size": 8, **kwargs}
    with pytest.raises(ValueError):
        TrainTransform(**arguments)


def test_convenience_constructors():
    assert clip_eval_transform(224) == EvalTransform(224, CLIP_MEAN, CLIP_STD)
    assert coop_train_transform(224) == TrainTransform(224, DEFAULT_SCALE, DEFAULT_RATIO, 0.5)
