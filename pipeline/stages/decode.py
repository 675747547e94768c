"""Decode stage (CPU): image bytes to the S x S uint8 pixels open_clip's preprocessing would produce.

A callable class for ``Dataset.map_batches(Decode, fn_constructor_args=..., batch_format="numpy")``.

Columns in: ``image`` (bytes or None per row), ``status``, ``error`` and anything else, which passes
through untouched (``image_format``, the tar member's extension, included: the format is read from the
bytes, never from the name). Columns out: the same minus ``image``, plus

* ``pixels``: uint8 (N, S, S, 3), zero for every row that was not decoded;
* ``width``, ``height``: int32, the decoded size after EXIF orientation, 0 when not decoded;
* ``status`` / ``error`` updated for rows that fail here (rows already failed upstream keep theirs);
* with ``DecodeConfig.quality_metrics``: the float32 columns of :mod:`pipeline.quality`, NaN where not decoded.
* with ``DecodeConfig.phash``: ``phash``, imagehash's perceptual hash of the decoded (model-sized) pixels.

Statuses written here (one bad row never fails the batch):

* ``no_image``: the row has no image bytes (None);
* ``empty_image``: zero bytes;
* ``decode_error``: not an image, a corrupt or truncated one, or any unexpected decoder failure;
* ``unsupported_format``: an image, but not JPEG/PNG/WebP/GIF/BMP, or a pixel mode we do not score;
* ``image_too_large``: more than ``DecodeConfig.max_pixels`` pixels (or Pillow's bomb limit), detected from
  the header before anything is decoded.

Resampling, the fast JPEG path and the deliberate differences from the reference are described in
:mod:`pipeline.images`.
"""

from __future__ import annotations

import numpy as np

from pipeline import schema as S
from pipeline.config import DecodeConfig
from pipeline.images import MAX_ERROR_CHARS, ImageRejected, decode_square, resample_filter
from pipeline.quality import quality_metrics

_OK = S.Status.OK.value


class Decode:
    """bytes -> S x S uint8 pixels for one numpy batch; see the module docstring for columns and statuses."""

    def __init__(self, config: DecodeConfig, image_size: int = 224, interpolation: str = "bicubic") -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.config = config
        self.image_size = image_size
        self.resample = resample_filter(interpolation)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = S.restore_null_text(dict(batch))
        images = batch[S.IMAGE]
        count = len(images)
        size = self.image_size
        statuses = _object_column(batch, S.STATUS, count, _OK)
        errors = _object_column(batch, S.ERROR, count, None)
        pixels = np.zeros((count, size, size, 3), dtype=np.uint8)
        widths = np.zeros(count, dtype=np.int32)
        heights = np.zeros(count, dtype=np.int32)

        for row in range(count):
            if statuses[row] != _OK:
                continue  # failed upstream: keeps its status and error, gets zero pixels
            failure = self._decode_row(images[row], pixels[row], widths, heights, row)
            if failure is not None:
                status, message = failure
                statuses[row] = status.value
                errors[row] = message if not errors[row] else f"{message}; {errors[row]}"[:MAX_ERROR_CHARS]

        out = {name: column for name, column in batch.items() if name != S.IMAGE}
        out[S.PIXELS] = pixels
        out[S.WIDTH] = widths
        out[S.HEIGHT] = heights
        out[S.STATUS] = statuses
        out[S.ERROR] = errors
        if self.config.quality_metrics:
            out.update(quality_metrics(pixels, decoded=statuses == _OK))
        if self.config.phash:
            out[S.PHASH] = perceptual_hashes(pixels, decoded=statuses == _OK)
        return out

    def _decode_row(self, data, out: np.ndarray, widths: np.ndarray, heights: np.ndarray, row: int):
        """Decode one row into ``out``; return ``(status, message)`` when it cannot be scored, else None."""
        if data is None:
            return S.Status.NO_IMAGE, "the sample has no image"
        if len(data) == 0:
            return S.Status.EMPTY_IMAGE, "the image member has zero bytes"
        try:
            widths[row], heights[row] = decode_square(
                data,
                out,
                max_pixels=self.config.max_pixels,
                fast=self.config.fast,
                apply_exif_orientation=self.config.apply_exif_orientation,
                resample=self.resample,
            )
        except ImageRejected as exc:
            return exc.status, str(exc)
        except Exception as exc:  # the safety net: a decoder bug or MemoryError costs one row, not the batch
            out[...] = 0
            return S.Status.DECODE_ERROR, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        return None


def _object_column(batch: dict[str, np.ndarray], name: str, count: int, default) -> np.ndarray:
    """A writable object copy of ``batch[name]`` (Ray may hand out read-only arrays), or ``default`` rows."""
    column = np.empty(count, dtype=object)
    if name in batch:
        column[:] = list(batch[name])
    else:
        column[:] = default
    return column


def perceptual_hashes(pixels: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """imagehash's pHash (64 bits, 16 hex digits) of each decoded image, None where nothing was decoded."""
    import imagehash
    from PIL import Image

    hashes = np.full(len(pixels), None, dtype=object)
    for row in np.flatnonzero(decoded):
        hashes[row] = str(imagehash.phash(Image.fromarray(pixels[row])))
    return hashes
