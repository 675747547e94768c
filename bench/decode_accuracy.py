"""How far each decode path is from open_clip's own preprocessing, in 0..255 levels, over many image sizes.

    .venv/bin/python -m bench.decode_accuracy            # about a minute on one core

No Ray. Inputs, all built here from the real photographs the demo uses (scikit-image's bundled photos and the
demo's degraded variants of them, ``pipeline.sample_data``; colour and greyscale):

* a size grid: shortest side 16 to 2048 px (upscaled below 224, downscaled above; odd sides such as 223, 225,
  294 and 559 included), aspect ratios 1, 1.15 (294 x 256), 4:3, 3:2, 16:9, 2:1 and 3:1, each landscape and
  portrait; JPEG at qualities 50, 75, 90 and 95 (4:2:0 and 4:4:4 chroma) and PNG, in turn;
* panoramas, 5.3:1 to 41.9:1 (shortest side 64 to 401), where the fast path hands over to Pillow and, past
  ``MAX_EXACT_RESIZE_CROPS``, the Pillow path resamples only the crop's box;
* the demo's own shard images: the demo's photos (``make_photos``) through img2dataset's Resizer as the demo
  runs it (shortest side to 256 px, never upscaled, JPEG q95), without the HTTP server and the tar writer.

The reference is open_clip's eval transform (``image_transform(224, is_train=False, resize_mode="shortest")``)
up to its ``ToTensor``: the uint8 pixels it normalises. For each path (``fast=False``: Pillow; ``fast=True``,
the default: simplejpeg + torch + DCT reduction) and each class of input, the table gives the fraction of
values (pixels x 3 channels) that differ from the reference by 1 level or more and by 2 or more, the largest
difference, the largest fraction off by 1+ on any one image, and the mean absolute difference in normalised
units (CLIP mean/std, what bench.bench_decode calls MAD).

torch's uint8 resampling gives the same bytes with every CPU kernel it has on x86-64 (scalar, AVX2, AVX-512:
``ATEN_CPU_CAPABILITY=default|avx2|avx512`` before starting Python picks one; checked), and Pillow's is plain
C, so these figures do not depend on the CPU.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from bench.table import text_table  # noqa: E402
from pipeline.images import (  # noqa: E402
    DRAFT_MARGIN,
    EXACT_MAX_LEVEL_DIFFERENCE,
    FAST_MAX_LEVEL_DIFFERENCE,
    FAST_MAX_OFF_BY_ONE,
    FAST_MAX_OFF_BY_ONE_PER_IMAGE,
    FAST_MAX_OFF_BY_TWO,
    MAX_EXACT_RESIZE_CROPS,
    MAX_FAST_RESIZE_CROPS,
    decode_square,
    resized_size,
)

SIZE = 224
SHORT_SIDES = (16, 32, 64, 100, 150, 200, 223, 224, 225, 256, 294, 300, 384, 448, 512, 559,
               560, 600, 768, 1000, 1024, 1120, 1500, 2048)
ASPECTS = (1.0, 294 / 256, 4 / 3, 3 / 2, 16 / 9, 2.0, 3.0)
PANORAMA_ASPECTS = (5.3, 11.7, 21.3, 41.9)  # not round: a round one puts the crop's box on whole pixels
PANORAMA_SHORT_SIDES = (64, 255, 401)  # under 560: no DCT reduction
# (format, save options) in turn; PNG every fifth image.
ENCODINGS = (
    ("JPEG", {"quality": 95}), ("JPEG", {"quality": 75, "subsampling": "4:4:4"}), ("JPEG", {"quality": 90}),
    ("JPEG", {"quality": 50}), ("PNG", {"compress_level": 1}),
)
LEAST_DCT_SIDE = 2 * math.ceil(SIZE * DRAFT_MARGIN)  # 560: the first shortest side the fast path DCT-reduces

CLASSES = (
    "upscaled (shortest < 224)",
    "downscaled, shortest 224-559",
    "PNG, shortest >= 560",
    "JPEG, shortest >= 560 (DCT)",
    f"{MAX_FAST_RESIZE_CROPS}:1 < aspect <= {MAX_EXACT_RESIZE_CROPS}:1",
    f"aspect > {MAX_EXACT_RESIZE_CROPS}:1",
    "demo shards (img2dataset 256)",
)
DCT_CLASS = CLASSES[3]
BOX_CLASS = CLASSES[5]


@dataclass
class Tally:
    """Counts of values off by 1+ and 2+ for one path on one class of inputs."""

    images: int = 0
    values: int = 0
    off_by_one: int = 0
    off_by_two: int = 0
    max_difference: int = 0
    worst_image_fraction: float = 0.0
    worst_image_two: float = 0.0
    mad: list[float] = field(default_factory=list)

    def add(self, pixels: np.ndarray, reference: np.ndarray) -> None:
        difference = np.abs(pixels.astype(np.int16) - reference.astype(np.int16))
        self.images += 1
        self.values += difference.size
        self.off_by_one += int((difference >= 1).sum())
        self.off_by_two += int((difference >= 2).sum())
        self.max_difference = max(self.max_difference, int(difference.max()))
        self.worst_image_fraction = max(self.worst_image_fraction, float((difference >= 1).mean()))
        self.worst_image_two = max(self.worst_image_two, float((difference >= 2).mean()))
        self.mad.append(float(np.abs(_normalise(pixels) - _normalise(reference)).mean()))

    def merge(self, other: Tally) -> None:
        self.images += other.images
        self.values += other.values
        self.off_by_one += other.off_by_one
        self.off_by_two += other.off_by_two
        self.max_difference = max(self.max_difference, other.max_difference)
        self.worst_image_fraction = max(self.worst_image_fraction, other.worst_image_fraction)
        self.worst_image_two = max(self.worst_image_two, other.worst_image_two)
        self.mad += other.mad


_CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)  # open_clip.OPENAI_DATASET_MEAN
_CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)


def _normalise(pixels: np.ndarray) -> np.ndarray:
    return (pixels.astype(np.float32) / 255.0 - _CLIP_MEAN) / _CLIP_STD


def reference_pixels(data: bytes, size: int = SIZE) -> np.ndarray:
    """open_clip's eval transform on ``data`` up to ToTensor: the (S, S, 3) uint8 pixels it would normalise."""
    import open_clip

    transform = open_clip.image_transform(size, is_train=False, interpolation="bicubic", resize_mode="shortest")
    *geometry, to_tensor, normalize = transform.transforms
    assert "ToTensor" in type(to_tensor).__name__ and "Normalize" in type(normalize).__name__, transform
    image = Image.open(io.BytesIO(data))
    for step in geometry:
        image = step(image)
    return np.asarray(image.convert("RGB"))


def decoded(data: bytes, fast: bool, size: int = SIZE) -> np.ndarray:
    out = np.zeros((size, size, 3), np.uint8)
    decode_square(data, out, max_pixels=1 << 40, fast=fast)
    return out


def _sources() -> list[Image.Image]:
    """The demo's photographs and its degraded variants of them (one variant per subject, in turn)."""
    from pipeline.sample_data import SUBJECTS, VARIANTS, _as_rgb_or_gray

    rng = np.random.default_rng(0)
    variants = list(VARIANTS.values())
    sources = []
    for index, (_name, load, _description) in enumerate(SUBJECTS):
        image = _as_rgb_or_gray(load())
        _suffix, transform = variants[index % len(variants)]
        if transform is not None and _suffix != ", tiny thumbnail":  # the grid makes its own small sizes
            image = transform(image, rng)
        sources.append(image)
    return sources


def _encode(image: Image.Image, fmt: str, options: dict) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def grid_inputs() -> list[tuple[str, str, bytes]]:
    """(class, label, bytes) for the size grid and the panoramas."""
    sources = _sources()
    inputs = []
    shapes = [(short, aspect, portrait) for short in SHORT_SIDES for aspect in ASPECTS
              for portrait in ((False,) if aspect == 1.0 else (False, True))]
    shapes += [(short, aspect, portrait) for short in PANORAMA_SHORT_SIDES for aspect in PANORAMA_ASPECTS
               for portrait in (False, True)]
    for index, (short, aspect, portrait) in enumerate(shapes):
        long = round(short * aspect)
        width, height = (short, long) if portrait else (long, short)
        source = sources[index % len(sources)]
        image = ImageOps.fit(source, (width, height), Image.Resampling.LANCZOS)
        fmt, options = ENCODINGS[index % len(ENCODINGS)]
        if fmt == "JPEG" and image.mode == "L":
            options = {k: v for k, v in options.items() if k != "subsampling"}
        data = _encode(image, fmt, options)
        inputs.append((classify(width, height, fmt), f"{width}x{height} {image.mode} {fmt} {options}", data))
    return inputs


def classify(width: int, height: int, fmt: str) -> str:
    long_side = max(resized_size(width, height, SIZE))
    if long_side > MAX_EXACT_RESIZE_CROPS * SIZE:
        return CLASSES[5]
    if long_side > MAX_FAST_RESIZE_CROPS * SIZE:
        return CLASSES[4]
    shortest = min(width, height)
    if shortest < SIZE:
        return CLASSES[0]
    if shortest < LEAST_DCT_SIDE:
        return CLASSES[1]
    return CLASSES[3] if fmt == "JPEG" else CLASSES[2]


def demo_shard_inputs() -> list[tuple[str, str, bytes]]:
    """The demo's photos as img2dataset writes them into its shards (``build_sample_dataset``'s defaults)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.resizer import Resizer

    from pipeline.sample_data import make_photos

    resizer = Resizer(image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_format="jpg")
    inputs = []
    with tempfile.TemporaryDirectory(prefix="decode-accuracy-") as folder:
        for photo in make_photos(folder):
            with open(photo.path, "rb") as stream:
                data, width, height, _, _, error = resizer(stream)
            if error is None:
                inputs.append((CLASSES[6], f"{photo.path.name} {width}x{height}", data))
    return inputs


def measure(inputs: list[tuple[str, str, bytes]], verbose: bool = False) -> dict[tuple[str, bool], Tally]:
    tallies: dict[tuple[str, bool], Tally] = {}
    for kind, label, data in inputs:
        reference = reference_pixels(data)
        for fast in (False, True):
            tally = Tally()
            tally.add(decoded(data, fast), reference)
            tallies.setdefault((kind, fast), Tally()).merge(tally)
            if verbose and tally.max_difference > 1 and kind != DCT_CLASS:
                print(f"  {'fast' if fast else 'exact'}: {label}: {tally.off_by_one} values off, "
                      f"{tally.off_by_two} by 2+, max {tally.max_difference}")
    return tallies


def _percent(count: int, total: int) -> str:
    return f"{100 * count / total:.4f}%" if total else "-"


def table(tallies: dict[tuple[str, bool], Tally]) -> str:
    rows = []
    for fast in (False, True):
        for kind in CLASSES:
            tally = tallies.get((kind, fast))
            if tally is None:
                continue
            rows.append([
                "fast" if fast else "exact", kind, str(tally.images), str(tally.values),
                _percent(tally.off_by_one, tally.values), _percent(tally.off_by_two, tally.values),
                str(tally.max_difference), f"{100 * tally.worst_image_fraction:.3f}%",
                f"{np.mean(tally.mad):.4f}", f"{np.max(tally.mad):.4f}",
            ])
    header = ["path", "inputs", "images", "values", "off by 1+", "off by 2+", "max", "worst image 1+",
              "MAD mean", "MAD max"]
    return text_table(header, rows)


def summary(tallies: dict[tuple[str, bool], Tally]) -> str:
    """Each path over what its bounds cover, against the bounds pipeline.images states (and tests assert)."""
    lines = []
    exact = Tally()
    for kind in CLASSES:
        if kind != BOX_CLASS and (kind, False) in tallies:
            exact.merge(tallies[kind, False])
    lines.append(f"exact, every input up to {MAX_EXACT_RESIZE_CROPS}:1 ({exact.images} images, {exact.values} values): "
                 f"{exact.off_by_one} values off, max {exact.max_difference} (bound {EXACT_MAX_LEVEL_DIFFERENCE})")
    fast = Tally()
    for kind in CLASSES:
        if kind != DCT_CLASS and (kind, True) in tallies:
            fast.merge(tallies[kind, True])
    lines.append(
        f"fast, every input without a DCT reduction ({fast.images} images, {fast.values} values): "
        f"{_percent(fast.off_by_one, fast.values)} off by 1+ (bound {FAST_MAX_OFF_BY_ONE:.1%}), "
        f"{_percent(fast.off_by_two, fast.values)} ({fast.off_by_two} values) off by 2+ "
        f"(bound {FAST_MAX_OFF_BY_TWO:.2%} of any image's), "
        f"max {fast.max_difference} (bound {FAST_MAX_LEVEL_DIFFERENCE}), "
        f"worst image {100 * fast.worst_image_fraction:.3f}% off by 1+ (bound {FAST_MAX_OFF_BY_ONE_PER_IMAGE:.0%}), "
        f"{100 * fast.worst_image_two:.4f}% by 2+")
    if (DCT_CLASS, True) in tallies:
        dct = tallies[DCT_CLASS, True]
        lines.append(f"fast, DCT-reduced JPEGs ({dct.images} images): MAD mean {np.mean(dct.mad):.4f}, "
                     f"max {np.max(dct.mad):.4f} (normalised units; the fast path's target is < 0.02)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--no-demo", action="store_true", help="skip the demo's shard images (img2dataset)")
    parser.add_argument("--verbose", action="store_true", help="name every image with a 2-level difference")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    inputs = grid_inputs()
    if not args.no_demo:
        inputs += demo_shard_inputs()
    tallies = measure(inputs, verbose=args.verbose)
    print(f"decode vs open_clip's preprocessing, image_size {SIZE}, {len(inputs)} images "
          f"({time.perf_counter() - start:.0f} s)")
    print(table(tallies))
    print()
    print(summary(tallies))


if __name__ == "__main__":
    main()
