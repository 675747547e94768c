"""Image bytes to the square uint8 pixels CLIP's preprocessing would produce.

Pure functions, no Ray: the decode stage calls :func:`decode_square` once per row.

The reference
-------------
open_clip's eval transform, ``image_transform(S, is_train=False, resize_mode="shortest")``, on a PIL image:

1. torchvision ``Resize(S)``: shortest side to ``S``, long side ``int(S * long / short)`` (truncated), Pillow
   resampling (bicubic for CLIP; Pillow always antialiases, i.e. widens the filter when downscaling);
2. ``CenterCrop(S)``: offsets ``int(round((side - S) / 2))`` -- Python's ``round``, ties to even;
3. ``convert("RGB")``, then ``ToTensor`` and ``Normalize`` (the last two happen later, on the GPU).

Two paths to the same pixels
----------------------------
``fast=False``, Pillow all the way: the reference's own resampling, bit for bit, made a little cheaper:

* Pillow resamples in two passes, one per axis, each rounding and clipping to 8 bits. We call them one at a
  time (``_resize_exact``), each with the reference's geometry (the whole input side onto the whole resized
  side), and crop between them, so the second pass only computes the lines the crop keeps. The passes run in
  the order Pillow picks for the reference's full resize: Pillow 13 runs the vertical pass first when the
  height shrinks more than twice as much as the width (python-pillow/Pillow#9549: downscaled portraits over
  2:1); in the other order up to 6 levels differ. The filter weights, the sums and the rounding are then Pillow's
  own on the same numbers: no value differs (``EXACT_MAX_LEVEL_DIFFERENCE``).
* Panoramas past ``MAX_EXACT_RESIZE_CROPS`` (16:1): resampling the whole long side would compute a strip up
  to millions of pixels long, so only the crop's source-space box is resampled (``resize(..., box=...)``).
  Pillow takes box edges as C floats (``_resize_exact`` says why that is not exact). Below 16 384 px the
  rounding moves the filter centres by under 0.001 px, a pass's sums by under a level, so as for the
  fast path below: up to 2 levels off. Measured: 0.2% of values off by 1, none by 2.

``fast=True`` (the default), where most of the time goes (per core, 256-512 px JPEGs: decode and Pillow's
resampling, in comparable shares):

* JPEGs are decoded by libjpeg-turbo through simplejpeg, straight into a numpy array: Pillow's pixels
  exactly, and faster (Pillow decodes into its own 4-byte-per-pixel buffer, then copies).
* The resize runs in torch, whose antialiased uint8 kernels are a SIMD port of Pillow's resampling (same
  filters, same geometry, same rounding): several times faster than Pillow on one core. torch always runs the
  horizontal pass first, so an image the reference resamples vertically first goes to torch transposed.
  torch has no box argument, so the whole image is resized and then cropped, as the reference does;
  panoramas past ``MAX_FAST_RESIZE_CROPS`` take the Pillow path, as do filters torch lacks (lanczos, box,
  nearest), CMYK JPEGs and any JPEG libjpeg warns about.
* Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, then resized with the reference's own
  scale (so the crop lands where it does in the reference). DCT scaling keeps more fine detail than Pillow's
  antialiased bicubic, so the error grows as the bicubic step shrinks. Measured on skimage's photos, mean
  absolute difference (MAD) from the reference in normalised units (CLIP mean/std): 0.02-0.04 when the DCT
  does all the reduction (shortest side just above 448, 896, 1792 for S=224), about 0.016 when bicubic still
  reduces by 1.25x, 0.011 at 1.5x, 0.006 at 2x. Hence ``DRAFT_MARGIN = 1.25``: the largest DCT reduction
  that keeps the shortest side >= 1.25 S, so nothing under 560 px is reduced. img2dataset's 256 and 512 px
  shards therefore get the reference's pixels (to the bounds below) on the fast path too, faster per core
  than the reference (bench/bench_decode.py prints the figures and the MAD; BENCHMARKS.md holds them).
  Noise and other detail at the pixel scale survive the DCT reduction most: bench/decode_accuracy.py measures
  MAD 0.011 on average over JPEGs of 560-2048 px, but up to 0.08 on heavily noisy or JPEG-mangled ones.

Accuracy, in 0..255 levels (bench/decode_accuracy.py measures it; README.md states it; tests assert it)
--------------------------------------------------------------------------------------------------------
* ``fast=False``: 0 levels off, by construction (above), up to 16:1.
* ``fast=True`` without a DCT reduction: at most ``FAST_MAX_LEVEL_DIFFERENCE`` = 2 levels off, a bound from
  the arithmetic. The decoded pixels are Pillow's; the resamplers differ only in their fixed-point weights
  (torch: int16 with 14 or more fractional bits; Pillow: int32, 22 bits), which moves a pass's sum before
  rounding by at most about 0.04 of a level (each tap's weight off by half a step, times 255, summed; finer
  steps when downscaling make up for the extra taps). The first pass therefore rounds at most 1 level away
  from Pillow's. The second pass sums those values with weights whose absolute values add up to at most 1.25
  (bicubic, a = -0.5; 1 for bilinear), so its sum moves by under 1.25 + 0.04 < 2 levels, and two sums under
  2 apart round at most 2 apart. How often a value lands near enough a rounding boundary to flip depends on
  the picture, not on the arithmetic, so the fractions are measured: over 358 images of 16-2048 px (colour
  and grey, JPEG of several qualities and PNG, upscaled and downscaled, 1:1 to 42:1; the demo's shard images
  among them) 0.23% of values are off by 1 or more and 0.00015% by 2; the worst image has 1.6% off by 1 or
  more and 0.004% by 2. The bounds tests hold the fast path to, with room (4x, 3x, 2.5x) for other pictures
  and library versions: ``FAST_MAX_OFF_BY_ONE`` of a set of images' values, ``FAST_MAX_OFF_BY_ONE_PER_IMAGE``
  and ``FAST_MAX_OFF_BY_TWO`` of any one image's. The CPU plays no part: torch's uint8 resampling gives the
  same bytes with its scalar, AVX2 and AVX-512 kernels (integer sums of the same int16 weights), Pillow's is
  plain C and libjpeg-turbo's accurate IDCT is bit-exact in every SIMD flavour.
* ``fast=True`` with a DCT reduction (JPEGs whose shortest side is >= 2.5 S): not the reference's pixels but
  close to them (MAD above).

Deliberate differences from the reference (each one tested)
-----------------------------------------------------------
* EXIF orientation (``apply_exif_orientation``) is applied; the reference ignores it and scores the photo
  sideways. Our geometry is the reference's applied to the upright image; the box is mapped into the stored
  (unrotated) frame and only the S x S result is transposed, so rotated photos cost no full-size transpose.
  Agreement with the reference on the upright image: as for any other image (the exact path's passes see
  the mirrored geometry, whose filter weights are the same numbers; every orientation is tested bit for bit).
* Transparency (RGBA, LA, PA, palette or colour-key transparency) is matted over white, as img2dataset does
  when it resizes. The reference resamples premultiplied RGBA, then drops alpha: fully transparent pixels turn
  black.
* 16-bit greyscale (``I;16``, ``I;16B``, ``I``) is scaled to 8 bits (``round(v / 257)``); the reference
  converts with Pillow's clipping, so nearly every 16-bit image comes out white.
* Palette (``P``) and 1-bit images are converted to RGB / L before resampling; Pillow resamples those modes
  with nearest neighbour only, which aliases badly when downscaling.
* Animated images (GIF, APNG, WebP): the first frame, as the reference (Pillow opens on frame 0).
* ICC profiles are ignored, as in the reference (CMYK is converted with Pillow's naive formula, as there).

Accepted formats, identified by content, never by file extension: JPEG (and MPO, the multi-picture JPEG
that cameras write), PNG (APNG), WebP, GIF and BMP, which are cheap and safe to decode and cover what
img2dataset writes and what the web serves. Anything else Pillow can identify (TIFF, ICO, PSD, ...) is
rejected as unsupported: TIFF alone brings dozens of compressions, float and multi-page modes.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from typing import Any, Callable

import numpy as np
import simplejpeg
from PIL import (  # noqa: F401  (the plugin imports register the accepted formats with Pillow)
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    JpegImagePlugin,
    MpoImagePlugin,
    PngImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from pipeline.long_lived import long_lived
from pipeline.schema import Status

# Pillow format ids tried on open, most common first. MPO files are opened by the JPEG plugin (and come
# back as format "MPO", a JpegImageFile subclass, so the fast path applies to them too).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}

MAX_ERROR_CHARS = 200

# Fast path: the DCT reduction must leave the shortest side >= DRAFT_MARGIN * S (see the module docstring).
DRAFT_MARGIN = 1.25

# Agreement with the reference, in 0..255 levels ("Accuracy" in the module docstring says why these).
# README.md's "Decoding" section states them and tests/test_images.py asserts them, both from here.
EXACT_MAX_LEVEL_DIFFERENCE = 0  # fast=False, images up to MAX_EXACT_RESIZE_CROPS:1
FAST_MAX_LEVEL_DIFFERENCE = 2  # fast=True without a DCT reduction, and fast=False past 16:1
FAST_MAX_OFF_BY_ONE = 0.01  # fast=True without a DCT reduction: of a set of images' values, off by 1 or more
FAST_MAX_OFF_BY_ONE_PER_IMAGE = 0.05  # ... of any one image's values
FAST_MAX_OFF_BY_TWO = 0.0001  # ... of any one image's values, off by 2

# Modes resampled as they are and converted to RGB only at S x S, exactly as the reference does.
_NATIVE_MODES = ("RGB", "L", "CMYK", "YCbCr")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_EXIF_ORIENTATION_TAG = 0x0112


class ImageRejected(Exception):
    """This image gets no pixels: ``status`` says why, the message says what was seen."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message[:MAX_ERROR_CHARS])
        self.status = status


def resample_filter(interpolation: str) -> Image.Resampling:
    try:
        return INTERPOLATIONS[interpolation]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}") from None


# Geometry ------------------------------------------------------------------------------------------------


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(size)``: shortest side to ``size``, long side truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_offsets(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of torchvision's ``CenterCrop(size)`` in a width x height image."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))  # Python's round: ties to even


def center_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The source-space (left, top, right, bottom) that ``Resize(size)`` + ``CenterCrop(size)`` keeps.

    Resizing exactly this box to ``size x size`` gives the reference's pixels without the full resize.
    """
    new_width, new_height = resized_size(width, height, size)
    left, top = center_crop_offsets(new_width, new_height, size)
    # Multiply before dividing: the product of two ints is exact, so the right/bottom edge is exactly
    # ``width``/``height`` when the crop reaches it, and Pillow's "box exceeds image" check never trips.
    return (
        left * width / new_width,
        top * height / new_height,
        (left + size) * width / new_width,
        (top + size) * height / new_height,
    )


def _identity_box(box, width, height):
    return box


# For each EXIF orientation: the transpose that makes the stored image upright, and how a box in upright
# coordinates maps back into stored coordinates (width, height: the stored size). Orientations 5-8 swap axes.
_BoxMap = Callable[[tuple[float, float, float, float], int, int], tuple[float, float, float, float]]
_ORIENTATIONS: dict[int, tuple[Image.Transpose | None, _BoxMap]] = {
    1: (None, _identity_box),
    2: (Image.Transpose.FLIP_LEFT_RIGHT, lambda b, w, h: (w - b[2], b[1], w - b[0], b[3])),
    3: (Image.Transpose.ROTATE_180, lambda b, w, h: (w - b[2], h - b[3], w - b[0], h - b[1])),
    4: (Image.Transpose.FLIP_TOP_BOTTOM, lambda b, w, h: (b[0], h - b[3], b[2], h - b[1])),
    5: (Image.Transpose.TRANSPOSE, lambda b, w, h: (b[1], b[0], b[3], b[2])),
    6: (Image.Transpose.ROTATE_270, lambda b, w, h: (b[1], h - b[2], b[3], h - b[0])),
    7: (Image.Transpose.TRANSVERSE, lambda b, w, h: (w - b[3], h - b[2], w - b[1], h - b[0])),
    8: (Image.Transpose.ROTATE_90, lambda b, w, h: (w - b[3], b[0], w - b[1], b[2])),
}


# The same transposes on an (H, W, C) array, as views (the fast path turns the decoded array upright).
_UPRIGHT_ARRAY: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8); 1 when absent or invalid. Parses EXIF only when the file has a block."""
    if "exif" not in image.info:
        return 1
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block must not cost us the image
        return 1
    return value if value in _ORIENTATIONS else 1


def upright_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    return (height, width) if orientation >= 5 else (width, height)


# Opening and validating ----------------------------------------------------------------------------------


def open_image(data: bytes | bytearray | memoryview, max_pixels: int) -> Image.Image:
    """Identify ``data`` and check it is an accepted format under ``max_pixels``; nothing is decoded yet.

    Pillow's own bomb check (``Image.MAX_IMAGE_PIXELS``) only warns below twice its limit: the warning is
    turned into an error here, so the effective limit is ``min(max_pixels, Image.MAX_IMAGE_PIXELS)``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(Status.IMAGE_TOO_LARGE, f"decompression bomb guard: {exc}") from None
    except UnidentifiedImageError:
        raise _unaccepted(data) from None
    except Exception as exc:  # plugins raise ValueError, struct.error, EOFError... on malformed headers
        raise ImageRejected(Status.DECODE_ERROR, f"unreadable image header: {_describe(exc)}") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageRejected(
            Status.IMAGE_TOO_LARGE,
            f"{image.format} of {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
        )
    return image


def _unaccepted(data: bytes | bytearray | memoryview) -> ImageRejected:
    """Why no accepted format recognised ``data``: another image format, or not an image at all."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # identifying only; nothing is decoded
            with Image.open(io.BytesIO(data)) as other:
                return ImageRejected(Status.UNSUPPORTED_FORMAT, f"unsupported image format {other.format}")
    except Exception:
        head = bytes(data[:8])
        return ImageRejected(Status.DECODE_ERROR, f"not a recognised image (starts with {head!r})")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, OSError) else f"{type(exc).__name__}: {text}"


# Decoding ------------------------------------------------------------------------------------------------


def decode_square(
    data: bytes | bytearray | memoryview,
    out: np.ndarray,
    *,
    max_pixels: int,
    fast: bool = True,
    apply_exif_orientation: bool = True,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
    draft_margin: float = DRAFT_MARGIN,
) -> tuple[int, int]:
    """Decode ``data`` into ``out`` (S, S, 3) uint8 as the reference would; return the upright (width, height).

    Raises :class:`ImageRejected` (with a status) for anything that cannot be scored; ``out`` is then
    left as it was.
    """
    size = out.shape[0]
    image = open_image(data, max_pixels)
    try:
        stored_width, stored_height = image.size
        orientation = exif_orientation(image) if apply_exif_orientation else 1
        transpose, box_to_stored = _ORIENTATIONS[orientation]
        width, height = upright_size(stored_width, stored_height, orientation)
        if fast and resample in _TORCH_FILTERS and _fits_fast_resize(width, height, size):
            pixels, reduction = _decode_for_fast_resize(data, image, size, draft_margin)
            if pixels is not None:
                # torch always runs the horizontal pass first, and each pass rounds to 8 bits, so the image
                # goes to torch in the frame where the reference's first pass is horizontal: upright (in the
                # stored frame orientations 5-8 swap the axes), then transposed when Pillow would resample
                # vertically first (Pillow 13, downscaled portraits over 2:1). In the wrong order, 12-23% of
                # values are off, by up to 5 levels.
                transposed = _reference_resizes_vertically_first(width, height, size)
                view = _UPRIGHT_ARRAY[orientation](pixels)
                if transposed:
                    view = view.transpose(1, 0, 2)
                if view is not pixels:
                    pixels = np.ascontiguousarray(view)
                across, down = (height, width) if transposed else (width, height)
                small = _resize_and_crop(pixels, across, down, reduction, size, _TORCH_FILTERS[resample])
                out[...] = small.transpose(1, 0, 2) if transposed else small
                return width, height

        box = box_to_stored(center_crop_box(width, height, size), stored_width, stored_height)
        if fast and isinstance(image, JpegImagePlugin.JpegImageFile):
            box = _draft(image, box, size, draft_margin)
        reduced = image.size != (stored_width, stored_height)  # a DCT reduction: not the reference's input
        _load(image)
        resizable = _resizable(image)
        # The reference's pass order, seen from the stored frame (where 5-8 swap the axes).
        vertical_first = _reference_resizes_vertically_first(width, height, size) != (orientation >= 5)
        if not reduced and _fits_exact_resize(width, height, size):
            resized_width, resized_height = resized_size(width, height, size)
            left, top = center_crop_offsets(resized_width, resized_height, size)
            stored_resized = upright_size(resized_width, resized_height, orientation)  # 5-8 swap back
            crop = box_to_stored((left, top, left + size, top + size), *stored_resized)
            small = _resize_exact(resizable, stored_resized, crop, resample, vertical_first)
        else:
            small = _resize_box(resizable, _clamp(box, resizable.size), size, resample, vertical_first)
        if transpose is not None:
            small = small.transpose(transpose)
        _write_rgb(small, out)
        return width, height
    finally:
        image.close()


def _draft(image: JpegImagePlugin.JpegImageFile, box: tuple[float, float, float, float], size: int,
           draft_margin: float) -> tuple[float, float, float, float]:
    """Ask libjpeg for the DCT reduction :func:`dct_reduction` picks; return ``box`` in the reduced frame."""
    width, height = image.size
    reduction = dct_reduction(width, height, size, draft_margin)
    # Pillow takes the largest of 8, 4, 2, 1 up to min(width // asked, height // asked): exactly ``reduction``.
    drafted = image.draft("RGB", (width // reduction, height // reduction)) if reduction > 1 else None
    if drafted is None:
        return box
    dct_scale = width / drafted[1][2]
    return tuple(edge / dct_scale for edge in box)


def dct_reduction(width: int, height: int, size: int, draft_margin: float = DRAFT_MARGIN) -> int:
    """The largest of 8, 4, 2, 1 that keeps the shortest side >= ``draft_margin * size`` after the reduction.

    Only powers of two: libjpeg-turbo also scales by M/8 (7/8, 5/8...), but those IDCTs blur less like
    bicubic does and put a 256-px image 0.027 away from the reference (bench/bench_decode.py).
    """
    least_side = math.ceil(size * draft_margin)
    shortest = min(width, height)
    return next(reduction for reduction in (8, 4, 2, 1) if reduction == 1 or shortest >= reduction * least_side)


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except Exception as exc:
        raise ImageRejected(Status.DECODE_ERROR, f"corrupt or truncated {image.format}: {_describe(exc)}") from None


# The fast path -------------------------------------------------------------------------------------------

# Filters torch resamples as Pillow does (antialiased, same kernels: torchvision checks it against Pillow).
_TORCH_FILTERS = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}
# The fast path resamples the whole image, not only the crop: past this many crops' worth (a panorama)
# Pillow's box path does less work, and a 20 000 x 2 strip would blow up into a 2.2-million-pixel-wide one.
MAX_FAST_RESIZE_CROPS = 4


def _fits_fast_resize(width: int, height: int, size: int) -> bool:
    return max(resized_size(width, height, size)) <= MAX_FAST_RESIZE_CROPS * size


def _decode_for_fast_resize(data: bytes | bytearray | memoryview, image: Image.Image, size: int,
                            draft_margin: float) -> tuple[np.ndarray | None, int]:
    """The stored image as (H, W, 3) uint8 and its DCT reduction; None: leave it to the Pillow path.

    JPEGs go to libjpeg-turbo through simplejpeg, straight into a numpy array: the same pixels as Pillow's
    decoder (both libjpeg-turbo, accurate DCT, fancy upsampling), without Pillow's extra copy. Grey JPEGs
    come out as RGB: torch's SIMD resampling takes 3 or 4 channels, and one channel runs slower.
    """
    if isinstance(image, JpegImagePlugin.JpegImageFile):
        if image.mode not in ("RGB", "L"):
            return None, 1  # CMYK / YCCK: Pillow's conversion, as the reference does
        reduction = dct_reduction(*image.size, size, draft_margin)
        try:
            pixels = simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_width=math.ceil(image.size[0] / reduction),
                min_height=math.ceil(image.size[1] / reduction),
            )
        except ValueError:
            # simplejpeg is strict: any libjpeg warning raises. Pillow decides what the reference
            # would: truncated is an error, a recoverable glitch decodes.
            return None, 1
        return pixels, reduction
    _load(image)
    resizable = _resizable(image)
    return (np.array(resizable.convert("RGB")) if resizable.mode in ("RGB", "L") else None), 1


@functools.cache
def _torch() -> Any:
    """torch, imported on first use: task workers that never decode do not load it (hundreds of MiB)."""
    with long_lived():
        import torch
    return torch


def _resize_and_crop(pixels: np.ndarray, width: int, height: int, reduction: int, size: int,
                     interpolation: str) -> np.ndarray:
    """The reference's Resize + CenterCrop of the upright ``width`` x ``height`` image, in torch.

    ``pixels`` is that image as (H, W, 3) uint8, DCT-reduced by ``reduction`` (1, 2, 4 or 8). torch's
    antialiased uint8 resampling is a SIMD port of Pillow's (AVX2/AVX-512), several times faster: the
    reference's pixels but for 1-level differences on about 0.2% of values and 2-level ones on about one in a
    million (never more: "Accuracy" in the module docstring), provided the reference also resamples
    horizontally first (the caller transposes otherwise).
    """
    torch = _torch()

    resized_width, resized_height = resized_size(width, height, size)
    left, top = center_crop_offsets(resized_width, resized_height, size)
    # The reference's scale, from the full size: a reduced image is ceil(side / reduction) pixels, so its
    # own size would shift and stretch the crop by up to a pixel.
    scale_y, scale_x = resized_height * reduction / height, resized_width * reduction / width
    # Only rows and columns up to the crop's far edge are computed (the scales fix where each one samples).
    # F.interpolate takes either a size or a scale, not both, and returns NCHW, which costs a transposing
    # copy into the (S, S, 3) output; the aten op it calls takes both and writes into channels-last memory.
    resized = torch.empty((1, top + size, left + size, 3), dtype=torch.uint8)
    resample = getattr(torch.ops.aten, f"_upsample_{interpolation}2d_aa")  # what F.interpolate(antialias=True) runs
    resample.out(torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0), [top + size, left + size], False,
             scale_y, scale_x, out=resized.permute(0, 3, 1, 2))
    return resized[0, top:, left:].numpy()


def _resizable(image: Image.Image) -> Image.Image:
    """The image in a mode we resample in: RGB, L, CMYK or YCbCr (the last two as the reference does)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:  # a colour-key transparency on 16-bit grey is dropped (very rare)
        return _sixteen_to_eight_bits(image)
    if image.has_transparency_data:
        grey = mode in ("1", "L", "LA", "La")
        return _matte_over_white(image.convert("LA" if grey else "RGBA"))  # applies palette alpha, colour keys
    if mode in _NATIVE_MODES:
        return image
    if mode in ("P", "RGBX"):
        return image.convert("RGB")
    if mode == "1":
        return image.convert("L")
    raise ImageRejected(Status.UNSUPPORTED_FORMAT, f"unsupported image mode {mode} in {image.format}")


def _matte_over_white(image: Image.Image) -> Image.Image:
    """LA or RGBA composited over white, with img2dataset's formula: c * a / 255 + 255 - a, rounded.

    Done at full size, before resampling, so the result is the reference's on the matted image (transparent
    images are rare: img2dataset mattes them before writing). uint16 holds every intermediate:
    c * a + 255 * (255 - a) <= 255 * 255.
    """
    values = np.asarray(image).astype(np.uint16)
    colour, alpha = values[..., :-1], values[..., -1:]
    matted = (colour * alpha + 255 * (255 - alpha) + 127) // 255  # + 127: round half up (never a tie)
    if image.mode == "LA":
        return Image.fromarray(matted[..., 0].astype(np.uint8))
    return Image.fromarray(matted.astype(np.uint8))


def _sixteen_to_eight_bits(image: Image.Image) -> Image.Image:
    """Scale 0..65535 to 0..255, rounding (Pillow's own conversion clips everything above 255 to white)."""
    values = np.asarray(image).astype(np.int64)
    np.clip(values, 0, 65535, out=values)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


def _clamp(box: tuple[float, ...], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Guard Pillow's "box exceeds image" check against float rounding at the image edge."""
    width, height = size
    left, top, right, bottom = box
    return max(0.0, left), max(0.0, top), min(float(width), right), min(float(height), bottom)


# The Pillow path resamples the cropped axis over its full extent (the reference's pixels, bit for bit) up to
# this many crops' worth; past it (panoramas) only the crop's box is resampled (see _resize_exact).
MAX_EXACT_RESIZE_CROPS = 16


def _fits_exact_resize(width: int, height: int, size: int) -> bool:
    return max(resized_size(width, height, size)) <= MAX_EXACT_RESIZE_CROPS * size


def _resize_exact(image: Image.Image, resized: tuple[int, int], crop_box: tuple[int, int, int, int],
                  resample: Image.Resampling, vertical_first: bool) -> Image.Image:
    """The reference's ``resize(resized)`` then ``crop(crop_box)``, one single-axis Pillow pass at a time.

    Bit for bit the reference's pixels, because each pass is called with the reference's own geometry: the
    whole input extent (0 to width or height) onto the whole resized extent. Pillow computes a pass's filter
    weights from that geometry and each output line from its input line alone, so the lines we keep are the
    reference's; the crop between the passes only drops lines the second pass would compute and throw away.

    Why not resample only the crop's box, which is cheaper (the long axis computes S outputs, not its whole
    resized length)? Pillow takes the box as C floats: an edge like 16 * 294 / 257 is rounded to 24 bits,
    and the pass's scale is then ``(float)(right - left) / S`` rather than ``width / new_width``. Every
    filter centre drifts by up to ~1e-5 px, far more than the 2^-22 steps of Pillow's fixed-point weights,
    so some weights change by one step; on a value whose sum lies near a .5 boundary that flips the rounding
    of the first pass by 1 level, and the second pass, whose bicubic weights sum to up to 1.25 in absolute
    value, can carry that to 2 levels (measured: 0.02% of values off, up to 2 levels, e.g. a 294 x 256
    photo). Only the long axis is cropped (the short one's box edges are 0 and the side: exact floats), and
    resampling it whole costs only a small share of this path's images/s (BENCHMARKS.md).
    """
    def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
        return image if image.size == size else image.resize(size, resample)  # Pillow would copy

    def crop(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
        return image if box == (0, 0) + image.size else image.crop(box)

    width, height = image.size
    new_width, new_height = resized
    left, top, right, bottom = crop_box
    if vertical_first:
        rows = crop(resize(image, (width, new_height)), (0, top, width, bottom))
        return crop(resize(rows, (new_width, bottom - top)), (left, 0, right, bottom - top))
    columns = crop(resize(image, (new_width, height)), (left, 0, right, height))
    return crop(resize(columns, (right - left, new_height)), (0, top, right - left, bottom))


def _resize_box(image: Image.Image, box: tuple[float, float, float, float], size: int,
                resample: Image.Resampling, vertical_first: bool) -> Image.Image:
    """``image.resize((size, size), box=box)`` with the two passes in the given order, one call per axis.

    A pass whose other axis keeps its full extent is a single-axis pass in Pillow, so the order is ours.
    """
    width, height = image.size
    left, top, right, bottom = box
    if vertical_first:
        rows = image.resize((width, size), resample, box=(0, top, width, bottom))
        return rows.resize((size, size), resample, box=(left, 0, right, size))
    columns = image.resize((size, height), resample, box=(left, 0, right, height))
    return columns.resize((size, size), resample, box=(0, top, size, bottom))


def _reference_resizes_vertically_first(width: int, height: int, size: int) -> bool:
    """Whether Pillow runs the vertical pass first in the reference's ``Resize`` of a width x height image."""
    if not _pillow_may_resample_vertically_first():
        return False
    new_width, new_height = resized_size(width, height, size)
    height_shrink = height - new_height
    return height_shrink > 0 and height_shrink > 2 * (width - new_width)  # Pillow 13's rule, Resample.c


@functools.cache
def _pillow_may_resample_vertically_first() -> bool:
    """True on Pillows that pick the vertical pass first for images whose height shrinks the most (>= 13).

    Asked of Pillow itself, on a tiny image where the two orders give different results, rather than read
    from its version number.
    """
    probe = Image.frombytes("L", (4, 64), bytes((i * 97 + 13) % 256 for i in range(256)))
    bicubic = Image.Resampling.BICUBIC
    direct = probe.resize((3, 8), bicubic).tobytes()
    vertical_first = probe.resize((4, 8), bicubic).resize((3, 8), bicubic).tobytes()
    horizontal_first = probe.resize((3, 64), bicubic).resize((3, 8), bicubic).tobytes()
    return direct == vertical_first != horizontal_first


def _write_rgb(small: Image.Image, out: np.ndarray) -> None:
    if small.mode == "L":
        out[...] = np.asarray(small)[..., None]  # grey to three equal channels, as convert("RGB") does
        return
    if small.mode != "RGB":
        small = small.convert("RGB")
    out[...] = np.asarray(small)
