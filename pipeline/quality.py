"""Rule-based image quality metrics, computed on the decoded S x S pixels.

Working size: the metrics are computed on the very pixels the model sees (the resized, centre-cropped
S x S image from the decode stage). That makes them free to compute (no second decode, one vectorised pass
over the batch), comparable across images of any original size (sharpness depends strongly on scale), and
about what was scored. The price: a panorama's uncropped ends are not measured, and an upscaled thumbnail
reads as blurry, which it is at the scale the model sees it.

Every metric uses 0..255 grey levels unless stated; grey is ITU-R BT.601 luma (Pillow's ``convert("L")``).

* ``quality_sharpness``: variance of the 4-neighbour Laplacian of grey (interior pixels). Higher is sharper;
  not bounded. skimage's photos at 224 px: 500 to 1600; after a 2 px Gaussian blur: 5 to 20.
* ``quality_exposure_clipped_high`` / ``_low``: fraction of pixels whose grey is >= 250 / <= 5 (blown
  highlights / crushed shadows), in [0, 1].
* ``quality_contrast``: RMS contrast, the standard deviation of grey / 255, in [0, 0.5].
* ``quality_colourfulness``: Hasler & Suesstrunk (2003), ``sigma_rgyb + 0.3 * mu_rgyb`` with
  ``rg = R - G`` and ``yb = (R + G) / 2 - B``. 0 for greyscale; above ~100 very colourful.
"""

from __future__ import annotations

import numpy as np

QUALITY_SHARPNESS = "quality_sharpness"
QUALITY_EXPOSURE_CLIPPED_HIGH = "quality_exposure_clipped_high"
QUALITY_EXPOSURE_CLIPPED_LOW = "quality_exposure_clipped_low"
QUALITY_CONTRAST = "quality_contrast"
QUALITY_COLOURFULNESS = "quality_colourfulness"
QUALITY_COLUMNS = (
    QUALITY_SHARPNESS,
    QUALITY_EXPOSURE_CLIPPED_HIGH,
    QUALITY_EXPOSURE_CLIPPED_LOW,
    QUALITY_CONTRAST,
    QUALITY_COLOURFULNESS,
)

CLIPPED_HIGH_LEVEL = 250  # grey at or above this counts as blown out
CLIPPED_LOW_LEVEL = 5  # grey at or below this counts as crushed

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_CHUNK_ROWS = 16  # bounds the float32 temporaries to a few tens of MB whatever the batch size


def quality_metrics(pixels: np.ndarray, decoded: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Metrics for a batch of uint8 RGB images (N, H, W, 3): one float32 column per name in QUALITY_COLUMNS.

    ``decoded`` (bool, N) marks the rows that hold an image; the others get NaN.
    """
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels must be (N, H, W, 3), got shape {pixels.shape}")
    count = pixels.shape[0]
    columns = {name: np.full(count, np.nan, dtype=np.float32) for name in QUALITY_COLUMNS}
    rows = np.arange(count) if decoded is None else np.flatnonzero(np.asarray(decoded, dtype=bool))
    for start in range(0, len(rows), _CHUNK_ROWS):
        chunk = rows[start : start + _CHUNK_ROWS]
        for name, values in _chunk_metrics(pixels[chunk]).items():
            columns[name][chunk] = values
    return columns


def _chunk_metrics(pixels: np.ndarray) -> dict[str, np.ndarray]:
    rgb = pixels.astype(np.float32)
    grey = rgb @ _LUMA  # (n, H, W)
    pixel_axes = (1, 2)

    laplacian = (
        grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:] - 4.0 * grey[:, 1:-1, 1:-1]
    )
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red_green = red - green
    yellow_blue = 0.5 * (red + green) - blue
    colour_spread = np.sqrt(red_green.var(axis=pixel_axes) + yellow_blue.var(axis=pixel_axes))
    colour_mean = np.sqrt(red_green.mean(axis=pixel_axes) ** 2 + yellow_blue.mean(axis=pixel_axes) ** 2)

    return {
        QUALITY_SHARPNESS: laplacian.var(axis=pixel_axes),
        # Compare on rounded grey so the thresholds mean the same as on a stored 8-bit greyscale image.
        QUALITY_EXPOSURE_CLIPPED_HIGH: (np.rint(grey) >= CLIPPED_HIGH_LEVEL).mean(axis=pixel_axes),
        QUALITY_EXPOSURE_CLIPPED_LOW: (np.rint(grey) <= CLIPPED_LOW_LEVEL).mean(axis=pixel_axes),
        QUALITY_CONTRAST: grey.std(axis=pixel_axes) / 255.0,
        QUALITY_COLOURFULNESS: colour_spread + 0.3 * colour_mean,
    }
