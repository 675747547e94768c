"""`aesthetics index OUTPUT`: an approximate-nearest-neighbour index over the stored image embeddings.

A faiss IVF-PQ index, the kind clip-retrieval serves through autofaiss: a coarse k-means quantizer of
``nlist`` cells and a product quantizer of ``m`` one-byte codes per row, trained once on a sample of the
committed ``ok`` rows. The rows are added in parts, one Ray task per group of units, each writing

- ``parts/<name>.faiss``: the part's PQ codes in their inverted lists (local ids 0..rows-1);
- ``parts/<name>.npy``: the part's embeddings in float16, row for row, for exact re-ranking;
- ``parts/<name>.parquet``: the part's rows (key, shard, unit, where the image lives, caption, score), so
  an id maps back to its row without a table scan;

and ``index.json`` names the live parts, the units each covers (with the unit version it read), the data
table version it read and the parameters. The manifest is written last: a reader sees the old index or the
new one. An update (after a nightly run) adds parts for units the index lacks and rebuilds only the parts
holding a unit that was scored again since; ``--rebuild`` trains afresh.

A search loads the live parts into one in-memory IVF index (ids are positions in the live parts' order),
asks it for ``candidates`` rows (a few times the rows wanted) among those passing the score threshold and
the duplicate filter (a faiss ID selector, so the threshold never empties the result), and re-ranks them by
the exact cosine with their float16 embeddings: the same values the table stores, to fp16 rounding.

What it costs: ``m`` bytes of codes plus ``2 * dim`` bytes of float16 per row (the re-ranking copy), plus
the row map. Beyond one machine's memory the parts would be merged into on-disk inverted lists (faiss's
``OnDiskInvertedLists``, as autofaiss does); that is not built here.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Collection, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import bands
from pipeline import schema as S
from pipeline.errors import InputError, UsageError
from pipeline.io.delta import embeddings_of, open_table
from pipeline.io.storage import filesystem, join, read_json, write_bytes_atomic, write_json_atomic
from pipeline.io.units import read_units, refuse_earlier_layout

log = logging.getLogger(__name__)

INDEX_DIR = "_index"
MANIFEST = "index.json"
FORMAT = 1
SIMILARITY = "query_similarity"

# What the row map keeps of each row: enough to show it, fetch its image and filter it.
ROW_COLUMNS = (S.KEY, S.SHARD, S.UNIT, S.MEMBER, S.OFFSET, S.SIZE, S.IMAGE_FORMAT, S.URL, S.CAPTION,
               S.AESTHETIC_SCORE, S.MODEL)


@dataclass(frozen=True)
class IndexOptions:
    nlist: int | None = None  # IVF cells; None: a power of two near sqrt(rows)
    pq_m: int | None = None  # PQ sub-quantizers (bytes a row); None: dim / 8 rounded to a divisor of dim
    nprobe: int | None = None  # cells a query visits; None: nlist / 16, at least 16
    train_rows: int = 200_000  # rows sampled for training (faiss wants ~39+ a centroid)
    rows_per_part: int = 1_000_000  # rows one Ray task adds and writes
    rebuild: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("nlist", "pq_m", "nprobe"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.train_rows < 1 or self.rows_per_part < 1:
            raise UsageError("--train-rows and --rows-per-part must be >= 1")


@dataclass
class Manifest:
    model: str  # the rows' model identity: queries must come from the same model
    dim: int
    nlist: int
    pq_m: int
    pq_bits: int
    nprobe: int
    trained: str  # the trained, empty index's file name
    trained_rows: int
    data_version: int  # the data table version the newest part read
    parts: list[dict[str, Any]] = field(default_factory=list)  # name, rows, units {unit: unit_version}
    updated_at: str = ""
    format: int = FORMAT

    @property
    def rows(self) -> int:
        return sum(int(p["rows"]) for p in self.parts)

    @property
    def units(self) -> dict[str, int]:
        return {u: v for p in self.parts for u, v in p["units"].items()}


@dataclass(frozen=True)
class IndexResult:
    rows: int
    parts: int
    parts_added: int
    parts_dropped: int  # parts of an earlier update no longer named (a unit in them was scored again)
    units_added: int
    trained: bool
    seconds: float
    manifest: Manifest


def index_uri(output: str) -> str:
    return join(output, INDEX_DIR)


# Parameters ---------------------------------------------------------------------------------------


def _power_of_two_near(x: float) -> int:
    return 1 << max(0, round(math.log2(max(1.0, x))))


def choose_parameters(rows: int, dim: int, options: IndexOptions, train_rows: int) -> tuple[int, int, int, int]:
    """(nlist, pq_m, pq_bits, nprobe) for ``rows`` vectors of ``dim``, trained on ``train_rows``."""
    # sqrt(rows) cells keeps k-means training (rows x cells x dim) affordable on a CPU; faiss's guide says 4 to
    # 16 x sqrt(rows) for the best speed at a given recall, which --nlist can ask for.
    nlist = options.nlist or _power_of_two_near(math.sqrt(rows))
    nlist = max(1, min(nlist, train_rows // 39 or 1))  # fewer points than ~39 a cell leaves cells empty
    if options.pq_m:
        if dim % options.pq_m:
            raise UsageError(f"--pq-m must divide the embedding width {dim}; got {options.pq_m}")
        pq_m = options.pq_m
    else:
        pq_m = max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)
    pq_bits = max(1, min(8, int(math.log2(max(2, train_rows)))))  # PQ k-means needs 2**bits points
    nprobe = min(nlist, options.nprobe or max(16, nlist // 16))
    return nlist, pq_m, pq_bits, nprobe


# Faiss parts --------------------------------------------------------------------------------------


def train(sample: np.ndarray, nlist: int, pq_m: int, pq_bits: int, seed: int = 0) -> bytes:
    """An empty IVF-PQ index (inner product on unit vectors) trained on ``sample``; faiss's bytes."""
    import faiss

    dim = sample.shape[1]
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, pq_bits, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.pq.cp.seed = seed
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return faiss.serialize_index(index).tobytes()


def fill(trained: bytes, vectors: np.ndarray) -> bytes:
    """The trained index with ``vectors`` added under ids 0..n-1; faiss's bytes."""
    import faiss

    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return faiss.serialize_index(index).tobytes()


def unit_vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    vectors = embeddings_of(column)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


# Building -----------------------------------------------------------------------------------------


def _ok_rows_of_units(output: str, version: int, units: Sequence[str], model: str, columns: Sequence[str],
                      storage_options: Mapping[str, Any] | None) -> pa.Table:
    from deltalake import DeltaTable

    from pipeline.io.delta import storage_options_for, table_uri

    table = DeltaTable(table_uri(output), version=version, storage_options=storage_options_for(output, storage_options))
    dataset = table.to_pyarrow_dataset()
    present = [c for c in columns if c in dataset.schema.names]
    expression = ((pc.field(S.STATUS) == S.Status.OK.value) & (pc.field(S.MODEL) == model)
                  & pc.field(S.UNIT).isin(list(units)))
    rows = dataset.to_table(columns=present, filter=expression)
    for name in columns:
        if name not in rows.column_names:
            rows = rows.append_column(name, pa.nulls(rows.num_rows, dataset.schema.field(name).type
                                                     if name in dataset.schema.names else pa.string()))
    # A stable order: the same units give the same part, whatever order the files were read in.
    order = pc.sort_indices(rows, sort_keys=[(S.UNIT, "ascending"), (S.SHARD, "ascending"), (S.KEY, "ascending")])
    return rows.take(order).select(list(columns))


def build_part(output: str, version: int, units: Sequence[str], model: str, trained: bytes,
               storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read the ok rows of ``units`` at table ``version``, add them to a copy of the trained index and write
    the part's three files; returns the part's manifest entry (without unit versions; no name and no files
    when the units hold no ok row). A Ray task."""
    rows = _ok_rows_of_units(output, version, units, model, ROW_COLUMNS + (S.EMBEDDING,), storage_options)
    if rows.num_rows == 0:
        return {"name": None, "rows": 0}
    stored = embeddings_of(rows[S.EMBEDDING])
    vectors = stored / np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-12)
    name = f"part-{uuid.uuid4().hex[:16]}"
    fs, root = filesystem(index_uri(output), storage_options)
    fs.makedirs(join(root, "parts"), exist_ok=True)
    write_bytes_atomic(fs, join(root, "parts", name + ".faiss"), fill(trained, vectors))
    buffer = io.BytesIO()
    # The stored values themselves (float16 written as float32): re-ranking then computes the very dot
    # products the brute-force path does.
    np.save(buffer, stored.astype(np.float16))
    write_bytes_atomic(fs, join(root, "parts", name + ".npy"), buffer.getvalue())
    sink = io.BytesIO()
    pq.write_table(rows.drop_columns([S.EMBEDDING]), sink, compression="zstd")
    write_bytes_atomic(fs, join(root, "parts", name + ".parquet"), sink.getvalue())
    return {"name": name, "rows": int(rows.num_rows)}


def read_manifest(output: str, storage_options: Mapping[str, Any] | None = None) -> Manifest | None:
    fs, root = filesystem(index_uri(output), storage_options)
    path = join(root, MANIFEST)
    if not fs.exists(path):
        return None
    payload = read_json(fs, path)
    if payload.get("format") != FORMAT:
        raise InputError(f"{index_uri(output)} was written in index format {payload.get('format')}, "
                         f"this version reads {FORMAT}: run `aesthetics index {output} --rebuild`")
    return Manifest(**payload)


def _model_of(records: Mapping[str, Mapping[str, Any]], model: str | None) -> str:
    identities = sorted({m for r in records.values() for m in (r.get("model") or [])})
    if model:
        if model not in identities:
            raise UsageError(f"no committed unit was scored with {model}; the units name {identities}")
        return model
    if len(identities) != 1:
        raise UsageError(f"the units were scored with {len(identities)} models ({identities}): "
                         f"name the one to index with --model-identity")
    return identities[0]


def _group_units(units: Sequence[str], ok_rows: Mapping[str, int], rows_per_part: int) -> list[list[str]]:
    groups, group, count = [], [], 0
    for unit in units:
        group.append(unit)
        count += ok_rows.get(unit, 0)
        if count >= rows_per_part:
            groups.append(group)
            group, count = [], 0
    if group:
        groups.append(group)
    return groups


def _training_sample(output: str, version: int, units: Sequence[str], model: str, ok_rows: Mapping[str, int],
                     train_rows: int, seed: int, storage_options: Mapping[str, Any] | None) -> np.ndarray:
    """Up to ``train_rows`` unit vectors from a random subset of ``units``, read whole (a unit's rows are
    one or a few files: reading units, not scattered rows, keeps it to few reads)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(units))
    chosen, count = [], 0
    for i in order:
        chosen.append(units[i])
        count += ok_rows.get(units[i], 0)
        if count >= train_rows:
            break
    rows = _ok_rows_of_units(output, version, chosen, model, (S.UNIT, S.SHARD, S.KEY, S.EMBEDDING), storage_options)
    vectors = unit_vectors(rows[S.EMBEDDING]) if rows.num_rows else np.zeros((0, 0), np.float32)
    if len(vectors) > train_rows:
        vectors = vectors[np.sort(rng.choice(len(vectors), train_rows, replace=False))]
    return vectors


def build_index(output: str, options: IndexOptions = IndexOptions(), model: str | None = None,
                storage_options: Mapping[str, Any] | None = None, use_ray: bool | None = None) -> IndexResult:
    """Create or bring up to date ``<output>/_index`` over the committed ok rows of one model."""
    from pipeline.io.units import versions

    started = time.time()
    refuse_earlier_layout(output, storage_options)
    table = open_table(output, storage_options)
    if table is None:
        raise InputError(f"no Delta table under {output}: nothing to index")
    if S.EMBEDDING not in {f.name for f in table.schema().fields}:
        raise InputError(f"{output} stores no embeddings: score with --write-embeddings to index it")
    data_version = table.version()
    records = read_units(output, storage_options)
    if not records:
        raise InputError(f"no committed units under {output}: nothing to index")
    model = _model_of(records, model)
    current = {u: v for u, (v, _) in versions(output, storage_options).items()
               if model in (records.get(u, {}).get("model") or [])}
    ok_rows = {u: int((records[u].get("counts_by_status") or {}).get(S.Status.OK.value, 0)) for u in current}

    previous = read_manifest(output, storage_options)
    old = None if options.rebuild else previous
    if old is not None and old.model != model:
        raise UsageError(f"the index holds {old.model}, not {model}: pass --rebuild to index {model} instead")
    fs, root = filesystem(index_uri(output), storage_options)
    if old is None:
        units = sorted(current)
        sample = _training_sample(output, data_version, units, model, ok_rows, options.train_rows, options.seed,
                                  storage_options)
        if len(sample) == 0:
            raise InputError(f"{output} has no ok rows with embeddings for {model}: nothing to index")
        nlist, pq_m, pq_bits, nprobe = choose_parameters(sum(ok_rows.values()), sample.shape[1], options, len(sample))
        trained = train(sample, nlist, pq_m, pq_bits, options.seed)
        trained_name = f"trained-{uuid.uuid4().hex[:16]}.faiss"
        write_bytes_atomic(fs, join(root, trained_name), trained)
        manifest = Manifest(model=model, dim=int(sample.shape[1]), nlist=nlist, pq_m=pq_m, pq_bits=pq_bits,
                            nprobe=nprobe, trained=trained_name, trained_rows=int(len(sample)),
                            data_version=data_version)
        kept = []
    else:
        with fs.open(join(root, old.trained), "rb") as handle:
            trained = handle.read()
        manifest = dataclasses.replace(old, parts=[])
        if options.nprobe:
            manifest.nprobe = min(manifest.nlist, options.nprobe)
        # A part is kept while every unit in it is still at the version it read; one unit scored again
        # (or gone) sends the whole part back to be rebuilt from its units' current rows.
        kept = [p for p in old.parts if all(current.get(u) == v for u, v in p["units"].items())]
    covered = {u for p in kept for u in p["units"]}
    todo = sorted(u for u in current if u not in covered)
    groups = _group_units(todo, ok_rows, options.rows_per_part)

    parallel = use_ray if use_ray is not None else len(groups) > 1
    if parallel and groups:
        import ray

        from pipeline.ray_session import ensure_ray

        ensure_ray()
        task = ray.remote(num_cpus=1, max_retries=2)(build_part)
        trained_ref = ray.put(trained)
        made = ray.get([task.remote(output, data_version, g, model, trained_ref, dict(storage_options or {}))
                        for g in groups])
    else:
        made = [build_part(output, data_version, g, model, trained, storage_options) for g in groups]
    for entry, group in zip(made, groups):
        entry["units"] = {u: current[u] for u in group}
    # Units without ok rows get an entry too (a part with no files), so that an update passes over them
    # until they are scored again.
    manifest.parts = kept + made
    manifest.data_version = data_version
    manifest.updated_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    write_json_atomic(fs, join(root, MANIFEST), asdict(manifest))
    # Files the new manifest no longer names go once it is written: a reader holds the old one or the new.
    named = {p["name"] for p in manifest.parts if p["name"]} | {manifest.trained}
    gone = [] if previous is None else [p["name"] for p in previous.parts if p["name"] and p["name"] not in named]
    for name in gone:
        for suffix in (".faiss", ".npy", ".parquet"):
            fs.rm(join(root, "parts", name + suffix))
    if previous is not None and previous.trained not in named:
        fs.rm(join(root, previous.trained))
    return IndexResult(rows=manifest.rows, parts=len([p for p in manifest.parts if p["name"]]),
                       parts_added=len([e for e in made if e["name"]]), parts_dropped=len(gone),
                       units_added=len(todo), trained=old is None, seconds=time.time() - started, manifest=manifest)


# Searching ----------------------------------------------------------------------------------------


class AnnIndex:
    """The live parts of an output's index, loaded for searching."""

    def __init__(self, manifest: Manifest, index: Any, vectors: list[np.ndarray], rows: pa.Table):
        self.manifest = manifest
        self.index = index
        self.vectors = vectors  # float16, one array a part
        self.starts = np.cumsum([0] + [len(v) for v in vectors])
        self.rows = rows  # the row map, in id order
        self.scores = rows[S.AESTHETIC_SCORE].to_numpy(zero_copy_only=False).astype(np.float32) if rows.num_rows \
            else np.zeros(0, np.float32)
        self.index.nprobe = manifest.nprobe

    @property
    def model(self) -> str:
        return self.manifest.model

    @property
    def units(self) -> dict[str, int]:
        return self.manifest.units

    def __len__(self) -> int:
        return int(self.starts[-1])

    def embeddings(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), dim) re-ranking vectors of ``ids``."""
        out = np.empty((len(ids), self.manifest.dim), dtype=np.float32)
        part = np.searchsorted(self.starts, ids, side="right") - 1
        for p in np.unique(part):
            chosen = part == p
            out[chosen] = self.vectors[p][ids[chosen] - self.starts[p]]
        return out

    def allowed(self, min_score: float | None = None, exclude: Mapping[str, frozenset[str]] | None = None,
                skip_units: Collection[str] = ()) -> np.ndarray | None:
        """Boolean mask over ids of the rows a search may return; None: all."""
        if min_score is None and not exclude and not skip_units:
            return None
        mask = np.ones(len(self), dtype=bool)
        if skip_units:
            mask &= ~np.isin(self.rows[S.UNIT].to_numpy(zero_copy_only=False), list(skip_units))
        if min_score is not None:
            mask &= np.nan_to_num(self.scores, nan=-np.inf) >= min_score
        if exclude:
            excluded = pa.array([f"{shard}\x00{key}" for shard, keys in exclude.items() for key in keys], pa.string())
            row_ids = pc.binary_join_element_wise(self.rows[S.SHARD], self.rows[S.KEY], "\x00")
            mask &= ~pc.is_in(row_ids, value_set=excluded).to_numpy(zero_copy_only=False)
        return mask

    def candidates(self, queries: np.ndarray, count: int, mask: np.ndarray | None = None) -> np.ndarray:
        """(n_queries, count) ids from the IVF-PQ search (-1 where fewer rows qualify)."""
        import faiss

        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        params = faiss.SearchParametersIVF(nprobe=self.manifest.nprobe)
        if mask is not None:
            bits = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
            params.sel = selector
            _, ids = self.index.search(queries, count, params=params)
            del bits, selector  # the selector reads the bitmap during the search only
        else:
            _, ids = self.index.search(queries, count, params=params)
        return ids

    def search(self, query: np.ndarray, limit: int, candidates: int | None = None, min_score: float | None = None,
               exclude: Mapping[str, frozenset[str]] | None = None, skip_units: Collection[str] = ()
               ) -> tuple[pa.Table, int]:
        """The ``limit`` rows most similar to ``query`` that pass the filters (score >= ``min_score``, not in
        ``exclude`` (shard -> keys), unit not in ``skip_units``), ranked by the exact dot product of the
        query with their stored embeddings over the index's ``candidates`` (default 10 x ``limit``); and
        how many rows pass the filters. Columns: :data:`ROW_COLUMNS`, ``embedding``, ``query_similarity``,
        ``score_band`` (the brute-force path's shape)."""
        mask = self.allowed(min_score, exclude, skip_units)
        passing = len(self) if mask is None else int(mask.sum())
        want = max(limit, candidates or 10 * limit)
        ids = self.candidates(query, min(want, max(1, len(self))), mask)[0] if len(self) else np.zeros(0, np.int64)
        ids = ids[ids >= 0]
        vectors = self.embeddings(ids)
        sims = vectors @ np.asarray(query, dtype=np.float32).ravel()
        picked = self.rows.select([S.KEY, S.SHARD]).take(pa.array(ids))
        keys = np.asarray(picked[S.KEY].to_pylist(), dtype=object).astype(str)
        shards = np.asarray(picked[S.SHARD].to_pylist(), dtype=object).astype(str)
        order = np.lexsort((shards, keys, -sims))[:limit]  # ties broken as the brute-force path breaks them
        ids, vectors, sims = ids[order], vectors[order], sims[order]
        table = self.rows.take(pa.array(ids))
        width = vectors.shape[1] if vectors.ndim == 2 else 0
        offsets = pa.array(np.arange(0, vectors.size + 1, max(1, width), dtype=np.int32)[:len(ids) + 1])
        table = table.append_column(S.EMBEDDING, pa.ListArray.from_arrays(offsets, pa.array(vectors.ravel())))
        table = table.append_column(SIMILARITY, pa.array(sims.astype(np.float32)))
        band = [bands.band_of(s) for s in table[S.AESTHETIC_SCORE].to_pylist()]
        return table.append_column(S.SCORE_BAND, pa.array(band, pa.string())), passing


_LOADED: dict[tuple[str, str], AnnIndex] = {}


def open_index(output: str, storage_options: Mapping[str, Any] | None = None) -> AnnIndex | None:
    """The output's index loaded for searching, or None without one. Kept in memory per (output, update):
    a server answering many queries loads it once."""
    import faiss

    manifest = read_manifest(output, storage_options)
    if manifest is None:
        return None
    cache_key = (output, manifest.updated_at + "|" + ",".join(str(p["name"]) for p in manifest.parts))
    if cache_key in _LOADED:
        return _LOADED[cache_key]
    fs, root = filesystem(index_uri(output), storage_options)
    with fs.open(join(root, manifest.trained), "rb") as handle:
        index = faiss.deserialize_index(np.frombuffer(handle.read(), dtype=np.uint8))
    vectors, tables, offset = [], [], 0
    for part in manifest.parts:
        if not part.get("name"):
            continue
        base = join(root, "parts", part["name"])
        with fs.open(base + ".faiss", "rb") as handle:
            piece = faiss.deserialize_index(np.frombuffer(handle.read(), dtype=np.uint8))
        index.merge_from(piece, offset)  # the part's ids 0..n-1 become offset..offset+n-1
        with fs.open(base + ".npy", "rb") as handle:
            vectors.append(np.load(io.BytesIO(handle.read())))
        with fs.open(base + ".parquet", "rb") as handle:
            tables.append(pq.read_table(handle))
        offset += int(part["rows"])
    rows = pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in ROW_COLUMNS})
    loaded = AnnIndex(manifest, index, vectors, rows)
    for key in [k for k in _LOADED if k[0] == output]:
        del _LOADED[key]
    _LOADED[cache_key] = loaded
    return loaded


def stale_units(index: AnnIndex, current: Mapping[str, int]) -> set[str]:
    """Units of ``current`` (unit -> unit version) the index does not hold at that version."""
    have = index.units
    return {u for u, v in current.items() if have.get(u) != v}


def describe(manifest: Manifest) -> dict[str, Any]:
    rows = manifest.rows
    return {"model": manifest.model, "rows": rows, "parts": len([p for p in manifest.parts if p.get("name")]),
            "units": len(manifest.units), "factory": f"IVF{manifest.nlist},PQ{manifest.pq_m}x{manifest.pq_bits}",
            "nprobe": manifest.nprobe, "data_version": manifest.data_version, "updated_at": manifest.updated_at}
