"""Decode throughput per CPU core: open_clip's reference preprocessing vs our exact and fast paths.

    python bench/bench_decode.py

For each size, JPEGs are made from skimage's bundled photos (shortest side 256, 512, 768, 1024; quality 95 as
img2dataset writes) and decoded in one process with one thread; time is the process's CPU time, so images/s
is per core even on a busy machine (best of a few passes). Reported:

* reference: ``Image.open`` + the full open_clip eval transform (Resize, CenterCrop, convert, ToTensor,
  Normalize), what a naive CPU pipeline does per image;
* exact / fast: the decode stage (``pipeline.stages.decode.Decode``) on batches, uint8 out (normalising
  happens on the GPU later), exact and ``fast=True`` (JPEG DCT scaling);
* fast, margin 1.0: the DCT reduction allowed down to the crop size itself, to show why DRAFT_MARGIN is not 1;
* MAD: mean absolute difference from the reference tensor in normalised units ((x/255 - mean) / std),
  averaged over images (mean) and for the worst image (max). Target for the fast path: < 0.02.
"""

from __future__ import annotations

import io
import os
import sys
import time
from typing import Callable

import numpy as np
import open_clip
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from pipeline import schema as S  # noqa: E402
from pipeline.config import DecodeConfig  # noqa: E402
from pipeline.images import decode_square  # noqa: E402
from pipeline.stages.decode import Decode  # noqa: E402

CLIP_MEAN = np.array(open_clip.OPENAI_DATASET_MEAN, dtype=np.float32)
CLIP_STD = np.array(open_clip.OPENAI_DATASET_STD, dtype=np.float32)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
SHORTEST_SIDES = (256, 512, 768, 1024)
BATCH_ROWS = 64
MIN_SECONDS_PER_PATH = 0.5  # repeat the image list until a pass has run this long, for a stable timing


def _normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) to the normalised (N, 3, S, S) the GPU stage computes."""
    return np.moveaxis((pixels.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD, -1, -3)


def _object_array(values: list) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def _best_rate(run: Callable[[], object], count: int) -> tuple[float, object]:
    """Images per second of the fastest of a few passes, each long enough to time, and the last result."""
    result = run()  # warm-up, and the output to compare
    passes = max(1, int(MIN_SECONDS_PER_PATH / max(_time(run), 1e-3)))
    best = min(_time(run) for _ in range(min(passes, 3)))
    return count / best, result


def _time(run: Callable[[], object]) -> float:
    """CPU seconds of this process: per-core cost, steady even when other work shares the machine."""
    start = time.process_time()
    run()
    return time.process_time() - start


def bench_decode(image_bytes: list[bytes], image_size: int = 224) -> dict[str, dict[str, float]]:
    """Time each decode path over ``image_bytes``; per path: images_per_s, speedup, mad_mean, mad_max."""
    torch.set_num_threads(1)
    transform = open_clip.image_transform(
        image_size, is_train=False, mean=tuple(CLIP_MEAN), std=tuple(CLIP_STD), interpolation="bicubic",
        resize_mode="shortest",
    )
    count = len(image_bytes)

    def reference() -> np.ndarray:
        return np.stack([transform(Image.open(io.BytesIO(data))).numpy() for data in image_bytes])

    def stage(fast: bool) -> Callable[[], np.ndarray]:
        decode = Decode(DecodeConfig(fast=fast), image_size=image_size)

        def run() -> np.ndarray:
            parts = []
            for start in range(0, count, BATCH_ROWS):
                rows = image_bytes[start : start + BATCH_ROWS]
                batch = {
                    S.IMAGE: _object_array(rows),
                    S.STATUS: _object_array([S.Status.OK.value] * len(rows)),
                    S.ERROR: _object_array([None] * len(rows)),
                }
                out = decode(batch)
                assert (out[S.STATUS] == S.Status.OK.value).all(), out[S.ERROR]
                parts.append(out[S.PIXELS])
            return np.concatenate(parts)

        return run

    def fast_margin_one() -> np.ndarray:
        pixels = np.zeros((count, image_size, image_size, 3), dtype=np.uint8)
        for row, data in enumerate(image_bytes):
            decode_square(data, pixels[row], max_pixels=1 << 40, fast=True, draft_margin=1.0)
        return pixels

    reference_rate, reference_tensors = _best_rate(reference, count)
    results = {"reference (open_clip)": {"images_per_s": reference_rate, "speedup": 1.0, "mad_mean": 0.0,
                                         "mad_max": 0.0}}
    for name, run in (("exact", stage(False)), ("fast", stage(True)), ("fast, margin 1.0", fast_margin_one)):
        rate, pixels = _best_rate(run, count)
        per_image_mad = np.abs(_normalise(pixels) - reference_tensors).mean(axis=(1, 2, 3))
        results[name] = {
            "images_per_s": rate,
            "speedup": rate / reference_rate,
            "mad_mean": float(per_image_mad.mean()),
            "mad_max": float(per_image_mad.max()),
        }
    return results


def photo_jpegs(shortest_side: int, quality: int = 95) -> list[bytes]:
    """skimage's bundled photos, resized so the shortest side is ``shortest_side``, as JPEG bytes."""
    import skimage.data

    jpegs = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        scale = shortest_side / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        jpegs.append(buffer.getvalue())
    return jpegs


def main() -> None:
    print(f"decode per core (1 process, 1 thread), image_size 224, {len(PHOTOS)} skimage photos, JPEG q95")
    header = f"{'shortest':>8}  {'path':<22}{'images/s':>10}{'speed-up':>10}{'MAD mean':>10}{'MAD max':>10}"
    print(header)
    print("-" * len(header))
    for side in SHORTEST_SIDES:
        for name, row in bench_decode(photo_jpegs(side)).items():
            print(f"{side:>8}  {name:<22}{row['images_per_s']:>10.0f}{row['speedup']:>9.1f}x"
                  f"{row['mad_mean']:>10.4f}{row['mad_max']:>10.4f}")


if __name__ == "__main__":
    main()
