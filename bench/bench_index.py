"""`make bench-index`: what the ANN index buys and costs, beside brute force, on this machine.

    .venv/bin/python -m bench.bench_index [--rows 1000000] [--dim 768] [--queries 200] [--k 100]

The vectors are fabricated as bench_dedup's are: unit vectors around 1,000 random centres (clustered, as
CLIP embeddings are). The index is built by pipeline.index's own train and fill (the parameters it chooses
for this many rows, trained on its default sample), loaded as a search loads it, and queried one query at a
time through ``AnnIndex.search`` (IVF-PQ candidates, then exact re-ranking on the float16 vectors, then the
row map), as ``select`` and ``serve`` query it. The queries are held-out vectors from the same centres.

Recall@k is against the exact top k of the same float16 vectors. Brute force beside it is one float32
matrix product with every vector held in memory (the best case: the product's brute-force path also reads
every stored embedding from its files first).
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import pyarrow as pa


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=None, help="default: 10 x k, as select asks")
    parser.add_argument("--nprobe", type=int, default=None)
    args = parser.parse_args(argv)

    import faiss

    from bench.bench_dedup import fabricate
    from pipeline import schema as S
    from pipeline.index import AnnIndex, IndexOptions, Manifest, choose_parameters, fill, train

    faiss.omp_set_num_threads(faiss.omp_get_max_threads())
    started = time.perf_counter()
    drawn, _ = fabricate(args.rows + args.queries, args.dim, seed=0)  # planted copies come last: not used
    vectors, queries = drawn[: args.rows], drawn[args.rows: args.rows + args.queries]
    print(f"{len(vectors):,} clustered unit vectors, {args.dim}-d, fabricated in {time.perf_counter() - started:.0f} s; "
          f"{len(queries)} held-out queries, k = {args.k}", flush=True)

    options = IndexOptions(nprobe=args.nprobe)
    sample_rows = min(options.train_rows, len(vectors))
    nlist, pq_m, pq_bits, nprobe = choose_parameters(len(vectors), args.dim, options, sample_rows)
    rng = np.random.default_rng(0)
    sample = vectors[np.sort(rng.choice(len(vectors), sample_rows, replace=False))]
    start = time.perf_counter()
    trained = train(sample, nlist, pq_m, pq_bits)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    filled = fill(trained, vectors)
    fill_s = time.perf_counter() - start
    index = faiss.deserialize_index(np.frombuffer(filled, dtype=np.uint8))
    half = vectors.astype(np.float16)
    n = len(vectors)
    rows = pa.table({S.KEY: pa.array([f"{i:09d}" for i in range(n)]), S.SHARD: pa.array(["s"] * n),
                     S.UNIT: pa.array(["u"] * n), S.AESTHETIC_SCORE: pa.array(np.zeros(n, np.float32))})
    sink = io.BytesIO()
    np.save(sink, half)
    manifest = Manifest(model="bench", dim=args.dim, nlist=nlist, pq_m=pq_m, pq_bits=pq_bits, nprobe=nprobe,
                        trained="", trained_rows=sample_rows, data_version=0,
                        parts=[{"name": "p", "rows": n, "units": {"u": 0}}])
    ann = AnnIndex(manifest, index, [half], rows)
    print(f"IVF{nlist},PQ{pq_m}x{pq_bits}, nprobe {nprobe}: trained on {sample_rows:,} rows in {train_s:.1f} s, "
          f"filled in {fill_s:.1f} s ({(train_s + fill_s) * 1e6 / n:.0f} s per million rows, one process)", flush=True)
    print(f"bytes per row: {len(filled) / n:.1f} in the IVF-PQ part (codes, ids, lists), {half.nbytes / n:.0f} "
          f"in the float16 re-ranking copy", flush=True)

    exact_matrix = half.astype(np.float32)
    ann_ms, brute_ms, recalls, recalls_pq = [], [], [], []
    for query in queries:
        start = time.perf_counter()
        sims = exact_matrix @ query
        exact = np.argpartition(-sims, args.k)[: args.k]
        brute_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        found, _ = ann.search(query, args.k, candidates=args.candidates)
        ann_ms.append((time.perf_counter() - start) * 1000)
        got = {int(k) for k in found[S.KEY].to_pylist()}
        recalls.append(len(got & set(exact.tolist())) / args.k)
        raw = ann.candidates(query, args.k)[0]
        recalls_pq.append(len(set(raw.tolist()) & set(exact.tolist())) / args.k)

    def p(values: list[float], q: float) -> float:
        return float(np.percentile(values, q))

    print(f"recall@{args.k}: {np.mean(recalls):.3f} with {args.candidates or 10 * args.k} candidates re-ranked "
          f"(min {min(recalls):.2f}); {np.mean(recalls_pq):.3f} from the PQ codes alone", flush=True)
    print(f"query latency, index + re-rank + row map: p50 {p(ann_ms, 50):.1f} ms, p99 {p(ann_ms, 99):.1f} ms")
    print(f"query latency, brute force in memory:      p50 {p(brute_ms, 50):.1f} ms, p99 {p(brute_ms, 99):.1f} ms "
          f"({exact_matrix.nbytes / 2**30:.1f} GiB of float32 held)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
