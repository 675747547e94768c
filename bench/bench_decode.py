"""Decode throughput per CPU core: open_clip's reference preprocessing vs the decode stage's two paths.

    .venv/bin/python -m bench.bench_decode

Inputs, all JPEG:

* img2dataset-made shards at 256 and 512 px (the decode target): the sample photos (skimage's, with their
  degraded variants; 105 images) served on 127.0.0.1 and fetched by img2dataset with ``image_size`` 256 or
  512, ``keep_ratio``, upscaling allowed so every shortest side is exactly that; quality 95. Built once
  under bench-output/decode/ (about 10 s each).
* skimage's photos at shortest sides 768 and 1024 (JPEG q95), where the DCT reduction starts to work.

Each path runs in this process with one thread; time is the process's CPU time, so images/s is per core
even on a busy machine (best of a few passes). Paths:

* reference: ``Image.open`` + open_clip's eval transform (Resize, CenterCrop, convert, ToTensor,
  Normalize), what a naive CPU pipeline does per image;
* pillow / fast: the decode stage (``pipeline.stages.decode.Decode``) on batches, uint8 out (normalising
  happens on the GPU later) with ``DecodeConfig(fast=False)`` and the default ``fast=True``;
* fast, margin 1.0: a DCT reduction allowed down to the crop size itself, to show why DRAFT_MARGIN is not 1;
* MAD: mean absolute difference from the reference tensor in normalised units ((x/255 - mean) / std),
  averaged over images (mean) and for the worst image (max). Target for the fast path: < 0.02.

Goal: the fast path at least 2x the reference's images/s per core on the 256 and 512 px shards.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path
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
SHARD_SIDES = (256, 512)  # img2dataset image_size
PHOTO_SIDES = (768, 1024)
OUT = Path(__file__).resolve().parents[1] / "bench-output" / "decode"
GOAL_SPEEDUP = 2.0
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
    for name, run in (("pillow", stage(False)), ("fast", stage(True)), ("fast, margin 1.0", fast_margin_one)):
        rate, pixels = _best_rate(run, count)
        per_image_mad = np.abs(_normalise(pixels) - reference_tensors).mean(axis=(1, 2, 3))
        results[name] = {
            "images_per_s": rate,
            "speedup": rate / reference_rate,
            "mad_mean": float(per_image_mad.mean()),
            "mad_max": float(per_image_mad.max()),
        }
    return results


def shard_jpegs(image_size: int) -> list[bytes]:
    """The JPEG bytes in img2dataset-made shards of the sample photos at ``image_size``, built once."""
    folder = OUT / f"shards-{image_size}px"
    marker = folder / "BUILT.json"
    if not marker.exists():
        from pipeline.sample_data import build_sample_dataset

        shutil.rmtree(folder, ignore_errors=True)
        print(f"building img2dataset shards at {image_size} px under {folder} ...", flush=True)
        build_sample_dataset(folder, images_per_shard=50, image_size=image_size, broken_urls=0, non_image=False,
                             resize_only_if_bigger=False)
        shutil.rmtree(folder / "photos", ignore_errors=True)
        marker.write_text(json.dumps({"image_size": image_size}))
    jpegs = []
    for tar in sorted((folder / "shards").glob("*.tar")):
        with tarfile.open(tar) as archive:
            jpegs += [archive.extractfile(m).read() for m in archive.getmembers() if m.name.endswith(".jpg")]
    return jpegs


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
    inputs = [(f"img2dataset {side} px", shard_jpegs(side)) for side in SHARD_SIDES]
    inputs += [(f"skimage {side} px", photo_jpegs(side)) for side in PHOTO_SIDES]
    print(f"decode per core (1 process, 1 thread), image_size 224, JPEG q95, load {os.getloadavg()[0]:.1f}")
    header = f"{'input':<20}{'images':>7}  {'path':<22}{'images/s':>10}{'speed-up':>10}{'MAD mean':>10}{'MAD max':>10}"
    print(header)
    print("-" * len(header))
    verdicts = []
    for name, jpegs in inputs:
        results = bench_decode(jpegs)
        for path, row in results.items():
            print(f"{name:<20}{len(jpegs):>7}  {path:<22}{row['images_per_s']:>10.0f}{row['speedup']:>9.2f}x"
                  f"{row['mad_mean']:>10.4f}{row['mad_max']:>10.4f}")
        if name.startswith("img2dataset"):
            fast = results["fast"]
            met = fast["speedup"] >= GOAL_SPEEDUP and fast["mad_mean"] < 0.02
            verdicts.append(f"{name}: fast path {fast['speedup']:.2f}x the reference, MAD {fast['mad_mean']:.4f} "
                            f"(goal >= {GOAL_SPEEDUP}x, < 0.02): {'met' if met else 'MISSED'}")
    print()
    print("\n".join(verdicts))
    print()
    print(hash_costs(inputs[0]))


def hash_costs(named_jpegs: tuple[str, list[bytes]]) -> str:
    """What the hash columns cost beside the fast decode: image_sha256 (read stage, always) and phash
    (decode stage, --phash), per image and as a share of the decode alone."""
    import hashlib

    name, jpegs = named_jpegs
    count = len(jpegs)

    def decode_with(phash: bool) -> Callable[[], None]:
        decode = Decode(DecodeConfig(phash=phash))

        def run() -> None:
            for start in range(0, count, BATCH_ROWS):
                rows = jpegs[start : start + BATCH_ROWS]
                decode({S.IMAGE: _object_array(rows), S.STATUS: _object_array([S.Status.OK.value] * len(rows)),
                        S.ERROR: _object_array([None] * len(rows))})
        return run

    def sha256_all() -> None:
        for data in jpegs:
            hashlib.sha256(data).hexdigest()

    plain, _ = _best_rate(decode_with(False), count)
    hashed, _ = _best_rate(decode_with(True), count)
    sha_rate, _ = _best_rate(sha256_all, count)
    decode_ms, phash_ms, sha_ms = 1e3 / plain, 1e3 / hashed - 1e3 / plain, 1e3 / sha_rate
    return (f"hash columns on {name} ({count} images), per image: decode {decode_ms:.3f} ms; phash +{phash_ms:.3f} ms "
            f"({phash_ms / decode_ms:.0%} of decode); image_sha256 {sha_ms:.4f} ms ({sha_ms / decode_ms:.1%} of decode)")


if __name__ == "__main__":
    main()
