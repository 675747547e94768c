"""`make bench` (part): what near-duplicate search costs, per 100,000 embeddings, on this machine.

    .venv/bin/python -m bench.bench_dedup [--rows 100000] [--dim 768] [--threshold 0.95]

The embeddings are fabricated: unit vectors around 1,000 random centres (a clustered set, as CLIP
embeddings are), 1% of them given a planted near duplicate (the same vector plus noise, cosine about 0.98
to it). It times pipeline.dedup's near search (faiss k-means on a sample, each row sent to its two nearest
clusters, Ray Data grouping the rows by cluster, every pair inside each cluster compared in one task) on a
local Ray over this machine's CPUs, and says how many of the
planted pairs it found and how many other pairs it joined. Brute force (every pair) is timed on a 20,000-row
sample beside it and scaled by the square of the rows.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def fabricate(rows: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows + planted, dim) float32 unit vectors, and the (planted, 2) row pairs that are near duplicates."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), rows)] + 0.9 * rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    originals = rng.choice(rows, rows // 100, replace=False)
    copies = vectors[originals] + 0.006 * rng.standard_normal((len(originals), dim)).astype(np.float32)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    planted = np.stack([originals, rows + np.arange(len(originals))], axis=1)
    return np.concatenate([vectors, copies]), planted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--threshold", type=float, default=0.95)
    args = parser.parse_args(argv)

    import pyarrow as pa
    import ray

    from pipeline import schema as S
    from pipeline.dedup import _close_pairs, near_pairs, train_cells
    from pipeline.ray_session import ensure_ray

    vectors, planted = fabricate(args.rows, args.dim)
    cosines = np.einsum("ij,ij->i", vectors[planted[:, 0]], vectors[planted[:, 1]])
    print(f"{len(vectors):,} unit vectors, {args.dim}-d; {len(planted):,} planted near-duplicate pairs "
          f"(cosine {cosines.min():.3f}-{cosines.max():.3f}); threshold {args.threshold}", flush=True)
    ensure_ray()
    n = len(vectors)
    rows = ray.data.from_arrow(pa.table({
        S.SHARD: pa.array(["s"] * n), S.KEY: pa.array([str(i) for i in range(n)]), S.UNIT: pa.array(["u"] * n),
        S.AESTHETIC_SCORE: pa.array(np.zeros(n, np.float32)),
        S.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), args.dim)})).repartition(16)
    clusters = max(1, round(np.sqrt(n)))
    start = time.perf_counter()
    centroids = train_cells(rows, n, clusters, seed=0)
    pairs = pa.concat_tables(list(near_pairs(rows, centroids, args.threshold).iter_batches(
        batch_format="pyarrow", batch_size=None)))
    seconds = time.perf_counter() - start
    found = {tuple(sorted(p)) for p in zip(map(int, pairs["a_key"].to_pylist()), map(int, pairs["b_key"].to_pylist()))}
    hits = sum(tuple(p) in found for p in planted.tolist())
    sample = min(20_000, len(vectors))
    start = time.perf_counter()
    _close_pairs(vectors, np.arange(sample), args.threshold)
    brute = (time.perf_counter() - start) * (len(vectors) / sample) ** 2
    per_100k = seconds * 100_000 / len(vectors)
    print(f"near search: {seconds:.1f} s for {len(vectors):,} rows ({per_100k:.1f} s per 100,000 embeddings; "
          f"{clusters} clusters, 2 per row); planted pairs found {hits}/{len(planted)} "
          f"(recall {hits / len(planted):.3f}); other pairs joined {len(found) - hits}")
    print(f"brute force, every pair: {brute:.0f} s for {len(vectors):,} rows (timed on {sample:,}, scaled by "
          f"rows squared); the clustered search is {brute / seconds:.0f}x faster here")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
