"""Read a scored output prefix: committed units only, as a pyarrow dataset or a DuckDB relation.

Only the data files that the manifests list are read (``pipeline.io.manifests.committed_files``): a unit
whose commit was interrupted, staging folders and leftovers of crashed runs are invisible here, exactly as
they are to the cutoff table. The ``score_band`` Hive partition comes back as a column, and rows inside each
file are sorted by score, so a filter on ``aesthetic_score`` prunes partitions *and* row groups::

    from pipeline.analysis import open_scores, score_filter
    ds = open_scores("s3://bucket/scores")
    best = ds.to_table(columns=["key", "caption", "aesthetic_score"], filter=score_filter(6.5))

DuckDB SQL over the same committed files (a view named ``scores``)::

    import duckdb
    from pipeline.analysis import duckdb_relation
    con = duckdb.connect()
    duckdb_relation("demo-output/scores", con=con)
    con.sql("SELECT score_band, count(*) FROM scores WHERE status = 'ok' GROUP BY ALL").show()

And any image straight out of its shard, with one ranged read of the tar (no tar is reread whole)::

    from pipeline.analysis import fetch_image
    jpeg = fetch_image(row)  # row: a mapping with shard, tar_offset, tar_size (a Parquet row)
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import bands
from pipeline import schema as S
from pipeline.bands import bands_at_least
from pipeline.io.manifests import committed_files, read_manifests
from pipeline.io.storage import filesystem, protocol_of

__all__ = [
    "BAND_RANGES", "ImageRef", "bands_at_least", "committed_paths", "duckdb_relation", "fetch_image",
    "fetch_images", "open_scores", "read_manifests", "score_filter", "thumbnail",
]

PARTITIONING = pads.partitioning(pa.schema([pa.field(S.SCORE_BAND, pa.string())]), flavor="hive")

BAND_RANGES = bands.RANGES  # [low, high) score range of each band

ImageRef = tuple[str, int, int]  # (shard URI, byte offset of the member's data, byte size)


def score_filter(min_score: float | None = None, max_score: float | None = None,
                 ok_only: bool = True) -> pads.Expression:
    """A dataset filter on the primary score that also prunes ``score_band`` partitions.

    ``min_score`` is inclusive, ``max_score`` exclusive (the LAION cutoffs read "score >= t").
    """
    expression = pads.field(S.STATUS) == S.Status.OK.value if ok_only else pads.scalar(True)
    if min_score is not None:
        expression = expression & pads.field(S.SCORE_BAND).isin(bands.bands_at_least(min_score)) \
            & (pads.field(S.AESTHETIC_SCORE) >= min_score)
    if max_score is not None:
        expression = expression & pads.field(S.SCORE_BAND).isin(bands.bands_below(max_score)) \
            & (pads.field(S.AESTHETIC_SCORE) < max_score)
    return expression


def committed_paths(output: str, storage_options: Mapping[str, Any] | None = None,
                    manifests: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Any, list[str]]:
    """(fsspec filesystem, paths within it) of the committed data files, in manifest order."""
    fs, _ = filesystem(output, storage_options)
    uris = committed_files(output, storage_options, manifests=manifests)
    return fs, [fs._strip_protocol(uri) for uri in uris]


def _unified_schema(fs: Any, paths: Sequence[str], manifests: Mapping[str, Mapping[str, Any]],
                    root: str) -> pa.Schema | None:
    """One file's footer per run: files of one run share their columns (same heads, embeddings on or
    off), so this sees every column without opening every footer of a billion-row prefix."""
    by_run: dict[str, str] = {}
    for manifest in manifests.values():
        for entry in manifest["files"]:
            by_run.setdefault(str(manifest.get("run_id")) + str(manifest.get("model_key")),
                              root.rstrip("/") + "/" + entry["path"])
    if not paths:
        return None
    schemas = []
    for path in by_run.values() or paths[:1]:
        with fs.open(path, "rb") as handle:
            schemas.append(pq.read_schema(handle))
    unified = pa.unify_schemas(schemas, promote_options="permissive")
    return unified.append(pa.field(S.SCORE_BAND, pa.string()))


def open_scores(output: str, storage_options: Mapping[str, Any] | None = None,
                manifests: Mapping[str, Mapping[str, Any]] | None = None) -> pads.Dataset:
    """The committed rows under ``output`` as a pyarrow dataset with the ``score_band`` partition column.

    Only files listed in manifests are part of it. Filters given to ``to_table``/``scanner`` are pushed
    down: ``score_band`` prunes whole files, ``aesthetic_score`` prunes row groups (see :func:`score_filter`).
    An empty prefix gives an empty dataset with the output schema.
    """
    fs, root = filesystem(output, storage_options)
    if manifests is None:
        manifests = read_manifests(output, storage_options)
    _, paths = committed_paths(output, storage_options, manifests)
    if not paths:
        empty = S.output_schema().append(pa.field(S.SCORE_BAND, pa.string()))
        return pads.dataset(empty.empty_table())
    schema = _unified_schema(fs, paths, manifests, root)
    return pads.dataset(paths, schema=schema, format="parquet", filesystem=fs, partitioning=PARTITIONING,
                        partition_base_dir=root.rstrip("/"))


_VIEW_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def duckdb_relation(output: str, con: Any = None, view_name: str = "scores",
                    storage_options: Mapping[str, Any] | None = None) -> Any:
    """A DuckDB relation over the committed rows, also registered on ``con`` as the view ``view_name``.

    DuckDB's own Parquet reader reads exactly the files the manifests list (``hive_partitioning`` gives the
    ``score_band`` column; ``union_by_name`` copes with units scored with other heads), so its filter and
    projection pushdown apply; ``embedding`` reads as ``FLOAT[]``. For object storage the job's fsspec
    filesystem (with ``storage_options``) is registered on the connection, so DuckDB needs no credentials
    or endpoint of its own. Unscored rows have a NaN score: filter on ``status = 'ok'``.
    The view is a snapshot of the manifests at call time: call again to see units committed later.
    """
    import duckdb

    if not _VIEW_NAME.match(view_name):
        raise ValueError(f"view name {view_name!r} must be a plain SQL identifier")
    con = con if con is not None else duckdb.connect()
    fs, _ = filesystem(output, storage_options)
    uris = committed_files(output, storage_options)
    if not uris:
        empty = S.output_schema().append(pa.field(S.SCORE_BAND, pa.string())).empty_table()
        con.register(f"{view_name}__empty", empty)
        con.execute(f"CREATE OR REPLACE VIEW {view_name} AS SELECT * FROM {view_name}__empty")
        return con.table(view_name)
    if protocol_of(fs) not in ("file", "local"):
        # One fsspec filesystem per protocol and connection: the latest call's options win.
        if protocol_of(fs) in con.list_filesystems():
            con.unregister_filesystem(protocol_of(fs))
        con.register_filesystem(fs)
    listing = ", ".join("'" + uri.replace("'", "''") + "'" for uri in uris)
    con.execute(f"CREATE OR REPLACE VIEW {view_name} AS SELECT * FROM read_parquet([{listing}], "
                f"hive_partitioning = true, union_by_name = true)")
    return con.table(view_name)


# Images ----------------------------------------------------------------------------------------


def _image_ref(item: Any) -> ImageRef:
    if isinstance(item, Mapping):
        shard, offset, size = item[S.SHARD], item[S.OFFSET], item[S.SIZE]
    elif hasattr(item, "_asdict"):  # a pandas itertuples() row
        row = item._asdict()
        shard, offset, size = row[S.SHARD], row[S.OFFSET], row[S.SIZE]
    elif hasattr(item, "__getitem__") and not isinstance(item, (str, bytes)) and len(item) == 3:
        shard, offset, size = item
    else:
        raise TypeError(f"expected a row with {S.SHARD}, {S.OFFSET}, {S.SIZE} or a (shard, offset, size) tuple, "
                        f"got {type(item).__name__}")
    if offset is None or size is None or offset != offset or size != size:  # None or NaN: no image member
        raise ValueError(f"row has no image in its shard ({S.OFFSET}={offset}, {S.SIZE}={size})")
    return str(shard), int(offset), int(size)


def fetch_image(item: Any, storage_options: Mapping[str, Any] | None = None, fs: Any = None) -> bytes:
    """The raw bytes of one image member, read with ONE ranged request on its tar.

    ``item`` is an output row (a mapping, a pandas row) with ``shard``, ``tar_offset`` and ``tar_size``,
    or a ``(shard, offset, size)`` tuple. ``fs`` reuses a filesystem across calls.
    """
    shard, offset, size = _image_ref(item)
    if fs is None:
        fs, path = filesystem(shard, storage_options)
    else:
        path = fs._strip_protocol(shard)
    data = fs.cat_file(path, start=offset, end=offset + size)
    if len(data) != size:
        raise IOError(f"{shard}: read {len(data)} bytes at {offset}, expected {size} (shard changed since scoring?)")
    return data


def fetch_images(items: Iterable[Any], storage_options: Mapping[str, Any] | None = None,
                 max_workers: int = 16) -> list[bytes]:
    """:func:`fetch_image` for many rows, concurrently (one ranged read each), in input order."""
    items = list(items)
    if not items:
        return []
    refs = [_image_ref(item) for item in items]
    filesystems: dict[str, Any] = {}
    for shard, _, _ in refs:
        protocol = shard.split("://", 1)[0] if "://" in shard else "file"
        if protocol not in filesystems:
            filesystems[protocol] = filesystem(shard, storage_options)[0]

    def one(ref: ImageRef) -> bytes:
        protocol = ref[0].split("://", 1)[0] if "://" in ref[0] else "file"
        return fetch_image(ref, fs=filesystems[protocol])

    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(refs)))) as pool:
        return list(pool.map(one, refs))


def thumbnail(data: bytes, size: int = 192, quality: int = 82) -> bytes:
    """A JPEG thumbnail (longest side ``size``), EXIF orientation applied, for reports and notebooks."""
    import io

    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))
        image = ImageOps.exif_transpose(image).convert("RGB")
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()

