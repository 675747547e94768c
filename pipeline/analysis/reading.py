"""Read a scored output prefix: committed units only, as a pyarrow dataset or a DuckDB relation.

The output is a Delta Lake table: only the files its log lists are read, so a unit whose commit was
interrupted, a unit's replaced files, staging folders and leftovers of crashed runs are invisible here,
exactly as they are to the cutoff table. The ``score_band`` Hive partition comes back as a column, and rows inside each
file are sorted by score, so a filter on ``aesthetic_score`` prunes partitions *and* row groups::

    from pipeline.analysis import open_scores, score_filter
    ds = open_scores("s3://bucket/scores")
    best = ds.to_table(columns=["key", "caption", "aesthetic_score"], filter=score_filter(6.5))

DuckDB SQL over the same snapshot (a view named ``scores``)::

    import duckdb
    from pipeline.analysis import duckdb_relation
    con = duckdb.connect()
    duckdb_relation("demo-output/scores", con=con)
    con.sql("SELECT score_band, count(*) FROM scores WHERE status = 'ok' GROUP BY ALL").show()

And any image straight out of its shard, with one ranged read of the tar (no tar is reread whole)::

    from pipeline.analysis import fetch_image
    jpeg = fetch_image(row)  # row: a mapping with shard, tar_member, tar_offset, tar_size (an output row)
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.dataset as pads

from pipeline import bands
from pipeline import schema as S
from pipeline.bands import bands_at_least
from pipeline.io.delta import committed_files, open_table
from pipeline.io.storage import filesystem
from pipeline.io.units import read_units, refuse_earlier_layout

__all__ = [
    "BAND_RANGES", "ImageRef", "bands_at_least", "committed_paths", "duckdb_relation", "fetch_image",
    "fetch_images", "open_scores", "read_units", "score_filter", "thumbnail",
]


BAND_RANGES = bands.RANGES  # [low, high) score range of each band

# (shard URI, offset, size, member): where a row's image lies. Offset and size are bytes in a tar or an
# image file; the row's input format says what they mean elsewhere (a Parquet file: row number, image bytes).
ImageRef = tuple[str, int, int, "str | None"]


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


def committed_paths(output: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, list[str]]:
    """(fsspec filesystem, paths within it) of the data files in the output's current snapshot."""
    fs, _ = filesystem(output, storage_options)
    return fs, [fs._strip_protocol(uri) for uri in committed_files(output, storage_options)]


def open_scores(output: str, storage_options: Mapping[str, Any] | None = None,
                version: int | None = None) -> pads.Dataset:
    """The committed rows under ``output`` as a pyarrow dataset with the ``score_band`` partition column.

    It is the Delta table's snapshot (``version``: an earlier one, e.g. before last night's run): files of
    uncommitted or replaced units are not in it. Filters given to ``to_table``/``scanner`` are pushed down:
    ``score_band`` prunes whole files, ``aesthetic_score`` prunes row groups (see :func:`score_filter`).
    An empty prefix gives an empty dataset with the output schema.
    """
    table = open_table(output, storage_options)
    if table is None:
        refuse_earlier_layout(output, storage_options)
        empty = S.output_schema().append(pa.field(S.SCORE_BAND, pa.string()))
        return pads.dataset(empty.empty_table())
    if version is not None:
        table.load_as_version(version)
    return table.to_pyarrow_dataset()


_VIEW_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def duckdb_relation(output: str, con: Any = None, view_name: str = "scores",
                    storage_options: Mapping[str, Any] | None = None) -> Any:
    """A DuckDB relation over the committed rows, also registered on ``con`` as the view ``view_name``.

    DuckDB scans the Delta snapshot's pyarrow dataset (:func:`open_scores`), so filters and projections are
    pushed down to it; ``embedding`` reads as ``FLOAT[]``. Unscored rows have a NaN score: filter on
    ``status = 'ok'``. The view is the snapshot at call time: call again to see units committed later.
    """
    import duckdb

    if not _VIEW_NAME.match(view_name):
        raise ValueError(f"view name {view_name!r} must be a plain SQL identifier")
    con = con if con is not None else duckdb.connect()
    con.register(f"{view_name}__snapshot", open_scores(output, storage_options))
    con.execute(f"CREATE OR REPLACE VIEW {view_name} AS SELECT * FROM {view_name}__snapshot")
    return con.table(view_name)


# Images ----------------------------------------------------------------------------------------


def _image_ref(item: Any) -> ImageRef:
    member = None
    if hasattr(item, "_asdict"):  # a pandas itertuples() row
        item = item._asdict()
    if isinstance(item, Mapping):
        shard, offset, size, member = item[S.SHARD], item[S.OFFSET], item[S.SIZE], item.get(S.MEMBER)
    elif hasattr(item, "__getitem__") and not isinstance(item, (str, bytes)) and len(item) in (3, 4):
        shard, offset, size, *rest = item
        member = rest[0] if rest else None
    else:
        raise TypeError(f"expected a row with {S.SHARD}, {S.OFFSET}, {S.SIZE} or a (shard, offset, size) tuple, "
                        f"got {type(item).__name__}")
    if offset is None or size is None or offset != offset or size != size:  # None or NaN: no image member
        raise ValueError(f"row has no image in its shard ({S.OFFSET}={offset}, {S.SIZE}={size})")
    return str(shard), int(offset), int(size), None if member is None or member != member else str(member)


def _read(ref: ImageRef, fs: Any) -> bytes:
    from pipeline.sources import source_for_row
    from pipeline.sources.base import read_byte_range

    shard, offset, size, member = ref
    path = fs._strip_protocol(shard)
    try:
        source = source_for_row(shard, member)
    except ValueError:
        if member is not None:
            raise
        return read_byte_range(fs, path, offset, size)  # a bare (shard, offset, size): bytes at an offset
    return source.fetch(fs, path, member, offset, size)


def fetch_image(item: Any, storage_options: Mapping[str, Any] | None = None, fs: Any = None) -> bytes:
    """The raw bytes of one row's image, read where its input format put them: ONE ranged request on its tar
    (or on its image file; a Parquet input reads the image column of the row's row group).

    ``item`` is an output row (a mapping, a pandas row) with ``shard``, ``tar_offset``, ``tar_size`` and
    ``tar_member``, or a ``(shard, offset, size)`` tuple of a tar. ``fs`` reuses a filesystem across calls.
    """
    ref = _image_ref(item)
    if fs is None:
        fs, _ = filesystem(ref[0], storage_options)
    data = _read(ref, fs)
    if len(data) != ref[2]:
        raise IOError(f"{ref[0]}: read {len(data)} bytes at {ref[1]}, expected {ref[2]} "
                      f"(input changed since scoring?)")
    return data


def fetch_images(items: Iterable[Any], storage_options: Mapping[str, Any] | None = None,
                 max_workers: int = 16) -> list[bytes]:
    """:func:`fetch_image` for many rows, concurrently (one read each), in input order."""
    items = list(items)
    if not items:
        return []
    refs = [_image_ref(item) for item in items]
    filesystems: dict[str, Any] = {}
    for ref in refs:
        protocol = ref[0].split("://", 1)[0] if "://" in ref[0] else "file"
        if protocol not in filesystems:
            filesystems[protocol] = filesystem(ref[0], storage_options)[0]

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

