"""Image bytes to the square uint8 pixels CLIP's preprocessing would produce.

Pure functions, no Ray: the decode stage calls :func:`decode_square` once per row.

The reference
-------------
open_clip's eval transform, ``image_transform(S, is_train=False, resize_mode="shortest")``, on a PIL image:

1. torchvision ``Resize(S)``: shortest side to ``S``, long side ``int(S * long / short)`` (truncated), Pillow
   resampling (bicubic for CLIP; Pillow always antialiases, i.e. widens the filter when downscaling);
2. ``CenterCrop(S)``: offsets ``int(round((side - S) / 2))`` -- Python's ``round``, ties to even;
3. ``convert("RGB")``, then ``ToTensor`` and ``Normalize`` (the last two happen later, on the GPU).

How we reach the same pixels for less work
------------------------------------------
* Only the pixels that survive the crop are resampled: each of Pillow's two passes (one per axis) is run
  with the source-space box the centre crop keeps (``resize(..., box=...)``), so a panorama is never resampled
  to a 100 000-pixel-wide strip first. The passes run in the order Pillow picks for the reference's full
  resize: Pillow 13 runs the vertical pass first when the height shrinks more than twice as much as the width
  (python-pillow/Pillow#9549), and since each pass rounds and clips to 8 bits, the order shows (up to 6
  levels). A single box resize would let Pillow pick the order from the crop's size instead. Result: equal to
  the reference but for a 1-level difference on well under 1% of values (box edges are C floats in Pillow).
* ``fast=True``, JPEG only: ``Image.draft`` lets libjpeg-turbo decode at 1/2, 1/4 or 1/8 scale in the DCT
  domain, then the same box resize finishes the job (box divided by the DCT scale). DCT scaling keeps more
  fine detail than Pillow's antialiased bicubic, so the error grows as the bicubic step shrinks. Measured on
  skimage's photos, mean absolute difference (MAD) from the reference in normalised units (CLIP mean/std):
  0.02-0.03 when the DCT does all the reduction (shortest side just above 448, 896, 1792 for S=224), 0.016
  when bicubic still reduces by 1.25x, 0.011 at 1.5x, 0.006 at 2x. Hence ``DRAFT_MARGIN = 1.25``: the
  largest DCT reduction that keeps the shortest side >= 1.25 S. Every image stays under the 0.02 target
  (worst seen 0.017, typically 0.004-0.01); the price is no DCT reduction below 560 px. bench/bench_decode.py,
  per core: 2.2-2.8x the reference's speed at 768-1024 px (1.3-1.5x at 512: only the crop is resampled and
  nothing is normalised on the CPU); a margin of 1.0 would run 512 px images over 2x faster, with MAD up to 0.021.

Deliberate differences from the reference (each one tested)
-----------------------------------------------------------
* EXIF orientation (``apply_exif_orientation``) is applied; the reference ignores it and scores the photo
  sideways. Our geometry is the reference's applied to the upright image; the box is mapped into the stored
  (unrotated) frame and only the S x S result is transposed, so rotated photos cost no full-size transpose.
  Agreement with the reference on the upright image: as exact as for any other image.
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
from typing import Callable

import numpy as np
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


def center_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The source-space (left, top, right, bottom) that ``Resize(size)`` + ``CenterCrop(size)`` keeps.

    Resizing exactly this box to ``size x size`` gives the reference's pixels without the full resize.
    """
    new_width, new_height = resized_size(width, height, size)
    left = int(round((new_width - size) / 2.0))  # Python's round (ties to even), as torchvision does
    top = int(round((new_height - size) / 2.0))
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
        box = box_to_stored(center_crop_box(width, height, size), stored_width, stored_height)

        if fast and isinstance(image, JpegImagePlugin.JpegImageFile):
            # Pillow picks the largest of 1/2, 1/4, 1/8 that keeps both sides >= the size asked for.
            least_side = math.ceil(size * draft_margin)
            drafted = image.draft("RGB", (least_side, least_side))
            if drafted is not None:
                dct_scale = stored_width / drafted[1][2]
                box = tuple(edge / dct_scale for edge in box)
        try:
            image.load()
        except Exception as exc:
            raise ImageRejected(
                Status.DECODE_ERROR, f"corrupt or truncated {image.format}: {_describe(exc)}"
            ) from None

        resizable = _resizable(image)
        # The reference's pass order, seen from the stored frame (where 5-8 swap the axes).
        vertical_first = _reference_resizes_vertically_first(width, height, size) != (orientation >= 5)
        small = _resize_box(resizable, _clamp(box, resizable.size), size, resample, vertical_first)
        if transpose is not None:
            small = small.transpose(transpose)
        _write_rgb(small, out)
        return width, height
    finally:
        image.close()


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
