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
from pipeline.io.storage import filesystem, pyarrow_filesystem
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


MEMBER_COLUMNS = [S.SHARD, S.KEY, S.UNIT, S.AESTHETIC_SCORE]  # what a pair carries of each of its rows
PAIR_SCHEMA = pa.schema([pa.field(f"{side}_{name}", pa.float32() if name == S.AESTHETIC_SCORE else pa.string())
                         for side in ("a", "b") for name in MEMBER_COLUMNS] + [pa.field("reason", pa.string())])


def _ok_rows(output: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, int, bool, int]:
    """(Ray dataset of the committed ok rows, table version, embeddings stored?, embedding width): the rows
    are streamed from the snapshot's files by Ray Data, never gathered in this process."""
    import ray
    from ray.data.context import ShuffleStrategy

    from pipeline.ray_session import ensure_ray

    refuse_earlier_layout(output, storage_options)
    table = open_table(output, storage_options)
    if table is None:
        raise InputError(f"no Delta table under {output}: nothing to deduplicate")
    names = {f.name for f in table.schema().fields}
    if S.IMAGE_SHA256 not in names:
        raise InputError(f"{output} has no {S.IMAGE_SHA256} column (scored before it existed): score it again "
                         f"with --rescore to deduplicate")
    near = S.EMBEDDING in names
    wanted = MEMBER_COLUMNS + [S.IMAGE_SHA256, S.MODEL] + ([S.EMBEDDING] if near else [])
    fs, _ = filesystem(output, storage_options)
    files = [filesystem(uri, storage_options)[1] for uri in table.file_uris()]
    ensure_ray()
    rows = ray.data.read_parquet(files, filesystem=pyarrow_filesystem(fs), partitioning=None)
    # The sort-based shuffle runs a groupby as plain tasks; the default first starts aggregator actors.
    rows.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    rows = rows.map_batches(_ok_only, batch_format="pyarrow", batch_size=None, fn_kwargs={"columns": wanted})
    width = 0
    if near:
        first = rows.select_columns([S.EMBEDDING]).take(1)
        width = len(first[0][S.EMBEDDING]) if first else 0
    return rows.materialize(), table.version(), near, width


def _ok_only(batch: pa.Table, columns: Sequence[str]) -> pa.Table:
    batch = batch.filter(pc.equal(batch[S.STATUS], S.Status.OK.value))
    return batch.select([c for c in columns if c in batch.column_names])


def _pairs(left: pa.Table, right: pa.Table, reason: str) -> pa.Table:
    columns = {f"a_{name}": left[name] for name in MEMBER_COLUMNS}
    columns.update({f"b_{name}": right[name] for name in MEMBER_COLUMNS})
    columns["reason"] = pa.array([reason] * left.num_rows, pa.string())
    return pa.table(columns).cast(PAIR_SCHEMA)


def _same_bytes(group: pa.Table) -> pa.Table:
    """One hash's rows: each joined to the first (a star is enough for the groups). Rows without a hash
    (group key null) are not duplicates of each other."""
    if group.num_rows < 2 or group[S.IMAGE_SHA256][0].as_py() is None:
        return PAIR_SCHEMA.empty_table()
    order = pc.sort_indices(group, sort_keys=[(S.SHARD, "ascending"), (S.KEY, "ascending")])
    group = group.take(order)
    first = group.take(pa.array(np.zeros(group.num_rows - 1, dtype=np.int64)))
    return _pairs(first, group.slice(1), "exact")


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


def _unit(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12),
                                dtype=np.float32)  # stored as fp16


class _AssignCells:
    """Each row, once for each of its PROBES nearest cells, with the cell's number."""

    def __init__(self, centroids: np.ndarray):
        import faiss

        self.assigner = faiss.IndexFlatIP(centroids.shape[1])
        self.assigner.add(np.ascontiguousarray(centroids, dtype=np.float32))
        self.probes = min(PROBES, len(centroids))

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return batch.append_column("cell", pa.array([], pa.int64()))
        _, cells = self.assigner.search(_unit(embeddings_of(batch[S.EMBEDDING])), self.probes)
        repeated = batch.take(pa.array(np.repeat(np.arange(batch.num_rows), self.probes)))
        return repeated.append_column("cell", pa.array(cells.ravel().astype(np.int64)))


def _close_in_cell(group: pa.Table, threshold: float) -> pa.Table:
    """One cell's rows: every pair at cosine >= threshold."""
    if group.num_rows < 2:
        return PAIR_SCHEMA.empty_table()
    pairs = _close_pairs(_unit(embeddings_of(group[S.EMBEDDING])), np.arange(group.num_rows), threshold)
    return _pairs(group.take(pa.array(pairs[:, 0])), group.take(pa.array(pairs[:, 1])), "near")


def near_pairs(rows: Any, centroids: np.ndarray, threshold: float) -> Any:
    """The pairs of ``rows`` (a Ray dataset with :data:`MEMBER_COLUMNS` and ``embedding``) whose cosine reaches
    ``threshold``, compared within cells: each row goes to its PROBES nearest centroids (so two near
    duplicates either side of a boundary still meet), Ray Data groups the rows by cell, and each cell's
    pairs are compared in one task. A pair sharing two cells is found twice."""
    import ray
    from ray.data.context import ShuffleStrategy

    workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    cells = rows.select_columns(MEMBER_COLUMNS + [S.EMBEDDING]).map_batches(
        _AssignCells, fn_constructor_args=(centroids,), batch_format="pyarrow", concurrency=(1, workers))
    # The sort-based shuffle runs the grouping as plain tasks; the default first starts aggregator actors.
    cells.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return cells.groupby("cell").map_groups(_close_in_cell, batch_format="pyarrow", fn_kwargs={"threshold": threshold})


def train_cells(rows: Any, count: int, clusters: int, seed: int, train_rows: int = 256 * 1024) -> np.ndarray:
    """k-means centroids of a random sample of ``rows``' embeddings (faiss, spherical)."""
    import faiss

    sample = rows.select_columns([S.EMBEDDING])
    if count > train_rows:
        sample = sample.random_sample(train_rows / count, seed=seed)
    vectors = _unit(embeddings_of(pa.concat_tables(
        list(sample.iter_batches(batch_format="pyarrow", batch_size=None)))[S.EMBEDDING]))
    kmeans = faiss.Kmeans(vectors.shape[1], min(clusters, len(vectors)), niter=20, seed=seed, spherical=True,
                          verbose=False, min_points_per_centroid=1)
    kmeans.train(vectors)
    return kmeans.centroids


def _index_cells(output: str, model: set[str], width: int,
                 storage_options: Mapping[str, Any] | None) -> np.ndarray | None:
    """The ANN index's coarse centroids when it indexes these rows' model: k-means already trained on them."""
    from pipeline.index import open_index

    index = open_index(output, storage_options)
    if index is None or index.manifest.dim != width or model != {index.model}:
        return None
    quantizer = index.index.quantizer
    return quantizer.reconstruct_n(0, quantizer.ntotal)


def _components(pairs: pa.Table) -> tuple[list[tuple[str, str, str, float | None]], np.ndarray]:
    """(members (shard, key, unit, score), component of each) of the graph the pairs draw."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    index: dict[tuple[str, str], int] = {}
    members: list[tuple[str, str, str, float | None]] = []
    ends = []
    for side in ("a", "b"):
        ids = []
        for shard, key, unit, score in zip(*(pairs[f"{side}_{name}"].to_pylist() for name in MEMBER_COLUMNS)):
            at = index.setdefault((shard, key), len(members))
            if at == len(members):
                members.append((shard, key, unit, score))
            ids.append(at)
        ends.append(np.asarray(ids, dtype=np.int64))
    n = len(members)
    graph = coo_matrix((np.ones(len(ends[0]), dtype=np.int8), (ends[0], ends[1])), shape=(n, n))
    return members, connected_components(graph, directed=False)[1] if n else np.zeros(0, np.int64)


def dedup(output: str, threshold: float = DEFAULT_THRESHOLD, clusters: int | None = None, seed: int = 0,
          storage_options: Mapping[str, Any] | None = None) -> DedupResult:
    """Find the duplicate groups of ``output``'s committed ok rows and write them to ``<output>/_dedup``.

    The rows stay in Ray's object store (spilled to disk when large); this process holds the pairs found
    and their members only, about a hundred bytes a duplicate."""
    from deltalake import CommitProperties, write_deltalake

    if not -1.0 <= threshold <= 1.0:
        raise InputError(f"--threshold is a cosine, between -1 and 1; got {threshold}")
    rows, data_version, near_searched, width = _ok_rows(output, storage_options)
    n = rows.count()
    found = [rows.select_columns(MEMBER_COLUMNS + [S.IMAGE_SHA256]).groupby(S.IMAGE_SHA256).map_groups(
        _same_bytes, batch_format="pyarrow")] if n else []
    near_searched = near_searched and n > 1
    used_clusters, centroids, from_index = 0, None, False
    if near_searched:
        models = set(rows.unique(S.MODEL))
        centroids = None if clusters else _index_cells(output, models, width, storage_options)
        from_index = centroids is not None
        if centroids is None:
            centroids = train_cells(rows, n, clusters or max(1, min(n // 2, round(math.sqrt(n)))), seed)
        used_clusters = len(centroids)
        found.append(near_pairs(rows, centroids, threshold))
    tables = [t for ds in found for t in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    pairs = pa.concat_tables([PAIR_SCHEMA.empty_table(), *[t.cast(PAIR_SCHEMA) for t in tables]])
    members, component = _components(pairs)

    # Keeper: highest score, then the smallest (shard, key), so that reruns pick the same row.
    def rank(i: int) -> tuple:
        shard, key, _, score = members[i]
        return component[i], -(score if score is not None and math.isfinite(score) else -math.inf), shard, key

    ranked = sorted(range(len(members)), key=rank)
    keeper_of: dict[int, int] = {}
    for i in ranked:
        keeper_of.setdefault(int(component[i]), i)
    same_bytes = _same_bytes_sets(pairs)
    out = {name: [] for name in SCHEMA.names}
    for i in ranked:
        keeper = keeper_of[int(component[i])]
        shard, key, unit, score = members[i]
        out[S.SHARD].append(shard)
        out[S.KEY].append(key)
        out[S.UNIT].append(unit)
        out["group_id"].append(int(component[i]))
        out["keeper"].append(i == keeper)
        out["keeper_shard"].append(members[keeper][0])
        out["keeper_key"].append(members[keeper][1])
        out["reason"].append("exact" if same_bytes.get((shard, key)) is not None
                             and same_bytes.get((shard, key)) == same_bytes.get(members[keeper][:2]) else "near")
        out[S.AESTHETIC_SCORE].append(None if score is None or not math.isfinite(score) else score)
    table = pa.table(out, schema=SCHEMA)
    duplicates = [r for r, k in zip(out["reason"], out["keeper"]) if not k]
    result = DedupResult(rows=n, groups=len(keeper_of), duplicates=len(duplicates),
                         exact=duplicates.count("exact"), near=duplicates.count("near"), near_searched=near_searched,
                         clusters=used_clusters, threshold=threshold, data_version=data_version,
                         clusters_from_index=from_index)
    uri = dedup_uri(output)
    write_deltalake(table_uri(uri), table, mode="overwrite", schema_mode="overwrite",
                    storage_options=storage_options_for(uri, storage_options),
                    commit_properties=CommitProperties(custom_metadata={
                        "aesthetics.dedup": json.dumps(result.__dict__)}))
    return result


def _same_bytes_sets(pairs: pa.Table) -> dict[tuple[str, str], int]:
    """(shard, key) -> a label shared by rows with the same bytes (the exact pairs' components)."""
    exact = pairs.filter(pc.equal(pairs["reason"], "exact"))
    members, component = _components(exact)
    return {(shard, key): int(c) for (shard, key, _, _), c in zip(members, component)}


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
