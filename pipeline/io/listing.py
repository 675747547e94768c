"""The input's listing, kept beside the output, so a nightly run lists only what arrived since the last one.

A full listing of a LAION-size input is hundreds of thousands of objects: minutes of paginated LIST calls
on every run, and growing with history. img2dataset names shards in order (``00000.tar``, ``00001.tar``,
...; a later download continues the numbers or goes into a new folder), so what arrived since the last
listing sorts after the greatest key listed then. As Auto Loader's incremental listing does, each input
folder's last listing is kept (``<output>/_listing/<digest>.parquet``: every file's URI, size and ETag),
and the next listing asks the store only for the keys after it (S3's ``StartAfter``; on a local disk, a
walk that stats only the new names). It starts :data:`OVERLAP` keys before the greatest, so a shard's
late sidecar or a rewritten recent shard is seen too.

A file that appears *before* that point, or an older file rewritten or deleted, is seen by the next full
listing. One is made when there is no kept listing, when the last full one is older than
``ListingConfig.full_every_days``, and on ``--listing full``. A full listing that finds a new file where
the incremental one could not have seen it marks the folder as not in order, and from then on that folder
is always listed in full. Globs and single files are always listed in full: they are small.

Only a run that holds the output's lease writes the kept listing; ``status`` and ``--dry-run`` use it
and leave it as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ListingConfig
from pipeline.errors import InputError
from pipeline.io.storage import filesystem, full_uri, join, protocol_of, write_bytes_atomic
from pipeline.sources.base import _GLOB_CHARS, Entry, Listing, list_entries, local_file_info

FOLDER = "_listing"
OVERLAP = 1000  # kept keys listed again at the end of a kept listing: one page of an S3 listing


FILES = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("etag", pa.string())])  # a kept listing's columns


@dataclass
class FolderListing:
    """One input folder's files, as the last listing saw them."""

    pattern: str
    root: str  # the folder's URI, as list_entries names it
    files: pa.Table  # FILES, sorted by URI
    full_listed_at: float  # unix seconds of the last full listing
    ordered: bool  # every full listing so far found its new files where an incremental one looks
    format: str = ""  # the input format the run read it as (its names_in_order allows an incremental listing)
    how: str = "full"  # how this listing was made: "full", or "N kept, M listed after <name>"

    def listed(self) -> pa.Table:
        """The files as a :class:`Listing`'s table: each with this folder as its root."""
        return self.files.append_column("root", pa.repeat(pa.scalar(self.root, pa.string()), self.files.num_rows))

    def resume_point(self) -> str | None:
        """The URI an incremental listing starts after (None: from the start)."""
        uris = self.files["uri"]
        return uris[len(uris) - OVERLAP - 1].as_py() if len(uris) > OVERLAP else None


def _files(found: Sequence[tuple[str, int, str | None]]) -> pa.Table:
    return pa.table([pa.array([f[i] for f in found], kind) for i, kind in enumerate(FILES.types)], schema=FILES)


@dataclass
class InputListing:
    """Every input pattern's files, and what to keep of them for the next run."""

    output: str
    storage_options: Mapping[str, Any]
    listing: Listing  # every file, sorted by URI
    folders: list[FolderListing] = field(default_factory=list)
    format: str = ""  # the format the entries were resolved as, once known (kept with the listing)

    def describe(self) -> str:
        """One line: how each folder was listed."""
        parts = [f"{posixpath.basename(f.root.rstrip('/')) or f.root}: {f.how}" for f in self.folders]
        return "; ".join(parts) if parts else "listed in full"

    def save(self) -> None:
        """Keep each folder's listing in the output (call only while holding the output's lease); a format
        whose names say nothing of order is listed in full every time, so its listing is not kept."""
        from pipeline.sources import get_source, source_names

        if self.format not in source_names() or not get_source(self.format).names_in_order:
            return
        for folder in self.folders:
            _write(self.output, self.storage_options, dataclasses.replace(folder, format=self.format))


def list_input_entries(inputs: Sequence[str], storage_options: Mapping[str, Any] | None, output: str | None,
                       config: ListingConfig = ListingConfig(), now: float | None = None) -> InputListing:
    """The files of every input pattern, each folder listed incrementally where its kept listing allows."""
    storage_options = dict(storage_options or {})
    now = time.time() if now is None else now
    tables: list[pa.Table] = []
    folders: list[FolderListing] = []
    for pattern in inputs:
        fs, path = filesystem(pattern, storage_options)
        may_keep = output is not None and not any(c in path for c in _GLOB_CHARS)
        kept = _read(output, storage_options, pattern) if may_keep else None
        # A kept listing says the pattern was a folder; asking the store again costs a LIST on every run.
        if kept is None and not (may_keep and _is_folder(fs, path)):
            tables.append(Listing.of(list_entries([pattern], storage_options)).table)
        else:
            folder = _list_folder(fs, path, pattern, storage_options, kept, config, now)
            folders.append(folder)
            tables.append(folder.listed())
    return InputListing(output or "", storage_options, Listing.concat(tables), folders)


def _list_folder(fs: Any, path: str, pattern: str, storage_options: Mapping[str, Any], kept: FolderListing | None,
                 config: ListingConfig, now: float) -> FolderListing:
    from pipeline.sources import get_source, source_names
    incremental = (config.mode == "auto" and kept is not None and kept.ordered
                   and kept.format in source_names() and get_source(kept.format).names_in_order
                   and now - kept.full_listed_at < config.full_every_days * 86400)
    if not incremental:
        entries = list_entries([pattern], storage_options)
        root = entries[0].root if entries else full_uri(fs, path.rstrip("/"))
        ordered = True
        if kept is not None:
            start = kept.resume_point()
            known = set(kept.files["uri"].to_pylist())
            ordered = kept.ordered and (start is None or all(e.uri > start for e in entries if e.uri not in known))
        return FolderListing(pattern, root, _files([(e.uri, e.size, e.etag) for e in entries]), now, ordered,
                             kept.format if kept else "", "full")
    start = kept.resume_point()
    try:
        fresh = _list_after(fs, path, start)
    except PermissionError as error:
        raise InputError(f"cannot list the input {pattern!r}: permission denied ({error})") from error
    except FileNotFoundError:  # the folder is gone: the full listing says so in its own words
        return _list_folder(fs, path, pattern, storage_options, kept, ListingConfig(mode="full"), now)
    keep = kept.files.num_rows - OVERLAP if start is not None else 0  # the kept files up to and with ``start``
    files = pa.concat_tables([kept.files.slice(0, keep), _files(fresh)])
    return FolderListing(pattern, kept.root, files, kept.full_listed_at, True, kept.format,
                         f"{keep:,} kept, {len(fresh):,} listed after {posixpath.basename(start) if start else 'the start'}")


def _is_folder(fs: Any, path: str) -> bool:
    """Whether ``path`` holds files. On S3 one request for one key: s3fs's ``isdir`` lists the whole folder,
    which for LAION's input is hundreds of requests, as long as the full listing this module saves."""
    if protocol_of(fs) not in ("s3", "s3a"):
        return fs.isdir(path)
    bucket, _, key = path.strip("/").partition("/")
    try:
        page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
    except (FileNotFoundError, PermissionError):
        return False  # the full listing says what is wrong, in its own words
    return bool(page.get("KeyCount"))


def _list_after(fs: Any, path: str, start: str | None) -> list[tuple[str, int, str | None]]:
    """(URI, size, ETag) of every file under the folder ``path`` whose URI sorts after ``start``, sorted."""
    protocol = protocol_of(fs)
    if protocol in ("s3", "s3a"):
        return _s3_list_after(fs, path, start)
    if protocol in ("file", "local"):
        found: list[tuple[str, int, str | None]] = []
        _local_list_after(full_uri(fs, path).rstrip("/") or "/", start, found)
        return sorted(found)
    found = []  # any other store: a full listing, cut
    for name, info in fs.find(path, detail=True).items():
        uri = full_uri(fs, name)
        if info.get("type", "file") != "directory" and (start is None or uri > start):
            entry = Entry(uri, info, "")
            found.append((uri, entry.size, entry.etag))
    return sorted(found)


def _local_list_after(folder: str, start: str | None, found: list[tuple[str, int, str | None]]) -> None:
    """Append the files under the local ``folder`` whose URI (the absolute path) sorts after ``start``.

    A folder has no StartAfter: its names are read, but only those that can sort after ``start`` are stat'ed
    or descended into. A name sorting before ``start``'s next component holds nothing new unless that
    component begins with it ("a" before "a.tar": a folder "a" sorts after it, its files with it). Files are
    described as the full listing describes them (:func:`local_file_info`)."""
    prefix = f"{folder.rstrip('/')}/"
    if start is not None and not start.startswith(prefix):
        if prefix < start:
            return  # everything under the folder sorts before start
        start = None  # everything under it sorts after
    rest = start[len(prefix):] if start is not None else ""
    names = os.listdir(folder)
    for name in [n for n in names if n > rest or rest.startswith(n)] if rest else names:
        uri = prefix + name
        try:
            info = local_file_info(uri)
        except FileNotFoundError:
            continue  # removed since the folder was read
        if info["type"] == "directory":
            _local_list_after(uri, start, found)
        elif start is None or uri > start:
            entry = Entry(uri, info, "")
            found.append((uri, entry.size, entry.etag))


def _s3_list_after(fs: Any, path: str, start: str | None) -> list[tuple[str, int, str | None]]:
    """S3's ListObjectsV2 from ``StartAfter``, paginated: one request per 1,000 new keys."""
    bucket, _, key = path.strip("/").partition("/")
    prefix = f"{key}/" if key else ""
    protocol = protocol_of(fs)
    request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if start is not None:
        request["StartAfter"] = start.split("://", 1)[1].partition("/")[2]
    found = []
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        for item in page.get("Contents", []):
            if item["Key"].endswith("/"):  # a folder marker, which s3fs's find leaves out too
                continue
            uri = f"{protocol}://{bucket}/{item['Key']}"
            entry = Entry(uri, {"size": item["Size"], "ETag": item.get("ETag")}, "")
            found.append((uri, entry.size, entry.etag))
        if not page.get("IsTruncated"):
            return found
        request["ContinuationToken"] = page["NextContinuationToken"]


# -- the kept listing ------------------------------------------------------------------------------


def _path(output: str, pattern: str) -> str:
    return join(output, FOLDER, hashlib.sha1(pattern.rstrip("/").encode()).hexdigest()[:16] + ".parquet")


def _read(output: str, storage_options: Mapping[str, Any], pattern: str) -> FolderListing | None:
    fs, root = filesystem(output, storage_options)
    path = _path(root, pattern)
    try:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(io.BytesIO(handle.read()))
    except FileNotFoundError:
        return None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("pattern") != pattern.rstrip("/"):
        return None  # a digest collision, or a file from elsewhere: list in full
    return FolderListing(pattern, meta["root"], table.select(FILES.names).cast(FILES).combine_chunks(),
                         float(meta["full_listed_at"]), meta["ordered"] == "true", meta.get("format", ""), "kept")


def _write(output: str, storage_options: Mapping[str, Any], folder: FolderListing) -> None:
    table = folder.files.replace_schema_metadata({"pattern": folder.pattern.rstrip("/"), "root": folder.root,
                                                  "full_listed_at": repr(folder.full_listed_at),
                                                  "ordered": "true" if folder.ordered else "false",
                                                  "format": folder.format})
    sink = io.BytesIO()
    # Sorted URIs share long prefixes, which delta encoding stores once; dictionaries only slow the read of
    # hundreds of thousands of distinct names and ETags.
    pq.write_table(table, sink, compression="zstd", use_dictionary=False,
                   column_encoding={"uri": "DELTA_BYTE_ARRAY", "etag": "PLAIN", "size": "PLAIN"})
    fs, root = filesystem(output, storage_options)
    write_bytes_atomic(fs, _path(root, folder.pattern), sink.getvalue())
