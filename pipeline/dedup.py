"""`aesthetics dedup OUTPUT`: exact and near duplicates among an output's committed ``ok`` rows.

Exact duplicates share ``image_sha256`` (the same bytes under two keys). Near duplicates are found the way
SemDeDup does (Abbas et al., 2023): the stored unit embeddings are clustered with k-means (faiss; the
cells of the output's ANN index when `aesthetics index` built one for the same model), each
row is placed in its two nearest clusters (so pairs straddling a boundary are still compared), and inside
each cluster every pair whose cosine reaches the threshold is joined; the clusters are compared in parallel
Ray tasks, so the quadratic part never spans the whole set. Rows joined directly or through others
form a group (connected components); its keeper is the row with the highest aesthetic score.

The result is a Delta table at ``<output>/_dedup``, one row per member of a group of two or more (a row
absent from it has no duplicate), replaced as a whole by each run and stamped with the data-table version
it covers. Readers join it on (shard, key); ``cutoffs --dedup`` and ``select --dedup`` count and pick
keepers only. Without stored embeddings (``--write-embeddings``) only exact duplicates are found, and the
result says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema as S
from pipeline.errors import InputError
from pipeline.io.delta import embeddings_of, open_table, storage_options_for, table_uri
from pipeline.io.units import refuse_earlier_layout

DEDUP_DIR = "_dedup"
DEFAULT_THRESHOLD = 0.95  # cosine; SemDeDup's eps of 0.05
PROBES = 2  # clusters each row is compared in
PAIRS_PER_TASK = 4_000_000  # cosine entries one comparison task holds at most (16 MB of float32)

SCHEMA = pa.schema([
    pa.field(S.SHARD, pa.string(), nullable=False),
    pa.field(S.KEY, pa.string(), nullable=False),
    pa.field(S.UNIT, pa.string(), nullable=False),
    pa.field("group_id", pa.int64(), nullable=False),
    pa.field("keeper", pa.bool_(), nullable=False),  # the group's row with the highest aesthetic score
    pa.field("keeper_shard", pa.string(), nullable=False),
    pa.field("keeper_key", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),  # exact (same bytes as the keeper) or near
    pa.field(S.AESTHETIC_SCORE, pa.float32()),
])


@dataclass(frozen=True)
class DedupResult:
    rows: int  # ok rows considered
    groups: int
    duplicates: int  # rows that are not their group's keeper
    exact: int  # of them, same bytes as the keeper
    near: int
    near_searched: bool  # False: no embeddings stored, exact duplicates only
    clusters: int
    threshold: float
    data_version: int
    clusters_from_index: bool = False  # the ANN index's cells served as the clusters


def dedup_uri(output: str) -> str:
    return output.rstrip("/") + "/" + DEDUP_DIR


def _ok_rows(output: str, storage_options: Mapping[str, Any] | None) -> tuple[pa.Table, int]:
    refuse_earlier_layout(output, storage_options)
    table = open_table(output, storage_options)
    if table is None:
        raise InputError(f"no Delta table under {output}: nothing to deduplicate")
    names = {f.name for f in table.schema().fields}
    if S.IMAGE_SHA256 not in names:
        raise InputError(f"{output} has no {S.IMAGE_SHA256} column (scored before it existed): score it again "
                         f"with --rescore to deduplicate")
    wanted = [S.SHARD, S.KEY, S.UNIT, S.AESTHETIC_SCORE, S.IMAGE_SHA256, S.MODEL]
    if S.EMBEDDING in names:
        wanted.append(S.EMBEDDING)
    dataset = table.to_pyarrow_dataset()
    rows = dataset.to_table(columns=wanted, filter=pc.field(S.STATUS) == S.Status.OK.value)
    return rows, table.version()


def _exact_edges(hashes: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Each row with a hash seen before, joined to the first row with that hash."""
    first: dict[str, int] = {}
    left, right = [], []
    for i, digest in enumerate(hashes):
        if digest is None:
            continue
        j = first.setdefault(digest, i)
        if j != i:
            left.append(j)
            right.append(i)
    return np.asarray(left, dtype=np.int64), np.asarray(right, dtype=np.int64)


def _close_pairs(vectors: np.ndarray, members: np.ndarray, threshold: float) -> np.ndarray:
    """(k, 2) row indices of the pairs of ``members`` whose cosine (unit vectors: dot product) >= threshold."""
    block = vectors[members]
    found = []
    step = max(1, PAIRS_PER_TASK // max(1, len(members)))
    for start in range(0, len(members), step):
        sims = block[start:start + step] @ block.T
        i, j = np.nonzero(sims >= threshold)
        i = i + start
        keep = i < j
        found.append(np.stack([members[i[keep]], members[j[keep]]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def _near_edges(vectors: np.ndarray, threshold: float, clusters: int, seed: int,
                centroids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pairs at cosine >= threshold inside each k-means cluster (``centroids`` when given, e.g. the ANN
    index's cells, else ``clusters`` trained here), compared in Ray tasks."""
    import faiss
    import ray

    from pipeline.ray_session import ensure_ray

    if centroids is None:
        # faiss trains on at most 256 points a centroid (a sample of a large set) and takes any number fewer.
        kmeans = faiss.Kmeans(vectors.shape[1], clusters, niter=20, seed=seed, spherical=True, verbose=False,
                              min_points_per_centroid=1)
        kmeans.train(vectors)
        centroids = kmeans.centroids
    assigner = faiss.IndexFlatIP(vectors.shape[1])
    assigner.add(np.ascontiguousarray(centroids, dtype=np.float32))
    # Each row joins its PROBES nearest clusters, not only its own: two near duplicates on either side of a
    # cluster boundary would otherwise never be compared (plain SemDeDup misses them).
    probes = min(PROBES, len(centroids))
    _, assignment = assigner.search(vectors, probes)
    cluster_of = assignment.ravel()
    row_of = np.repeat(np.arange(len(vectors)), probes)
    order = np.argsort(cluster_of, kind="stable")
    bounds = np.flatnonzero(np.diff(cluster_of[order])) + 1
    groups = [g for g in np.split(row_of[order], bounds) if len(g) > 1]
    if not groups:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)

    ensure_ray()
    compare = ray.remote(num_cpus=1)(_close_pairs_of_clusters)
    shared = ray.put(vectors)
    batches, batch, cost = [], [], 0
    for members in sorted(groups, key=len, reverse=True):  # big clusters first: they set the run's length
        batch.append(members)
        cost += len(members) ** 2
        if cost >= PAIRS_PER_TASK:
            batches.append(batch)
            batch, cost = [], 0
    if batch:
        batches.append(batch)
    pairs = ray.get([compare.remote(shared, b, threshold) for b in batches])
    pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
    return pairs[:, 0], pairs[:, 1]


def _close_pairs_of_clusters(vectors: np.ndarray, clusters: list[np.ndarray], threshold: float) -> np.ndarray:
    found = [_close_pairs(vectors, members, threshold) for members in clusters]
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def _index_cells(output: str, rows: pa.Table, storage_options: Mapping[str, Any] | None) -> np.ndarray | None:
    """The ANN index's coarse centroids when it indexes these rows' model: k-means already trained on them."""
    from pipeline.index import open_index

    index = open_index(output, storage_options)
    if index is None or index.manifest.dim != len(rows[S.EMBEDDING][0]) or \
            set(pc.unique(rows[S.MODEL]).to_pylist()) != {index.model}:
        return None
    quantizer = index.index.quantizer
    return quantizer.reconstruct_n(0, quantizer.ntotal)


def dedup(output: str, threshold: float = DEFAULT_THRESHOLD, clusters: int | None = None, seed: int = 0,
          storage_options: Mapping[str, Any] | None = None) -> DedupResult:
    """Find the duplicate groups of ``output``'s committed ok rows and write them to ``<output>/_dedup``."""
    from deltalake import CommitProperties, write_deltalake
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not -1.0 <= threshold <= 1.0:
        raise InputError(f"--threshold is a cosine, between -1 and 1; got {threshold}")
    rows, data_version = _ok_rows(output, storage_options)
    n = rows.num_rows
    left, right = _exact_edges(rows[S.IMAGE_SHA256].to_pylist())
    near_searched = S.EMBEDDING in rows.column_names and n > 1
    used_clusters, centroids = 0, None
    if near_searched:
        vectors = embeddings_of(rows[S.EMBEDDING])
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # stored as fp16
        centroids = None if clusters else _index_cells(output, rows, storage_options)
        used_clusters = len(centroids) if centroids is not None else clusters or max(1, min(n // 2, round(math.sqrt(n))))
        near_left, near_right = _near_edges(np.ascontiguousarray(vectors, dtype=np.float32), threshold,
                                            used_clusters, seed, centroids)
        left, right = np.concatenate([left, near_left]), np.concatenate([right, near_right])

    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component, minlength=n)
    members = np.flatnonzero(sizes[component] > 1)

    scores = rows[S.AESTHETIC_SCORE].to_numpy(zero_copy_only=False).astype(np.float64)
    shards, keys = rows[S.SHARD].to_pylist(), rows[S.KEY].to_pylist()
    hashes = rows[S.IMAGE_SHA256].to_pylist()
    # Keeper: highest score, then the smallest (shard, key), so that reruns pick the same row.
    ranked = sorted(members, key=lambda i: (component[i], -np.nan_to_num(scores[i], nan=-np.inf), shards[i], keys[i]))
    keeper_of: dict[int, int] = {}
    for i in ranked:
        keeper_of.setdefault(int(component[i]), int(i))
    units = rows[S.UNIT].to_pylist()
    out = {name: [] for name in SCHEMA.names}
    for i in ranked:
        keeper = keeper_of[int(component[i])]
        out[S.SHARD].append(shards[i])
        out[S.KEY].append(keys[i])
        out[S.UNIT].append(units[i])
        out["group_id"].append(int(component[i]))
        out["keeper"].append(i == keeper)
        out["keeper_shard"].append(shards[keeper])
        out["keeper_key"].append(keys[keeper])
        out["reason"].append("exact" if hashes[i] is not None and hashes[i] == hashes[keeper] else "near")
        out[S.AESTHETIC_SCORE].append(None if math.isnan(scores[i]) else scores[i])
    table = pa.table(out, schema=SCHEMA)
    duplicates = [r for r, k in zip(out["reason"], out["keeper"]) if not k]
    result = DedupResult(rows=n, groups=len(keeper_of), duplicates=len(duplicates),
                         exact=duplicates.count("exact"), near=duplicates.count("near"), near_searched=near_searched,
                         clusters=used_clusters, threshold=threshold, data_version=data_version,
                         clusters_from_index=near_searched and centroids is not None)
    uri = dedup_uri(output)
    write_deltalake(table_uri(uri), table, mode="overwrite", schema_mode="overwrite",
                    storage_options=storage_options_for(uri, storage_options),
                    commit_properties=CommitProperties(custom_metadata={
                        "aesthetics.dedup": json.dumps(result.__dict__)}))
    return result


def read_dedup(output: str, storage_options: Mapping[str, Any] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """The output's duplicate groups and what the run that found them recorded; InputError without any."""
    table = open_table(dedup_uri(output), storage_options)
    if table is None:
        raise InputError(f"{output} has no duplicate table yet: run `aesthetics dedup {output}` first")
    info = json.loads(table.history(1)[0].get("aesthetics.dedup", "{}"))
    return table.to_pyarrow_table(), info


def duplicate_rows(output: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """The rows that are not their group's keeper: what ``--dedup`` leaves out."""
    table, _ = read_dedup(output, storage_options)
    return table.filter(pc.invert(table["keeper"]))
