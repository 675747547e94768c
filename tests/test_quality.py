"""Rule-based quality metrics move the right way on skimage's bundled photos."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageEnhance, ImageFilter

from pipeline.quality import (
    QUALITY_COLOURFULNESS,
    QUALITY_COLUMNS,
    QUALITY_CONTRAST,
    QUALITY_EXPOSURE_CLIPPED_HIGH,
    QUALITY_EXPOSURE_CLIPPED_LOW,
    QUALITY_SHARPNESS,
    quality_metrics,
)

SIZE = 224


def square(image: np.ndarray) -> Image.Image:
    """A photo as the decode stage would hand it over: S x S RGB."""
    pil = Image.fromarray(image).convert("RGB")
    side = min(pil.size)
    left, top = (pil.width - side) // 2, (pil.height - side) // 2
    return pil.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)


PHOTOS = {name: square(getattr(skimage.data, name)()) for name in ("astronaut", "chelsea", "coffee")}


def metrics(*images: Image.Image) -> dict[str, np.ndarray]:
    return quality_metrics(np.stack([np.asarray(image) for image in images]))


@pytest.mark.parametrize("name", PHOTOS)
def test_blurring_lowers_sharpness(name):
    photo = PHOTOS[name]
    values = metrics(photo, photo.filter(ImageFilter.GaussianBlur(1)), photo.filter(ImageFilter.GaussianBlur(3)))
    sharp, soft, blurred = values[QUALITY_SHARPNESS]
    assert sharp > 2 * soft > 0 and soft > blurred


@pytest.mark.parametrize("name", PHOTOS)
def test_darkening_raises_clipped_low_and_brightening_clipped_high(name):
    photo = PHOTOS[name]
    dark = ImageEnhance.Brightness(photo).enhance(0.1)
    bright = ImageEnhance.Brightness(photo).enhance(3)
    values = metrics(photo, dark, bright)
    low, high = values[QUALITY_EXPOSURE_CLIPPED_LOW], values[QUALITY_EXPOSURE_CLIPPED_HIGH]
    assert low[1] > low[0] + 0.03 and high[2] > high[0] + 0.1
    assert low[2] <= low[0] and high[1] <= high[0]


@pytest.mark.parametrize("name", PHOTOS)
def test_lower_contrast_lowers_contrast(name):
    photo = PHOTOS[name]
    values = metrics(photo, ImageEnhance.Contrast(photo).enhance(0.5), ImageEnhance.Contrast(photo).enhance(0.1))
    full, half, tenth = values[QUALITY_CONTRAST]
    assert full > half > tenth > 0
    assert half == pytest.approx(full / 2, rel=0.1)  # RMS contrast scales with the contrast factor


@pytest.mark.parametrize("name", PHOTOS)
def test_greyscale_has_no_colourfulness(name):
    photo = PHOTOS[name]
    values = metrics(photo, photo.convert("L").convert("RGB"), ImageEnhance.Color(photo).enhance(0.5))
    colour, grey, muted = values[QUALITY_COLOURFULNESS]
    assert grey == pytest.approx(0, abs=1e-3) and colour > muted > 1


def test_known_values_on_flat_and_extreme_images():
    black = np.zeros((SIZE, SIZE, 3), np.uint8)
    white = np.full((SIZE, SIZE, 3), 255, np.uint8)
    halves = black.copy()
    halves[:, SIZE // 2 :] = 255
    red = np.zeros_like(black)
    red[..., 0] = 255
    values = quality_metrics(np.stack([black, white, halves, red]))
    np.testing.assert_allclose(values[QUALITY_EXPOSURE_CLIPPED_LOW], [1, 0, 0.5, 0], atol=1e-6)
    np.testing.assert_allclose(values[QUALITY_EXPOSURE_CLIPPED_HIGH], [0, 1, 0.5, 0], atol=1e-6)
    np.testing.assert_allclose(values[QUALITY_CONTRAST], [0, 0, 0.5, 0], atol=1e-6)
    np.testing.assert_allclose(values[QUALITY_SHARPNESS][:2], [0, 0], atol=1e-6)
    # Pure red: rg = 255, yb = 127.5, no spread: 0.3 * sqrt(255^2 + 127.5^2).
    np.testing.assert_allclose(values[QUALITY_COLOURFULNESS], [0, 0, 0, 0.3 * np.hypot(255, 127.5)], rtol=1e-5)


def test_rows_not_decoded_get_nan_and_types_are_float32():
    pixels = np.stack([np.asarray(PHOTOS["coffee"])] * 20)  # more than one internal chunk
    decoded = np.ones(20, dtype=bool)
    decoded[[3, 17]] = False
    values = quality_metrics(pixels, decoded)
    assert set(values) == set(QUALITY_COLUMNS)
    for name, column in values.items():
        assert column.dtype == np.float32 and column.shape == (20,)
        assert np.isnan(column[[3, 17]]).all() and np.isfinite(column[decoded]).all()
        assert np.allclose(column[decoded], column[0]), name  # identical images, identical values


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="N, H, W, 3"):
        quality_metrics(np.zeros((2, 8, 8), np.uint8))
