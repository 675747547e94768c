"""pipeline.images against open_clip's own preprocessing (the reference), and its deliberate differences."""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import skimage.data
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms.functional import _compute_resized_output_size

from pipeline.images import (
    _ORIENTATIONS,
    _UPRIGHT_ARRAY,
    DRAFT_MARGIN,
    EXACT_MAX_LEVEL_DIFFERENCE,
    FAST_MAX_LEVEL_DIFFERENCE,
    FAST_MAX_OFF_BY_ONE,
    FAST_MAX_OFF_BY_ONE_PER_IMAGE,
    FAST_MAX_OFF_BY_TWO,
    MAX_EXACT_RESIZE_CROPS,
    MAX_FAST_RESIZE_CROPS,
    ImageRejected,
    _resize_and_crop,
    _resize_box,
    center_crop_box,
    dct_reduction,
    decode_square,
    open_image,
    resample_filter,
    resized_size,
)
from pipeline.schema import Status
from tests.hostile_images import (
    clip_transform,
    encode,
    exif_rotated_jpeg,
    grey16_png,
    hostile_corpus,
    normalise,
    palette_png,
    photo,
    png_bomb,
    reference_tensor,
    rgba_png,
    to_uint8,
)

SIZE = 224
NO_LIMIT = 1 << 40
FAST_MAD_TARGET = 0.02  # normalised units
LEAST_SIDE = math.ceil(SIZE * DRAFT_MARGIN)  # the shortest side a DCT reduction must leave (280)
both_paths = pytest.mark.parametrize("fast", [False, True], ids=["pillow", "fast"])


def decode(data: bytes, fast: bool = False, size: int = SIZE, **options) -> np.ndarray:
    out = np.zeros((size, size, 3), np.uint8)
    decode_square(data, out, max_pixels=NO_LIMIT, fast=fast, **options)
    return out


def level_differences(pixels: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.abs(pixels.astype(int) - to_uint8(reference))


def assert_matches_reference(pixels: np.ndarray, reference: np.ndarray, fast: bool = False) -> None:
    """The reference's uint8 pixels; the fast path within its bounds (pipeline.images, stated in README.md).

    ``fast=False``: no value differs. ``fast=True`` (torch's resampling, no DCT reduction): at most
    FAST_MAX_LEVEL_DIFFERENCE (2) levels off, a bound from the arithmetic; off by 1 or more on at most
    FAST_MAX_OFF_BY_ONE_PER_IMAGE of the values and by 2 on at most FAST_MAX_OFF_BY_TWO.
    """
    difference = level_differences(pixels, reference)
    if not fast:
        assert difference.max() <= EXACT_MAX_LEVEL_DIFFERENCE, (difference.max(), (difference > 0).mean())
        return
    assert difference.max() <= FAST_MAX_LEVEL_DIFFERENCE, difference.max()
    assert (difference >= 1).mean() <= FAST_MAX_OFF_BY_ONE_PER_IMAGE, (difference >= 1).mean()
    assert (difference >= 2).mean() <= FAST_MAX_OFF_BY_TWO, (difference >= 2).mean()


def photo_jpeg(name: str, shortest_side: int, portrait: bool = False) -> bytes:
    image = Image.fromarray(getattr(skimage.data, name)())
    if portrait:  # skimage's photos are all landscape; Pillow picks its pass order differently for portraits
        image = image.transpose(Image.Transpose.ROTATE_90)
    scale = shortest_side / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    return encode(image, "JPEG", quality=95)


# Geometry ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("width, height", [(1, 1), (224, 224), (225, 224), (300, 200), (200, 300), (451, 300),
                                           (20_000, 2), (3, 17_000), (1023, 767), (640, 481)])
def test_resized_size_is_torchvisions(width, height):
    new_height, new_width = _compute_resized_output_size((height, width), [SIZE])
    assert resized_size(width, height, SIZE) == (new_width, new_height)


def test_crop_box_is_the_centre_crop_in_source_coordinates():
    assert center_crop_box(224, 224, 224) == (0, 0, 224, 224)
    assert center_crop_box(448, 224, 224) == (112, 0, 336, 224)
    # (225 - 224) / 2 = 0.5 rounds to 0 (ties to even), as torchvision's CenterCrop does.
    assert center_crop_box(225, 224, 224)[0] == 0
    assert center_crop_box(227, 224, 224)[0] == 2  # 1.5 rounds to 2
    left, top, right, bottom = center_crop_box(20_000, 2, 224)
    assert right <= 20_000 and bottom == 2 and right - left == pytest.approx(2.0)  # a 2 x 2 source square


@pytest.mark.parametrize("width, height", [(224, 224), (225, 224), (227, 226), (300, 200), (199, 301), (640, 480),
                                           (97, 53), (1000, 223), (5, 7), (1201, 899)])
def test_exact_path_equals_the_reference_on_any_shape(width, height):
    data = encode(photo(width, height), "PNG", compress_level=0)
    assert_matches_reference(decode(data), reference_tensor(data))


@pytest.mark.parametrize("name, portrait", [("astronaut", False), ("chelsea", False), ("coffee", True)])
@pytest.mark.parametrize("shortest_side", [256, 512, 1000])
def test_exact_path_equals_the_reference_on_photos(name, portrait, shortest_side):
    data = photo_jpeg(name, shortest_side, portrait)
    assert_matches_reference(decode(data), reference_tensor(data))


# Real photographs at sizes spread over what a shard holds, none DCT-reduced (shortest side < 560):
# (skimage photo, width, height, format). Upscaled and downscaled, odd sizes, portraits over 2:1 (which Pillow
# 13 resamples vertically first), greyscale, JPEG of two qualities and PNG.
ACCURACY_CORPUS = [
    ("astronaut", 16, 16, "JPEG"), ("camera", 37, 48, "PNG"), ("chelsea", 150, 100, "JPEG"),
    ("coffee", 100, 150, "JPEG"), ("coins", 223, 300, "JPEG"), ("rocket", 200, 620, "JPEG"),
    ("immunohistochemistry", 224, 224, "PNG"), ("hubble_deep_field", 225, 224, "JPEG"),
    ("chelsea", 294, 256, "JPEG"), ("astronaut", 256, 384, "JPEG"), ("coffee", 300, 900, "JPEG"),
    ("camera", 512, 512, "JPEG"), ("rocket", 559, 745, "PNG"), ("coins", 700, 300, "JPEG"),
    ("hubble_deep_field", 448, 300, "PNG"), ("immunohistochemistry", 390, 1000, "JPEG"),
]


def corpus_image(name: str, width: int, height: int, fmt: str, index: int) -> bytes:
    image = ImageOps.fit(Image.fromarray(getattr(skimage.data, name)()), (width, height), Image.Resampling.LANCZOS)
    return encode(image, fmt, **({"quality": (95, 75)[index % 2]} if fmt == "JPEG" else {"compress_level": 1}))


@pytest.fixture(scope="module")
def accuracy_corpus() -> list[tuple[str, bytes, np.ndarray]]:
    """(label, bytes, the reference's uint8 pixels) for ACCURACY_CORPUS."""
    corpus = []
    for index, (name, width, height, fmt) in enumerate(ACCURACY_CORPUS):
        data = corpus_image(name, width, height, fmt, index)
        corpus.append((f"{name} {width}x{height} {fmt}", data, to_uint8(reference_tensor(data))))
    return corpus


def test_exact_path_is_the_reference_bit_for_bit_on_photos_of_many_sizes(accuracy_corpus):
    for label, data, reference in accuracy_corpus:
        assert np.array_equal(decode(data), reference), label  # EXACT_MAX_LEVEL_DIFFERENCE = 0


def test_fast_path_stays_within_its_bounds_on_photos_of_many_sizes(accuracy_corpus):
    """Per image: the bounds of assert_matches_reference. Over the corpus: FAST_MAX_OFF_BY_ONE."""
    off_by_one = off_by_two = values = 0
    for label, data, reference in accuracy_corpus:
        difference = np.abs(decode(data, fast=True).astype(int) - reference)
        assert difference.max() <= FAST_MAX_LEVEL_DIFFERENCE, label
        assert (difference >= 1).mean() <= FAST_MAX_OFF_BY_ONE_PER_IMAGE, label
        assert (difference >= 2).mean() <= FAST_MAX_OFF_BY_TWO, label
        off_by_one += (difference >= 1).sum()
        off_by_two += (difference >= 2).sum()
        values += difference.size
    assert off_by_one / values <= FAST_MAX_OFF_BY_ONE
    assert off_by_two / values <= FAST_MAX_OFF_BY_TWO


def test_the_exact_path_resamples_the_whole_extent_because_a_box_is_rounded_to_c_floats():
    """The demo's blurred cat at 294 x 256: resampling only the crop's box is 2 levels off the reference.

    Pillow takes the box edges (16 * 294 / 257, ...) as C floats, so its filter weights move a step here and
    there; the first pass rounds 1 level off on a few values and the second (weights up to 1.25 in absolute
    sum) carries that to 2. The exact path gives every pass the reference's whole-side geometry instead.
    """
    cat = Image.fromarray(skimage.data.chelsea())
    blurred = cat.filter(ImageFilter.GaussianBlur(radius=max(cat.size) / 80))  # sample_data's "blurred"
    data = encode(blurred.resize((294, 256), Image.Resampling.LANCZOS), "PNG")
    reference = to_uint8(reference_tensor(data))
    boxed = _resize_box(Image.open(io.BytesIO(data)), center_crop_box(294, 256, SIZE), SIZE,
                        Image.Resampling.BICUBIC, vertical_first=False)
    assert np.abs(np.asarray(boxed).astype(int) - reference).max() == 2
    assert np.array_equal(decode(data), reference)


@both_paths
@pytest.mark.parametrize("orientation", [1, 6])
def test_tall_portraits_are_resampled_in_the_references_pass_order(fast, orientation):
    """Pillow 13 resamples downscaled portraits over 2:1 vertically first; torch always goes horizontal first.

    In torch's order, 12-23% of the values of such photos are off, by up to 5 levels (each pass rounds).
    """
    upright = ImageOps.fit(Image.fromarray(skimage.data.coffee()), (300, 900), Image.Resampling.LANCZOS)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = upright if orientation == 1 else upright.transpose(Image.Transpose.ROTATE_90)  # 6 turns it back
    data = encode(stored, "JPEG", quality=95, exif=exif)
    reference = reference_tensor(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert_matches_reference(decode(data, fast=fast), reference, fast=fast)


def test_panoramas_past_the_exact_limit_stay_within_two_levels():
    """Past MAX_EXACT_RESIZE_CROPS only the crop's box is resampled: the float box edges, 2 levels at most."""
    width, height = 64 * MAX_EXACT_RESIZE_CROPS * 4 // 3, 64  # 21.3:1
    assert max(resized_size(width, height, SIZE)) > MAX_EXACT_RESIZE_CROPS * SIZE
    data = corpus_image("astronaut", width, height, "PNG", 0)
    for fast in (False, True):
        difference = level_differences(decode(data, fast=fast), reference_tensor(data))
        assert 0 < difference.max() <= FAST_MAX_LEVEL_DIFFERENCE  # not the reference's pixels, but close


README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_states_the_bounds_the_tests_assert():
    """README.md's "Decoding" section states pipeline.images' bounds, and its measured figures keep to them."""
    section = README.read_text().split("\n## Decoding\n", 1)[1].split("\n## ", 1)[0]
    text = " ".join(section.split())
    for claim in (
        f"**{EXACT_MAX_LEVEL_DIFFERENCE} levels off**, the reference's pixels bit for bit, "
        f"up to {MAX_EXACT_RESIZE_CROPS}:1",
        f"Past {MAX_EXACT_RESIZE_CROPS}:1 only the crop's box is resampled, whose edges Pillow rounds to C "
        f"floats: at most {FAST_MAX_LEVEL_DIFFERENCE} levels off while the long side is under 16 384 px",
        f"JPEGs whose shortest side is under {2 * LEAST_SIDE} px): "
        f"**at most {FAST_MAX_LEVEL_DIFFERENCE} levels off**",
        f"at most {FAST_MAX_OFF_BY_ONE:.0%} of a set of images' values off by 1 or more",
        f"at most {FAST_MAX_OFF_BY_ONE_PER_IMAGE:.0%} of any one image's",
        f"at most {FAST_MAX_OFF_BY_TWO:.2%} of any one image's off by 2",
    ):
        assert claim in text, claim
    measured = re.search(r"Measured \(\d+ images\): ([\d.]+)% of values off by 1 or more and ([\d.]+)% .* off by 2; "
                         r"worst image ([\d.]+)% off by 1 or more and ([\d.]+)% off by 2", text)
    assert measured, "the fast path's measured figures"
    off_by_one, off_by_two, worst_one, worst_two = (float(value) / 100 for value in measured.groups())
    assert off_by_one <= FAST_MAX_OFF_BY_ONE and off_by_two <= FAST_MAX_OFF_BY_TWO
    assert worst_one <= FAST_MAX_OFF_BY_ONE_PER_IMAGE and worst_two <= FAST_MAX_OFF_BY_TWO


def torch_resampling_digest() -> str:
    """torch's kernel for this process, and a digest of what the fast path's resampling gives on a few shapes
    (upscaled, downscaled, portrait over 2:1; bicubic and bilinear)."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for width, height in ((37, 48), (300, 200), (256, 700)):
        for interpolation in ("bicubic", "bilinear"):
            digest.update(_resize_and_crop(photo(width, height), width, height, 1, SIZE, interpolation).tobytes())
    return f"{torch.backends.cpu.get_cpu_capability()} {digest.hexdigest()}"


def test_torchs_resampling_gives_the_same_bytes_on_any_cpu():
    """The fast path's figures do not depend on the CPU: torch's uint8 resampling sums the same int16 weights
    in every kernel, and its scalar one (a CPU without AVX2 gets it) gives the bytes this machine's gives.

    ATEN_CPU_CAPABILITY picks torch's kernel when it starts, hence a fresh process.
    """
    scalar = subprocess.run(
        [sys.executable, "-c", "from tests.test_images import torch_resampling_digest as d; print(d())"],
        env=dict(os.environ, ATEN_CPU_CAPABILITY="default"), cwd=Path(__file__).resolve().parents[1],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    capability, digest = torch_resampling_digest().split()
    assert scalar[0] == "DEFAULT"
    assert scalar[1] == digest, f"torch's scalar kernel and its {capability} kernel disagree"


@pytest.mark.parametrize("name, portrait", [("astronaut", False), ("chelsea", True), ("rocket", False)])
@pytest.mark.parametrize("shortest_side", [600, 896, 1120, 1800])
def test_fast_path_stays_close_to_the_reference(name, portrait, shortest_side):
    """Shortest sides where the DCT reduction leaves the least for bicubic to do: the worst cases."""
    data = photo_jpeg(name, shortest_side, portrait)
    mad = np.abs(normalise(decode(data, fast=True)) - reference_tensor(data)).mean()
    assert mad < FAST_MAD_TARGET


@pytest.mark.parametrize("width, height, reduction", [
    (100, 100, 1), (2 * LEAST_SIDE - 1, 5000, 1), (2 * LEAST_SIDE, 5000, 2), (5000, 4 * LEAST_SIDE - 1, 2),
    (4 * LEAST_SIDE, 4 * LEAST_SIDE, 4), (8 * LEAST_SIDE, 9000, 8), (20_000, 20_000, 8),
])
def test_dct_reduction_is_a_power_of_two_that_keeps_the_margin(width, height, reduction):
    assert dct_reduction(width, height, SIZE) == reduction


@pytest.mark.parametrize("name, portrait", [("astronaut", False), ("chelsea", True), ("coffee", False)])
@pytest.mark.parametrize("shortest_side", [256, 512, 2 * LEAST_SIDE - 1])
def test_fast_path_equals_the_reference_below_the_first_dct_reduction(name, portrait, shortest_side):
    """img2dataset's 256 and 512 px shards: libjpeg-turbo + torch's resampling give the reference's pixels."""
    data = photo_jpeg(name, shortest_side, portrait)
    assert_matches_reference(decode(data, fast=True), reference_tensor(data), fast=True)


def test_fast_path_reduces_large_jpegs_in_the_dct_domain():
    data = photo_jpeg("chelsea", 2 * LEAST_SIDE + 8)
    pixels, reference = decode(data, fast=True), reference_tensor(data)
    assert np.abs(pixels.astype(int) - to_uint8(reference)).max() > 1  # not the reference's pixels...
    assert np.abs(normalise(pixels) - reference).mean() < FAST_MAD_TARGET  # ...but close to them


def test_fast_path_resamples_other_formats_as_the_reference():
    for fmt, options in (("PNG", {"compress_level": 0}), ("WEBP", {"lossless": True, "method": 0})):
        data = encode(photo(1200, 900), fmt, **options)
        assert_matches_reference(decode(data, fast=True), reference_tensor(data), fast=True)


def test_fast_path_leaves_panoramas_to_pillows_box_resize():
    """Past MAX_FAST_RESIZE_CROPS the whole-image resize would cost more than resampling only the crop."""
    width = SIZE * MAX_FAST_RESIZE_CROPS + 40
    data = encode(photo(width, SIZE), "PNG", compress_level=0)
    assert np.array_equal(decode(data, fast=True), decode(data))


def test_fast_path_gives_grey_jpegs_three_equal_channels():
    data = encode(Image.fromarray(photo(300, 260)).convert("L"), "JPEG", quality=95)
    pixels = decode(data, fast=True)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert_matches_reference(pixels, reference_tensor(data), fast=True)


def test_a_recoverable_jpeg_glitch_decodes_as_pillow_decodes_it():
    """simplejpeg refuses a file libjpeg warns about; Pillow then decides, as in the reference."""
    data = photo_jpeg("astronaut", 256)
    glitched = data[:5000] + bytes(100) + data[5100:]  # "Corrupt JPEG data: extraneous bytes before marker"
    with pytest.raises(ValueError, match="Corrupt JPEG data"):
        simplejpeg.decode_jpeg(glitched)
    assert np.array_equal(decode(glitched, fast=True), decode(glitched))  # Pillow's decode and resize


def test_a_large_jpeg_pillow_decodes_is_reduced_by_the_same_rule():
    """The Pillow fallback of the fast path asks libjpeg for the same DCT reduction as simplejpeg gets."""
    data = photo_jpeg("chelsea", 2 * LEAST_SIDE + 8)
    glitched = data[:20_000] + bytes(100) + data[20_100:]
    with pytest.raises(ValueError, match="Corrupt JPEG data"):
        simplejpeg.decode_jpeg(glitched)
    pixels, reference = decode(glitched, fast=True), reference_tensor(glitched)
    assert not np.array_equal(pixels, decode(glitched))  # reduced, unlike the Pillow path without fast
    assert np.abs(normalise(pixels) - reference).mean() < FAST_MAD_TARGET


@both_paths
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_other_output_sizes_and_interpolations(fast, interpolation):
    data = encode(photo(640, 480), "PNG")
    for size in (64, 336):
        reference = clip_transform(size, interpolation)(Image.open(io.BytesIO(data))).numpy()
        pixels = decode(data, fast=fast, size=size, resample=resample_filter(interpolation))
        assert_matches_reference(pixels, reference, fast=fast)


def test_filters_torch_lacks_take_the_pillow_path():
    data = encode(photo(640, 480), "PNG")
    for interpolation in ("lanczos", "box", "nearest"):
        resample = resample_filter(interpolation)
        assert np.array_equal(decode(data, fast=True, resample=resample), decode(data, resample=resample))


def test_unknown_interpolation_is_rejected():
    with pytest.raises(ValueError, match="interpolation"):
        resample_filter("cubic-ish")


# Deliberate differences -------------------------------------------------------------------------


@pytest.mark.parametrize("orientation, fast, size",
                         [(o, fast, (320, 200)) for o in range(1, 9) for fast in (False, True)]
                         + [(o, True, (1300, 700)) for o in (3, 6)])
def test_exif_orientation_is_applied(orientation, fast, size):
    data = exif_rotated_jpeg(orientation, size=size)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    pixels = decode(data, fast=fast)
    if fast and dct_reduction(*size, SIZE) > 1:  # compared with the reference like any DCT-reduced decode
        assert np.abs(normalise(pixels) - reference_tensor(upright)).mean() < FAST_MAD_TARGET
        assert np.abs(normalise(decode(data, fast=True, apply_exif_orientation=False))
                      - reference_tensor(data)).mean() < FAST_MAD_TARGET
    else:
        assert_matches_reference(pixels, reference_tensor(upright), fast=fast)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_fast_paths_array_transposes_are_pillows(orientation):
    pixels = photo(7, 5)
    transpose = _ORIENTATIONS[orientation][0]
    expected = pixels if transpose is None else np.asarray(Image.fromarray(pixels).transpose(transpose))
    assert np.array_equal(_UPRIGHT_ARRAY[orientation](pixels), expected)


def test_exif_orientation_reports_the_upright_size_and_can_be_turned_off():
    data = exif_rotated_jpeg(6, size=(320, 200))
    out = np.zeros((SIZE, SIZE, 3), np.uint8)
    assert decode_square(data, out, max_pixels=NO_LIMIT) == (200, 320)
    assert decode_square(data, out, max_pixels=NO_LIMIT, apply_exif_orientation=False) == (320, 200)
    assert_matches_reference(out, reference_tensor(data), fast=True)  # unrotated: the reference (fast path)


@both_paths
def test_transparency_is_matted_over_white(fast):
    data = rgba_png(size=(96, 80))  # bottom half fully transparent
    rgba = Image.open(io.BytesIO(data))
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    matted = Image.alpha_composite(white, rgba).convert("RGB")
    pixels = decode(data, fast=fast)
    assert_matches_reference(pixels, reference_tensor(matted), fast=fast)
    assert (pixels[-40:] == 255).all()  # transparent: white, where the reference gives black
    assert (to_uint8(reference_tensor(data))[-40:] == 0).all()


@both_paths
def test_palette_transparency_is_matted_over_white(fast):
    data = palette_png(transparent=True)
    matted = Image.alpha_composite(Image.new("RGBA", (120, 90), "white"), Image.open(io.BytesIO(data)).convert("RGBA"))
    assert_matches_reference(decode(data, fast=fast), reference_tensor(matted.convert("RGB")), fast=fast)


@both_paths
def test_palette_and_one_bit_images_are_resampled_in_colour(fast):
    palette = palette_png(transparent=False)
    in_colour = Image.open(io.BytesIO(palette)).convert("RGB")
    assert_matches_reference(decode(palette, fast=fast), reference_tensor(in_colour), fast=fast)
    one_bit = encode(Image.fromarray(photo(50, 40)).convert("1"), "PNG")
    pixels = decode(one_bit, fast=fast)
    assert_matches_reference(pixels, reference_tensor(Image.open(io.BytesIO(one_bit)).convert("L")), fast=fast)
    assert 0 < (pixels[..., 0] % 255).mean()  # greys, where nearest neighbour would leave only black and white


@both_paths
def test_sixteen_bit_grey_is_scaled_not_clipped(fast):
    data = grey16_png(size=(100, 70))
    values = np.asarray(Image.open(io.BytesIO(data))).astype(np.int64)
    scaled = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    pixels = decode(data, fast=fast)
    assert_matches_reference(pixels, reference_tensor(scaled), fast=fast)
    assert pixels.min() < 10 and pixels.max() > 245  # the full ramp survives
    assert to_uint8(reference_tensor(data)).mean() > 250  # the reference clips it to almost all white


@both_paths
def test_animated_images_give_their_first_frame(fast):
    corpus = hostile_corpus()
    for name in ("animated_gif", "animated_webp", "animated_png"):
        red = decode(corpus[name].data, fast=fast).reshape(-1, 3).mean(axis=0)
        assert red[0] > 180 and red[1] < 60 and red[2] < 60, (name, red)


def test_cmyk_matches_the_reference():
    data = hostile_corpus()["cmyk_jpeg"].data
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert_matches_reference(decode(data), reference_tensor(data))
    assert_matches_reference(decode(data, fast=True), reference_tensor(data), fast=True)


# Rejections ---------------------------------------------------------------------------------------


def test_sizes_are_checked_from_the_header_before_decoding():
    start = time.perf_counter()
    with pytest.raises(ImageRejected) as caught:
        decode(png_bomb(100_000, 100_000))
    assert caught.value.status is Status.IMAGE_TOO_LARGE
    assert time.perf_counter() - start < 0.5


def test_the_configured_pixel_limit_applies():
    data = encode(photo(100, 50), "PNG")
    assert open_image(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(ImageRejected, match="5000 pixels, over the limit of 4999") as caught:
        open_image(data, max_pixels=4999)
    assert caught.value.status is Status.IMAGE_TOO_LARGE


def test_pillows_bomb_warning_is_an_error():
    # 10^8 pixels: over Pillow's limit (89 478 485) but under twice it, where Pillow only warns.
    with pytest.raises(ImageRejected) as caught:
        open_image(png_bomb(10_000, 10_000), max_pixels=NO_LIMIT)
    assert caught.value.status is Status.IMAGE_TOO_LARGE


@pytest.mark.parametrize("name, case", [(n, c) for n, c in hostile_corpus().items()
                                        if c.data and c.status is not Status.OK])
@both_paths
def test_rejections_carry_a_status_and_a_short_message(name, case, fast):
    with pytest.raises(ImageRejected) as caught:
        decode(case.data, fast=fast)
    assert caught.value.status is case.status
    assert 0 < len(str(caught.value)) <= 200
