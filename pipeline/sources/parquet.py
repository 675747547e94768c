"""Parquet files with a column of image bytes (a Hugging Face dataset's ``image`` struct included).

A file is one work item and each of its rows one sample. The user names the image column, and optionally
a key column (else a row's key is its row number in the file) and a caption column; a ``url`` column, if
any, fills ``url``, and every other non-binary column goes to ``metadata_json``. A row's ``shard`` is the
file, its member the image column, its offset the row number in the file and its size the image's bytes,
so reading it back reads that column of one row group only.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.io.storage import filesystem
from pipeline.sources.base import Listing, StorageError, UnitPlan, parse_options, plan_sticky_units

if TYPE_CHECKING:
    from pipeline.io.units import Committed

SUFFIX = ".parquet"
URL_COLUMN = "url"
# The first bytes of each format decode reads: the row's image_format, as a tar member's extension would be.
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"))


@dataclass(frozen=True)
class ParquetOptions:
    image_column: str = "image"
    key_column: str | None = None
    caption_column: str | None = None

    def __post_init__(self) -> None:
        for name in ("image_column", "key_column", "caption_column"):
            value = getattr(self, name)
            if not (value is None and name != "image_column") and not (isinstance(value, str) and value):
                raise ValueError(f"{name} must name a column, got {value!r}")


@dataclass(frozen=True)
class ParquetFile:
    name: str
    size: int
    etag: str | None

    @property
    def folder(self) -> str:
        return posixpath.dirname(self.name)

    @property
    def stem(self) -> str:
        return posixpath.basename(self.name)[: -len(SUFFIX)]

    def version(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "etag": self.etag}

    def task(self) -> dict[str, Any]:
        return {"name": self.name}


def image_format(data: bytes | None) -> str | None:
    if data is None:
        return None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def _image_bytes(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Image bytes from a binary column, or from a struct column's ``bytes`` field (Hugging Face's Image)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        return column.field("bytes")
    return column


def _column_problem(schema: pa.Schema, options: ParquetOptions) -> str | None:
    names = schema.names
    for role, name in (("image", options.image_column), ("key", options.key_column),
                       ("caption", options.caption_column)):
        if name is not None and name not in names:
            return f"no {role} column {name!r} (columns: {', '.join(names)}); name it with --input-option {role}_column="
    image = schema.field(options.image_column).type
    if pa.types.is_struct(image):
        image = image.field("bytes").type if image.get_field_index("bytes") >= 0 else None
    if image is None or not (pa.types.is_binary(image) or pa.types.is_large_binary(image)):
        return (f"column {options.image_column!r} holds {schema.field(options.image_column).type}, not image bytes "
                f"(binary, or a struct with a binary 'bytes' field)")
    return None


def _file_error(problem: str) -> list[dict[str, Any]]:
    from pipeline.stages.read import shard_error_row

    return [shard_error_row(S.Status.SHARD_ERROR, problem)]


class ParquetSource:
    name = "parquet"
    items_per_task = 1
    names_in_order = False  # a file name says nothing about when it arrived

    def parse_options(self, values: Mapping[str, Any]) -> ParquetOptions:
        return parse_options(ParquetOptions, values, self.name)

    def claims(self, listing: Listing) -> bool:
        uris = listing.table["uri"]  # beside tars, Parquet files are img2dataset's sidecars
        return bool(pc.any(pc.ends_with(uris, SUFFIX)).as_py()) and not pc.any(pc.ends_with(uris, ".tar")).as_py()

    def list_items(self, listing: Listing, options: Any) -> list[ParquetFile]:
        return [ParquetFile(e.uri, e.size, e.etag) for e in listing.entries if e.uri.endswith(SUFFIX)]

    def per_unit(self, config: Any) -> int:
        return config.shards_per_unit

    def plan_units(self, items: Sequence[ParquetFile], per_unit: int, committed: Committed) -> UnitPlan:
        return UnitPlan.of_units(plan_sticky_units(items, per_unit, committed.unit_of_item()))

    def read(self, task: Mapping[str, Any], storage_options: Mapping[str, Any],
             options: ParquetOptions) -> list[dict[str, Any]]:
        fs, path = filesystem(task["name"], storage_options)
        try:
            with fs.open(path, "rb") as handle:
                try:
                    parquet = pq.ParquetFile(handle)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    return _file_error(f"not a readable Parquet file: {exc}")
                problem = _column_problem(parquet.schema_arrow, options)
                if problem is not None:
                    return _file_error(problem)
                return self._rows(parquet, options)
        except OSError as exc:
            raise StorageError(f"reading {task['name']}: {type(exc).__name__}: {exc}") from exc

    def _rows(self, parquet: pq.ParquetFile, options: ParquetOptions) -> list[dict[str, Any]]:
        special = {options.image_column, options.key_column, options.caption_column, URL_COLUMN}
        extra = [f.name for f in parquet.schema_arrow
                 if f.name not in special and not (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))]
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        for group in range(parquet.num_row_groups):
            try:
                table = parquet.read_row_group(group)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                rows += _file_error(f"row group {group} unreadable: {exc}")
                continue
            images = _image_bytes(table[options.image_column]).to_pylist()
            keys = table[options.key_column].to_pylist() if options.key_column else [None] * len(images)
            captions = table[options.caption_column].to_pylist() if options.caption_column else [None] * len(images)
            urls = table[URL_COLUMN].to_pylist() if URL_COLUMN in table.column_names else [None] * len(images)
            metadata = table.select(extra).to_pylist() if extra else [None] * len(images)
            for i, data in enumerate(images):
                number = len(rows)
                rows.append(self._row(number, keys[i], data, captions[i], urls[i], metadata[i], options, seen))
        return rows

    @staticmethod
    def _row(number: int, key: Any, data: bytes | None, caption: Any, url: Any, metadata: dict | None,
             options: ParquetOptions, seen: set[str]) -> dict[str, Any]:
        notes = []
        if not options.key_column:
            key = f"{number:06d}"
        elif key is None or str(key) in seen:
            # A row is never dropped: its row number makes a missing or repeated key unique.
            notes.append(f"key {key!r} {'is null' if key is None else 'repeats'}; row number appended")
            key = f"{'' if key is None else key}#{number}"
        key = str(key)
        seen.add(key)
        status, error = S.Status.OK, None
        if data is None:
            status, error = S.Status.NO_IMAGE, f"column {options.image_column!r} is null in this row"
        if notes:
            warning = "; ".join(notes)
            error = f"{error}; {warning}" if error else f"warning: {warning}"
        return {
            S.KEY: key, S.MEMBER: options.image_column,
            S.OFFSET: number if data is not None else None, S.SIZE: len(data) if data is not None else None,
            S.IMAGE_FORMAT: image_format(data), S.IMAGE: data,
            S.IMAGE_SHA256: hashlib.sha256(data).hexdigest() if data is not None else None,
            S.URL: None if url is None else str(url), S.CAPTION: None if caption is None else str(caption),
            S.METADATA_JSON: json.dumps(metadata, ensure_ascii=False, default=str) if metadata else None,
            S.STATUS: status.value, S.ERROR: error,
        }

    def owns_row(self, shard: str, member: str | None) -> bool:
        return shard.endswith(SUFFIX) and member is not None

    def fetch(self, fs: Any, path: str, member: str | None, offset: int, size: int) -> bytes:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            start = 0
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if offset < start + rows:
                    column = _image_bytes(parquet.read_row_group(group, columns=[member])[member])
                    return column[offset - start].as_py()
                start += rows
        raise ValueError(f"{path} has {start} rows; no row {offset}")


SOURCE = ParquetSource()
