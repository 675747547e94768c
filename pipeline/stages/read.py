"""Read stage: work items in, their rows out. The item's format (pipeline.sources) reads it; for
img2dataset shards that is the code below: one shard in, its rows out, already joined with the sidecar.

The join happens here, where the whole shard is in view, rather than after scoring: the read
task is the only place that sees both every tar key and every sidecar key, so it alone can emit
exactly one row per key (failed downloads included) and know how many rows the shard has.
Metadata columns are small and ride along through decode and embed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Iterator, Mapping

import pyarrow as pa

from pipeline import schema as S
from pipeline.exclusions import Exclusions
from pipeline.io.sidecar import SUCCESS, Sidecar, SidecarRow, read_sidecar
from pipeline.io.storage import filesystem
from pipeline.io.tar_reader import UNSCORED_IMAGE_EXTENSIONS, Sample, TarContents, read_tar
from pipeline.sources.base import StorageError

log = logging.getLogger(__name__)

READ_SCHEMA = pa.schema([
    pa.field(S.KEY, pa.string()),
    pa.field(S.SHARD, pa.string()),
    pa.field(S.UNIT, pa.string()),
    pa.field(S.MEMBER, pa.string()),
    pa.field(S.OFFSET, pa.int64()),
    pa.field(S.SIZE, pa.int64()),
    pa.field(S.IMAGE_FORMAT, pa.string()),
    pa.field(S.IMAGE_SHA256, pa.string()),
    pa.field(S.IMAGE, pa.binary()),
    pa.field(S.URL, pa.string()),
    pa.field(S.CAPTION, pa.string()),
    pa.field(S.ORIGINAL_WIDTH, pa.int32()),
    pa.field(S.ORIGINAL_HEIGHT, pa.int32()),
    pa.field(S.DOWNLOAD_STATUS, pa.string()),
    pa.field(S.METADATA_JSON, pa.string()),
    pa.field(S.STATUS, pa.string()),
    pa.field(S.ERROR, pa.string()),
    pa.field(S.SHARD_ROWS, pa.int64()),
])

TAR_BLOCK_SIZE = 8 << 20  # sequential reads of a whole tar: large blocks, few requests


def _decode_text(data: bytes | None) -> str | None:
    return data.decode("utf-8", errors="replace") if data is not None else None


def _json_member(sample: Sample) -> tuple[dict[str, Any] | None, str | None]:
    if sample.json is None:
        return None, None
    try:
        value = json.loads(sample.json)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"json member is not valid JSON: {exc}"
    return (value if isinstance(value, dict) else {"value": value}), None


def _row_for_sample(sample: Sample, meta: SidecarRow | None) -> dict[str, Any]:
    notes = list(sample.notes)
    member_meta, json_error = _json_member(sample)
    if json_error:
        notes.append(json_error)
    caption = meta.caption if meta and meta.caption is not None else _decode_text(sample.text)
    if caption is None and member_meta:
        caption = member_meta.get("caption")
    url = meta.url if meta else (member_meta or {}).get("url")
    if meta is not None:
        metadata_json = meta.extra_json
    elif member_meta:
        metadata_json = json.dumps(member_meta, ensure_ascii=False, default=str)
    else:
        metadata_json = None

    if sample.error is not None:  # the tar ends inside this sample's image member
        status, error = S.Status.SHARD_ERROR, sample.error
    elif sample.image_member is not None:
        status, error = S.Status.OK, None
    elif meta is not None and meta.status not in (None, SUCCESS):
        status, error = S.Status.DOWNLOAD_FAILED, meta.error_message or meta.status
    else:
        unscored = [m for m in sample.other_members if m.rsplit(".", 1)[-1].lower() in UNSCORED_IMAGE_EXTENSIONS]
        if unscored:
            status, error = S.Status.UNSUPPORTED_FORMAT, f"image member {unscored[0]!r} has an unsupported format"
        else:
            status, error = S.Status.NO_IMAGE, "sample has no jpg, jpeg, png or webp member"
    if notes:
        warning = "; ".join(notes)
        error = f"{error}; {warning}" if error else f"warning: {warning}"
    return {
        S.KEY: sample.key,
        S.MEMBER: sample.image_member,
        S.OFFSET: sample.image_offset if sample.image_member else None,
        S.SIZE: sample.image_size if sample.image_member else None,
        S.IMAGE_FORMAT: sample.image_format,
        S.IMAGE_SHA256: hashlib.sha256(sample.image).hexdigest() if sample.image is not None else None,
        S.IMAGE: sample.image,
        S.URL: url,
        S.CAPTION: caption,
        S.ORIGINAL_WIDTH: meta.original_width if meta else None,
        S.ORIGINAL_HEIGHT: meta.original_height if meta else None,
        S.DOWNLOAD_STATUS: meta.status if meta else None,
        S.METADATA_JSON: metadata_json,
        S.STATUS: status.value,
        S.ERROR: error,
    }


def _row_for_sidecar_only(meta: SidecarRow, tar_problem: str | None) -> dict[str, Any]:
    if meta.status not in (None, SUCCESS):
        status, error = S.Status.DOWNLOAD_FAILED, meta.error_message or meta.status
    elif tar_problem is not None:
        status, error = S.Status.SHARD_ERROR, tar_problem
    else:
        status, error = S.Status.NO_IMAGE, "the sidecar lists it as downloaded but the tar has no such sample"
    return {
        S.KEY: meta.key, S.URL: meta.url, S.CAPTION: meta.caption,
        S.ORIGINAL_WIDTH: meta.original_width, S.ORIGINAL_HEIGHT: meta.original_height,
        S.DOWNLOAD_STATUS: meta.status, S.METADATA_JSON: meta.extra_json,
        S.STATUS: status.value, S.ERROR: error,
    }


def shard_error_row(status: S.Status, error: str) -> dict[str, Any]:
    return {S.KEY: S.SHARD_ROW_KEY, S.STATUS: status.value, S.ERROR: error}


def join_shard(tar: TarContents | None, tar_problem: str | None, sidecar: Sidecar | None,
               sidecar_problem: str | None) -> list[dict[str, Any]]:
    """Exactly one row per key seen in the tar or the sidecar, and one row at least per shard."""
    meta_rows = sidecar.rows if sidecar else {}
    rows = [_row_for_sample(sample, meta_rows.get(key)) for key, sample in (tar.samples.items() if tar else ())]
    seen = tar.samples if tar else {}
    if tar is not None and tar.error:
        tar_problem = tar.error
    rows += [_row_for_sidecar_only(meta, tar_problem) for key, meta in meta_rows.items() if key not in seen]
    if tar_problem and not any(r[S.STATUS] == S.Status.SHARD_ERROR.value for r in rows):
        # Nothing else carries the shard's own failure: one row names it.
        rows.append(shard_error_row(S.Status.SHARD_ERROR, tar_problem))
    if not rows:
        rows.append(shard_error_row(S.Status.SHARD_ERROR, "shard has no samples"))
    if sidecar_problem:
        for row in rows:
            row[S.ERROR] = f"{row[S.ERROR]}; {sidecar_problem}" if row.get(S.ERROR) else f"warning: {sidecar_problem}"
    return rows


def exclude(rows: list[dict[str, Any]], exclusions: Exclusions) -> int:
    """Mark the rows whose image bytes or URL the list names: status ``excluded``, no image to decode.
    How many were marked."""
    marked = 0
    for row in rows:
        matched = exclusions.match(row.get(S.IMAGE), row.get(S.URL), row.get(S.IMAGE_SHA256))
        if matched:
            was = row.get(S.STATUS)
            row[S.STATUS], row[S.IMAGE] = S.Status.EXCLUDED.value, None
            row[S.ERROR] = f"on the exclusion list ({matched}; was {was})"
            marked += 1
    return marked


def read_shard_rows(tar_uri: str | None, sidecar_uri: str | None,
                    storage_options: Mapping[str, Any] | None = None,
                    exclusions: Exclusions | None = None) -> list[dict[str, Any]]:
    """Read and join one shard (and mark the rows the exclusion list names). Raises StorageError when
    storage, not content, is at fault."""
    tar = None
    tar_problem = None if tar_uri else "no tar for this sidecar"
    if tar_uri:
        fs, path = filesystem(tar_uri, storage_options)
        try:
            with fs.open(path, "rb", block_size=TAR_BLOCK_SIZE) as handle:
                tar = read_tar(handle)
        except Exception as exc:  # read_tar keeps content errors to itself: what escapes is storage
            raise StorageError(f"reading {tar_uri}: {type(exc).__name__}: {exc}") from exc
    sidecar, sidecar_problem = None, None
    if sidecar_uri:
        fs, path = filesystem(sidecar_uri, storage_options)
        try:
            with fs.open(path, "rb") as handle:
                sidecar = read_sidecar(handle)
        except OSError as exc:
            raise StorageError(f"reading {sidecar_uri}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # a corrupt sidecar costs the captions, not the images
            sidecar_problem = f"sidecar unreadable ({type(exc).__name__}: {exc}); metadata taken from tar members"
        if sidecar is not None and sidecar.duplicate_keys:
            sidecar_problem = f"sidecar repeats {sidecar.duplicate_keys} keys; first row of each kept"
    rows = join_shard(tar, tar_problem, sidecar, sidecar_problem)
    if exclusions is not None:
        exclude(rows, exclusions)
    return rows


def to_table(rows: list[dict[str, Any]], shard: str, unit: str) -> pa.Table:
    columns = {f.name: [row.get(f.name) for row in rows] for f in READ_SCHEMA}
    columns[S.SHARD] = [shard] * len(rows)
    columns[S.UNIT] = [unit] * len(rows)
    columns[S.SHARD_ROWS] = [len(rows)] * len(rows)
    return pa.table(columns, schema=READ_SCHEMA)


class ReadItems:
    """Ray Data UDF: a batch of read tasks (each a few work items of one unit) in, batches of rows out."""

    def __init__(self, source: str, options: Any = None, storage_options: Mapping[str, Any] | None = None,
                 rows_per_batch: int = 256, exclusions: Exclusions | None = None):
        from pipeline.sources import get_source

        self.source = get_source(source)
        self.options = options
        self.storage_options = dict(storage_options or {})
        self.rows_per_batch = rows_per_batch
        self.exclusions = exclusions

    def rows(self, item: Mapping[str, Any]) -> list[dict[str, Any]]:
        try:
            rows = self.source.read(item, self.storage_options, self.options)
        except StorageError as exc:
            log.warning("%s unreadable from storage: %s", item["name"], exc)
            return [shard_error_row(S.Status.STORAGE_ERROR, str(exc))]
        if self.exclusions is not None:
            exclude(rows, self.exclusions)
        return rows

    def __call__(self, tasks: Mapping[str, Any]) -> Iterator[pa.Table]:
        for i in range(len(tasks["unit"])):
            unit = str(tasks["unit"][i])
            tables = [to_table(self.rows(item), item["name"], unit) for item in json.loads(str(tasks["items"][i]))]
            table = pa.concat_tables(tables)
            for start in range(0, table.num_rows, self.rows_per_batch):
                yield table.slice(start, self.rows_per_batch)
