"""A corpus of bad and odd images, built in memory (no files, no network), for any test that decodes.

``hostile_corpus()`` maps a case name to a :class:`HostileCase`: the bytes (or None), the extension the
tar member would carry, the status the decode stage must give it and, for images that decode, the
upright size. Build blocks (``photo``, ``encode``, ``png_chunks``...) are public for tests that need
variants. Also here: the reference preprocessing (open_clip's own transform), for comparing pixels.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.schema import Status

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)  # open_clip.OPENAI_DATASET_MEAN
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)  # open_clip.OPENAI_DATASET_STD

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (30, 40, 210)


@dataclass(frozen=True)
class HostileCase:
    data: bytes | None
    ext: str | None  # the tar member's extension (it may lie)
    status: Status  # what the decode stage must report
    size: tuple[int, int] | None = None  # upright (width, height) when it decodes
    note: str = ""


# Building blocks ---------------------------------------------------------------------------------


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB uint8 image with smooth gradients, edges and fine texture (so resampling shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    image = np.stack([200 * u + 30, 180 * v + 40, 120 * (1 - u) * v + 60], axis=-1)
    image += 40 * np.sin(x / 3.0)[..., None] * np.cos(y / 5.0)[..., None]  # fine texture
    image[(u > 0.3) & (u < 0.5) & (v > 0.2) & (v < 0.7)] = (240, 240, 30)  # a hard-edged block
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(image: Image.Image | np.ndarray, fmt: str, **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_chunks(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A PNG written by hand: lets us declare any size and write 16-bit colour Pillow cannot save."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw_rows, 9))
        + png_chunk(b"IEND", b"")
    )


def png_bomb(width: int, height: int) -> bytes:
    """A 1-bit PNG declaring ``width x height`` that is a few hundred bytes on disk.

    Only the first rows are actually present: a decoder that trusts the header before checking the pixel
    count has already lost (this is the size check's job, not the decompressor's).
    """
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    return png_chunks(width, height, 1, 0, row * 4)


def jpeg_with_declared_size(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF header is patched to declare another size (a JPEG bomb)."""
    data = bytearray(encode(photo(16, 16), "JPEG"))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def rgb16_png(width: int, height: int) -> bytes:
    image = photo(width, height).astype(np.uint16) * 257
    rows = b"".join(b"\x00" + image[y].astype(">u2").tobytes() for y in range(height))
    return png_chunks(width, height, 16, 2, rows)


def animated(fmt: str, colours=(RED, GREEN, BLUE), size=(64, 48)) -> bytes:
    frames = [Image.new("RGB", size, colour) for colour in colours]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg(orientation: int = 6, size=(320, 200)) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo(*size), "JPEG", quality=95, exif=exif)


def palette_png(transparent: bool) -> bytes:
    image = Image.fromarray(photo(120, 90)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    if not transparent:
        return encode(image, "PNG")
    return encode(image, "PNG", transparency=0)  # palette index 0 fully transparent


def rgba_png(size=(96, 80)) -> bytes:
    rgba = np.dstack([photo(*size), np.zeros(size[::-1], np.uint8)])
    rgba[: size[1] // 2, :, 3] = 255  # top half opaque, bottom half fully transparent
    return encode(rgba, "PNG")


def grey16_png(size=(100, 70)) -> bytes:
    ramp = np.linspace(0, 65535, size[0] * size[1]).reshape(size[::-1]).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")  # mode I;16


# The corpus ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def hostile_corpus() -> dict[str, HostileCase]:
    jpeg = encode(photo(300, 200), "JPEG", quality=90)
    png = encode(photo(120, 90), "PNG")
    ok = Status.OK
    cases = {
        "none": HostileCase(None, None, Status.NO_IMAGE),
        "empty": HostileCase(b"", "jpg", Status.EMPTY_IMAGE),
        "text": HostileCase(b"this is not an image, it is a caption\n", "jpg", Status.DECODE_ERROR),
        "html_error_page": HostileCase(b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "jpg",
                                       Status.DECODE_ERROR, note="what a CDN sends instead of the image"),
        "jpeg_header_only": HostileCase(jpeg[:40], "jpg", Status.DECODE_ERROR),
        "truncated_jpeg": HostileCase(jpeg[: len(jpeg) // 2], "jpg", Status.DECODE_ERROR),
        "truncated_png": HostileCase(png[: len(png) // 2], "png", Status.DECODE_ERROR),
        "png_bomb": HostileCase(png_bomb(100_000, 100_000), "png", Status.IMAGE_TOO_LARGE,
                                note="10^10 pixels declared: Pillow raises DecompressionBombError"),
        "png_bomb_warning_range": HostileCase(png_bomb(10_000, 10_000), "png", Status.IMAGE_TOO_LARGE,
                                              note="10^8 pixels: above Pillow's limit, below 2x (a warning)"),
        "jpeg_bomb": HostileCase(jpeg_with_declared_size(60_000, 60_000), "jpg", Status.IMAGE_TOO_LARGE),
        "tiff": HostileCase(encode(photo(40, 30), "TIFF"), "jpg", Status.UNSUPPORTED_FORMAT),
        "ico": HostileCase(encode(photo(32, 32), "ICO"), "png", Status.UNSUPPORTED_FORMAT),
        "cmyk_jpeg": HostileCase(encode(Image.fromarray(photo(300, 200)).convert("CMYK"), "JPEG", quality=95),
                                 "jpg", ok, (300, 200)),
        "grey_jpeg": HostileCase(encode(Image.fromarray(photo(300, 200)).convert("L"), "JPEG"), "jpg", ok,
                                 (300, 200)),
        "progressive_jpeg": HostileCase(encode(photo(640, 480), "JPEG", progressive=True), "jpg", ok, (640, 480)),
        "exif_rotated_jpeg": HostileCase(exif_rotated_jpeg(6), "jpg", ok, (200, 320), note="orientation 6"),
        "grey16_png": HostileCase(grey16_png(), "png", ok, (100, 70), note="mode I;16"),
        "rgb16_png": HostileCase(rgb16_png(60, 40), "png", ok, (60, 40)),
        "palette_png": HostileCase(palette_png(transparent=False), "png", ok, (120, 90)),
        "palette_png_transparent": HostileCase(palette_png(transparent=True), "png", ok, (120, 90)),
        "rgba_png": HostileCase(rgba_png(), "png", ok, (96, 80)),
        "la_png": HostileCase(encode(Image.fromarray(photo(50, 40)).convert("LA"), "PNG"), "png", ok, (50, 40)),
        "grey_png": HostileCase(encode(Image.fromarray(photo(50, 40)).convert("L"), "PNG"), "png", ok, (50, 40)),
        "one_bit_png": HostileCase(encode(Image.fromarray(photo(50, 40)).convert("1"), "PNG"), "png", ok,
                                   (50, 40)),
        "animated_gif": HostileCase(animated("GIF"), "gif", ok, (64, 48)),
        "animated_webp": HostileCase(animated("WEBP"), "webp", ok, (64, 48)),
        "animated_png": HostileCase(animated("PNG"), "png", ok, (64, 48)),
        "webp": HostileCase(encode(photo(300, 200), "WEBP", quality=90), "webp", ok, (300, 200)),
        "webp_lossless_alpha": HostileCase(encode(Image.fromarray(photo(64, 64)).convert("RGBA"), "WEBP",
                                                  lossless=True), "webp", ok, (64, 64)),
        "bmp": HostileCase(encode(photo(64, 48), "BMP"), "bmp", ok, (64, 48)),
        "tiny_1x1": HostileCase(encode(np.full((1, 1, 3), 200, np.uint8), "PNG"), "png", ok, (1, 1)),
        "panorama": HostileCase(encode(photo(4000, 40), "JPEG"), "jpg", ok, (4000, 40)),
        "extreme_panorama": HostileCase(encode(photo(20_000, 2), "PNG"), "png", ok, (20_000, 2),
                                        note="the reference would resample to 2 240 000 x 224 first"),
        "png_named_jpg": HostileCase(png, "jpg", ok, (120, 90), note="the extension lies; content decides"),
        "jpeg_named_webp": HostileCase(jpeg, "webp", ok, (300, 200)),
    }
    try:
        frames = [Image.fromarray(photo(80, 60, seed)) for seed in (1, 2)]
        cases["mpo"] = HostileCase(encode(frames[0], "MPO", save_all=True, append_images=frames[1:]), "jpg",
                                   ok, (80, 60), note="multi-picture JPEG, as cameras write")
    except (KeyError, OSError, ValueError):  # a Pillow without MPO writing
        pass
    return cases


# The reference ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def clip_transform(size: int = 224, interpolation: str = "bicubic"):
    """open_clip's own eval preprocessing (no weights needed): what the decode stage must reproduce."""
    import open_clip

    return open_clip.image_transform(
        size, is_train=False, mean=tuple(CLIP_MEAN), std=tuple(CLIP_STD), interpolation=interpolation,
        resize_mode="shortest",
    )


def reference_tensor(image: Image.Image | bytes, size: int = 224) -> np.ndarray:
    """The reference's normalised (3, S, S) float32 tensor for an image or its bytes."""
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    return clip_transform(size)(image).numpy()


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., S, S, 3) to the normalised (..., 3, S, S) the GPU stage computes."""
    values = (pixels.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    return np.moveaxis(values, -1, -3)


def to_uint8(tensor: np.ndarray) -> np.ndarray:
    """A reference tensor (3, S, S) back to the uint8 (S, S, 3) it was made from (exact: ToTensor is x/255)."""
    values = np.moveaxis(tensor, -3, -1) * CLIP_STD + CLIP_MEAN
    return np.rint(values * 255.0).astype(np.uint8)
