"""The decode stage on hand-built numpy batches (no Ray): statuses, pass-through, pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline import schema as S
from pipeline.config import DecodeConfig
from pipeline.images import (
    EXACT_MAX_LEVEL_DIFFERENCE,
    FAST_MAX_LEVEL_DIFFERENCE,
    FAST_MAX_OFF_BY_ONE,
    FAST_MAX_OFF_BY_TWO,
)
from pipeline.quality import QUALITY_COLUMNS
from pipeline.stages import decode as decode_module
from pipeline.stages.decode import Decode
from tests.hostile_images import encode, hostile_corpus, photo, reference_tensor, to_uint8

OK = S.Status.OK.value
CORPUS = hostile_corpus()


def objects(values) -> np.ndarray:
    """A 1-D object column, as Ray's numpy batches carry strings and bytes."""
    values = list(values)
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def make_batch(images, statuses=None, errors=None, **extra) -> dict[str, np.ndarray]:
    count = len(images)
    batch = {
        S.KEY: objects(f"{i:09d}" for i in range(count)),
        S.IMAGE: objects(images),
        S.IMAGE_FORMAT: objects(["jpg"] * count),
        S.STATUS: objects(statuses or [OK] * count),
        S.ERROR: objects(errors or [None] * count),
    }
    batch.update(extra)
    return batch


def corpus_batch() -> tuple[list[str], dict[str, np.ndarray]]:
    names = list(CORPUS)
    batch = make_batch([CORPUS[n].data for n in names])
    batch[S.IMAGE_FORMAT] = objects(CORPUS[n].ext for n in names)
    return names, batch


@pytest.mark.parametrize("fast", [False, True])
def test_every_hostile_image_gets_its_status(fast):
    names, batch = corpus_batch()
    out = Decode(DecodeConfig(fast=fast))(batch)
    for row, name in enumerate(names):
        case = CORPUS[name]
        assert out[S.STATUS][row] == case.status.value, (name, out[S.ERROR][row])
        if case.status is S.Status.OK:
            assert out[S.ERROR][row] is None, name
            assert (out[S.WIDTH][row], out[S.HEIGHT][row]) == case.size, name
            assert out[S.PIXELS][row].any(), name
        else:
            assert isinstance(out[S.ERROR][row], str) and 0 < len(out[S.ERROR][row]) <= 200, name
            assert out[S.WIDTH][row] == out[S.HEIGHT][row] == 0, name
            assert not out[S.PIXELS][row].any(), name


def test_error_messages_say_what_went_wrong():
    names, batch = corpus_batch()
    errors = dict(zip(names, Decode(DecodeConfig())(batch)[S.ERROR]))
    assert "no image" in errors["none"]
    assert "zero bytes" in errors["empty"]
    assert "not a recognised image" in errors["text"]
    assert "truncated" in errors["truncated_jpeg"]
    assert "TIFF" in errors["tiff"]
    assert "pixels" in errors["png_bomb"] and "pixels" in errors["jpeg_bomb"]


def test_output_columns_types_and_shapes():
    names, batch = corpus_batch()
    out = Decode(DecodeConfig(), image_size=64)(batch)
    assert S.IMAGE not in out
    assert out[S.PIXELS].dtype == np.uint8 and out[S.PIXELS].shape == (len(names), 64, 64, 3)
    assert out[S.WIDTH].dtype == np.int32 and out[S.HEIGHT].dtype == np.int32
    assert out[S.STATUS].dtype == object and all(isinstance(s, str) for s in out[S.STATUS])
    assert not any(name in out for name in QUALITY_COLUMNS)


def test_other_columns_pass_through_untouched():
    extra = {S.URL: objects(["http://a", "http://b"]), S.SHARD_ROWS: np.array([2, 2], dtype=np.int64)}
    batch = make_batch([CORPUS["webp"].data, b"junk"], **extra)
    out = Decode(DecodeConfig())(batch)
    for name in (S.KEY, S.IMAGE_FORMAT, S.URL, S.SHARD_ROWS):
        assert out[name] is batch[name]
    assert list(batch[S.STATUS]) == [OK, OK]  # the input batch is not modified


def test_one_bad_row_does_not_spoil_the_batch():
    good = [CORPUS["webp"].data, CORPUS["cmyk_jpeg"].data, CORPUS["rgba_png"].data]
    decode = Decode(DecodeConfig())
    alone = decode(make_batch(good))[S.PIXELS]
    mixed = decode(make_batch([good[0], CORPUS["truncated_jpeg"].data, good[1], None, good[2]]))
    assert list(mixed[S.STATUS]) == [OK, "decode_error", OK, "no_image", OK]
    assert np.array_equal(mixed[S.PIXELS][[0, 2, 4]], alone)


def test_rows_failed_upstream_pass_through_with_zero_pixels():
    image = CORPUS["webp"].data
    batch = make_batch([image, image, None], statuses=[OK, "download_failed", "shard_error"],
                       errors=[None, "HTTP Error 404", "tar unreadable"])
    out = Decode(DecodeConfig())(batch)
    assert list(out[S.STATUS]) == [OK, "download_failed", "shard_error"]
    assert list(out[S.ERROR]) == [None, "HTTP Error 404", "tar unreadable"]
    assert not out[S.PIXELS][1:].any() and list(out[S.WIDTH]) == [300, 0, 0]


def test_read_only_columns_from_ray_are_fine():
    batch = make_batch([CORPUS["webp"].data, b""])
    for column in batch.values():
        column.flags.writeable = False
    out = Decode(DecodeConfig())(batch)
    assert list(out[S.STATUS]) == [OK, "empty_image"]


def test_an_upstream_note_survives_success_and_joins_a_failure():
    batch = make_batch([CORPUS["webp"].data, b"junk"], errors=["json member is not valid JSON"] * 2)
    errors = Decode(DecodeConfig())(batch)[S.ERROR]
    assert errors[0] == "json member is not valid JSON"
    assert errors[1].startswith("not a recognised image") and errors[1].endswith("json member is not valid JSON")


def test_bytes_like_images_are_accepted():
    data = CORPUS["webp"].data
    out = Decode(DecodeConfig())(make_batch([bytearray(data), memoryview(data)]))
    assert list(out[S.STATUS]) == [OK, OK]


def test_an_empty_batch():
    out = Decode(DecodeConfig(quality_metrics=True))(make_batch([]))
    assert out[S.PIXELS].shape == (0, 224, 224, 3) and len(out[S.STATUS]) == 0
    assert all(len(out[name]) == 0 for name in QUALITY_COLUMNS)


def test_the_configured_pixel_limit():
    out = Decode(DecodeConfig(max_pixels=300 * 200 - 1))(make_batch([CORPUS["webp"].data, CORPUS["bmp"].data]))
    assert list(out[S.STATUS]) == ["image_too_large", OK]


def test_exif_orientation_can_be_turned_off():
    data = CORPUS["exif_rotated_jpeg"].data
    upright = Decode(DecodeConfig())(make_batch([data]))
    stored = Decode(DecodeConfig(apply_exif_orientation=False))(make_batch([data]))
    assert (upright[S.WIDTH][0], upright[S.HEIGHT][0]) == (200, 320)
    assert (stored[S.WIDTH][0], stored[S.HEIGHT][0]) == (320, 200)


def test_pixels_are_the_references():
    """Within pipeline.images' bounds (no DCT reduction under 560 px; 450 x 1400 is resampled vertically first)."""
    images = [encode(photo(640, 480, seed), "JPEG", quality=95) for seed in range(3)]
    images.append(encode(photo(450, 1400), "JPEG", quality=95))
    references = np.stack([to_uint8(reference_tensor(data)) for data in images]).astype(int)
    exact = Decode(DecodeConfig(fast=False))(make_batch(images))[S.PIXELS]
    assert np.abs(exact.astype(int) - references).max() <= EXACT_MAX_LEVEL_DIFFERENCE  # bit for bit
    fast = Decode(DecodeConfig(fast=True))(make_batch(images))[S.PIXELS]
    difference = np.abs(fast.astype(int) - references)
    assert difference.max() <= FAST_MAX_LEVEL_DIFFERENCE
    assert (difference >= 1).mean() <= FAST_MAX_OFF_BY_ONE
    assert all((image >= 2).mean() <= FAST_MAX_OFF_BY_TWO for image in difference)


def test_other_sizes_and_interpolations():
    data = encode(photo(500, 300), "PNG")
    out = Decode(DecodeConfig(), image_size=336, interpolation="bilinear")(make_batch([data]))
    assert out[S.PIXELS].shape == (1, 336, 336, 3) and out[S.STATUS][0] == OK
    with pytest.raises(ValueError, match="interpolation"):
        Decode(DecodeConfig(), interpolation="cubic-ish")


def test_quality_metrics_when_asked():
    batch = make_batch([CORPUS["webp"].data, b"junk", CORPUS["grey_png"].data])
    out = Decode(DecodeConfig(quality_metrics=True))(batch)
    for name in QUALITY_COLUMNS:
        assert out[name].dtype == np.float32 and out[name].shape == (3,)
        assert np.isfinite(out[name][[0, 2]]).all() and np.isnan(out[name][1]), name


def test_a_decoder_crash_costs_one_row(monkeypatch):
    real = decode_module.decode_square

    def flaky(data, out, **options):
        if bytes(data[:4]) == b"RIFF":  # the webp
            out[...] = 7  # half-written pixels must not survive
            raise RuntimeError("decoder bug")
        return real(data, out, **options)

    monkeypatch.setattr(decode_module, "decode_square", flaky)
    out = Decode(DecodeConfig())(make_batch([CORPUS["webp"].data, CORPUS["bmp"].data]))
    assert list(out[S.STATUS]) == ["decode_error", OK]
    assert out[S.ERROR][0] == "RuntimeError: decoder bug" and not out[S.PIXELS][0].any()


def _photograph(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()[..., :3]


def _hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def test_phash_is_imagehash_of_the_decoded_pixels_and_none_where_nothing_was_decoded():
    import imagehash

    batch = make_batch([encode(_photograph("astronaut"), "JPEG", quality=90), b"not an image"])
    out = Decode(DecodeConfig(phash=True))(batch)
    assert out[S.PHASH][0] == str(imagehash.phash(Image.fromarray(out[S.PIXELS][0])))
    assert out[S.STATUS][1] == S.Status.DECODE_ERROR.value and out[S.PHASH][1] is None
    assert S.PHASH not in Decode(DecodeConfig())(make_batch([encode(_photograph("astronaut"), "JPEG")]))


def test_phash_stays_close_for_a_recompressed_resized_or_cropped_copy_and_not_for_another_photo():
    original = _photograph("astronaut")
    height, width = original.shape[:2]
    cut_h, cut_w = height * 5 // 200, width * 5 // 200  # 5% in all: 2.5% off each side
    copies = [
        encode(original, "JPEG", quality=95),
        encode(original, "JPEG", quality=40),
        encode(Image.fromarray(original).resize((width // 2, height // 2), Image.BICUBIC), "JPEG", quality=90),
        encode(original[cut_h:height - cut_h, cut_w:width - cut_w], "JPEG", quality=90),
    ]
    others = [encode(_photograph(name), "JPEG", quality=95) for name in ("coffee", "chelsea", "rocket")]
    hashes = Decode(DecodeConfig(phash=True))(make_batch(copies + others))[S.PHASH]
    reference = hashes[0]
    near = [_hamming(reference, h) for h in hashes[1:len(copies)]]
    far = [_hamming(reference, h) for h in hashes[len(copies):]]
    print("phash distances: copies", near, "other photos", far)
    assert max(near) <= 10 < min(far), (near, far)
