"""What every input format shares: the work item and unit, the listing, the planner, the byte-range read.

A format is one module in this package with a module-level ``SOURCE`` (see :class:`Source`). Everything
past the listing is format-free: units, planning, exactly-once commits, nightly and the cutoff table see
only work items (a name, a size, an ETag) and the rows their reads produce, in the columns of
``pipeline.stages.read.READ_SCHEMA``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError
from pipeline.io.storage import filesystem, full_uri, protocol_of

_GLOB_CHARS = set("*?[")


class StorageError(Exception):
    """Storage failed after the filesystem's own retries: the unit is not committed and a rerun retries it."""


class WorkItem(Protocol):
    """One thing a read task reads and a unit record lists. A changed size or ETag means a changed item."""

    name: str  # URI; every row read from the item carries it in the ``shard`` column
    size: int
    etag: str | None

    @property
    def folder(self) -> str: ...

    @property
    def stem(self) -> str: ...

    def version(self) -> dict[str, Any]: ...

    def task(self) -> dict[str, Any]:
        """What a read task needs to read the item: plain JSON values, ``name`` among them."""
        ...


@dataclass(frozen=True)
class WorkUnit:
    """A few work items scored and committed together: one Parquet file per score band, one unit record.

    ``shards`` holds the unit's work items, whatever the format (img2dataset shards, image files, ...)."""

    unit_id: str
    shards: tuple[Any, ...]

    def versions(self) -> list[dict[str, Any]]:
        return [s.version() for s in self.shards]

    def matches(self, committed_shards: Iterable[Mapping[str, Any]]) -> bool:
        """Whether a unit record's item list is exactly this unit's items, at these versions."""
        def identity(v: Mapping[str, Any]) -> tuple:
            return v["name"], v.get("size"), v.get("etag")
        return sorted(map(identity, self.versions())) == sorted(map(identity, committed_shards))


@dataclass(frozen=True)
class Entry:
    """One listed file: its URI, the filesystem's info, and the input folder it was found under."""

    uri: str
    info: Mapping[str, Any]
    root: str  # the folder the user named (a glob's fixed part, a file's folder): keys are relative to it

    @property
    def size(self) -> int:
        return int(self.info.get("size") or 0)

    @property
    def etag(self) -> str | None:
        for field in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
            value = self.info.get(field)
            if value is not None:
                return str(value).strip('"')
        return None

    @property
    def relative(self) -> str:
        return posixpath.relpath(self.uri, self.root) if self.root else posixpath.basename(self.uri)


LISTING_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("etag", pa.string()), ("root", pa.string())])


@dataclass(frozen=True)
class Listing:
    """Listed files as one Arrow table, sorted by URI, each URI once: ``uri``, ``size``, ``etag`` and ``root``
    (as :class:`Entry` has them). LAION's input is hundreds of thousands of files: formats that plan at that
    scale read the columns; the others take :attr:`entries`."""

    table: pa.Table

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> Listing:
        entries = sorted({e.uri: e for e in reversed(list(entries))}.values(), key=lambda e: e.uri)  # first wins
        return cls(pa.table({"uri": [e.uri for e in entries], "size": [e.size for e in entries],
                             "etag": [e.etag for e in entries], "root": [e.root for e in entries]},
                            schema=LISTING_SCHEMA))

    @classmethod
    def concat(cls, tables: Sequence[pa.Table]) -> Listing:
        """One listing of several; a URI listed twice keeps its first row (the first input pattern's root)."""
        if not tables:
            return cls(LISTING_SCHEMA.empty_table())
        table = pa.concat_tables([t.select(LISTING_SCHEMA.names).cast(LISTING_SCHEMA) for t in tables])
        if _increasing(table["uri"]):
            return cls(table)  # one folder's listing, as it comes: sorted and each URI once
        table = table.take(pc.sort_indices(table, sort_keys=[("uri", "ascending")]))  # stable: the first stays first
        uris = table["uri"]
        first = pc.not_equal(uris.slice(1), uris.slice(0, len(uris) - 1))
        return cls(table.filter(pa.concat_arrays([pa.array([True]), first.combine_chunks()])))

    def __len__(self) -> int:
        return self.table.num_rows

    @functools.cached_property
    def entries(self) -> list[Entry]:
        columns = self.table.to_pydict()
        return [Entry(uri, {"size": size, "etag": etag}, root)
                for uri, size, etag, root in zip(columns["uri"], columns["size"], columns["etag"], columns["root"])]


def _increasing(values: Any) -> bool:
    """Whether ``values`` are strictly increasing."""
    if len(values) < 2:
        return True
    return bool(pc.all(pc.less(values.slice(0, len(values) - 1), values.slice(1))).as_py())


def stem_of(uri: str) -> str:
    return posixpath.basename(uri).split(".", 1)[0]


def _glob_root(path: str) -> str:
    parts = []
    for part in path.split("/"):
        if any(c in part for c in _GLOB_CHARS):
            break
        parts.append(part)
    return "/".join(parts)


def list_entries(inputs: Iterable[str], storage_options: Mapping[str, Any] | None = None) -> list[Entry]:
    """Every file the inputs name (folders recursively, globs, single files), with the files that share a
    matched file's stem in its folder (a tar's sidecar, an image's caption), sorted by URI."""
    storage_options = storage_options or {}
    found: dict[str, Entry] = {}
    for pattern in inputs:
        fs, path = filesystem(pattern, storage_options)
        try:
            if any(c in path for c in _GLOB_CHARS):
                root = _glob_root(path)
                items = dict(fs.glob(path, detail=True))
                for folder in {posixpath.dirname(p) for p in items}:
                    stems = {stem_of(p) for p in items if posixpath.dirname(p) == folder}
                    items.update({p: i for p, i in fs.find(folder, maxdepth=1, detail=True).items()
                                  if stem_of(p) in stems})
            elif fs.isdir(path):
                root = path
                items = local_files(path) if protocol_of(fs) in ("file", "local") else fs.find(path, detail=True)
            elif fs.exists(path):
                root = posixpath.dirname(path)
                items = {p: i for p, i in fs.find(root, maxdepth=1, detail=True).items()
                         if p == path or stem_of(p) == stem_of(path)}
                items.setdefault(path, fs.info(path))
            else:
                raise InputError(f"input {pattern!r} does not exist; give a folder, a glob or files")
        except PermissionError as error:
            raise InputError(f"cannot list the input {pattern!r}: permission denied ({error})") from error
        root_uri = full_uri(fs, root)
        for p, info in items.items():
            if info.get("type", "file") != "directory":
                uri = full_uri(fs, p)
                found.setdefault(uri, Entry(uri, info, root_uri))
    return [found[uri] for uri in sorted(found)]


def local_file_info(path: str, lstat: os.stat_result | None = None) -> dict[str, Any]:
    """A local path's info as fsspec's ``find`` reports it (a link's own mtime and its target's size; a link to
    a folder is not a folder), from a stat or two: fsspec spends more building its info than on the stat.
    Full and incremental listings both use it, so a file's ETag (its mtime) does not depend on which listed it."""
    lstat = os.lstat(path) if lstat is None else lstat
    size = lstat.st_size
    if stat.S_ISLNK(lstat.st_mode):
        try:
            size = os.stat(path).st_size
        except OSError:
            size = 0  # a dangling link
    kind = "directory" if stat.S_ISDIR(lstat.st_mode) else "file" if stat.S_ISREG(lstat.st_mode) else "other"
    return {"name": path, "size": size, "type": kind, "mtime": lstat.st_mtime}


def local_files(folder: str) -> dict[str, dict[str, Any]]:
    """Every non-folder under the local ``folder`` with its :func:`local_file_info`, by path."""
    found: dict[str, dict[str, Any]] = {}
    folders = [folder.rstrip("/") or "/"]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                try:
                    info = local_file_info(entry.path, entry.stat(follow_symlinks=False))
                except FileNotFoundError:
                    continue  # removed since the folder was read
                if info["type"] == "directory":
                    folders.append(entry.path)
                else:
                    found[entry.path] = info
    return found


def folder_label(folder: str) -> str:
    """A unit id prefix for a folder: readable, and unique by its hash."""
    tag = hashlib.sha1(folder.encode()).hexdigest()[:8]
    label = "".join(c if c.isalnum() or c in "-_" else "_" for c in posixpath.basename(folder)) or "root"
    return f"{label}-{tag}"


@dataclass(frozen=True)
class UnitPlan:
    """Every work item of the input in its unit: one row per item, in name order, with at least ``unit``,
    ``name``, ``size`` and ``etag`` (what planning compares with the committed units, in Arrow); and how to make
    the :class:`WorkUnit` objects of the units that are to be scored, only those."""

    table: pa.Table
    make: Callable[[pa.Table], list[WorkUnit]]  # rows of ``table`` (whole units) -> their WorkUnits, by unit id

    @classmethod
    def of_units(cls, units: Sequence[WorkUnit]) -> UnitPlan:
        """The plan of units a format made in Python."""
        by_id = {unit.unit_id: unit for unit in units}
        rows = sorted((v["name"], unit.unit_id, v.get("size"), None if v.get("etag") is None else str(v["etag"]))
                      for unit in units for v in unit.versions())
        table = pa.table([pa.array([row[i] for row in rows], kind) for i, kind in
                          enumerate((pa.string(), pa.string(), pa.int64(), pa.string()))],
                         names=["name", "unit", "size", "etag"])
        return cls(table, lambda chosen: [by_id[u] for u in _distinct(chosen["unit"])])

    def unit_ids(self) -> list[str]:
        return _distinct(self.table["unit"])

    def work_units(self, unit_ids: Iterable[str] | None = None) -> list[WorkUnit]:
        """The WorkUnits of ``unit_ids`` (default: every unit), sorted by unit id."""
        rows = self.table if unit_ids is None else self.table.filter(
            pc.is_in(self.table["unit"], value_set=pa.array(list(unit_ids), pa.string())))
        return sorted(self.make(rows), key=lambda unit: unit.unit_id)


def _distinct(column: Any) -> list[str]:
    return sorted(pc.unique(column).to_pylist())


def plan_sticky_units(items: Sequence[WorkItem], per_unit: int, unit_of: Mapping[str, str]) -> list[WorkUnit]:
    """Units for items whose names say nothing about order (image files, arbitrary Parquet names).

    An item a committed unit lists (``unit_of``: item name -> unit id) stays in that unit for good, so a new
    item never shifts others into other units and only the units it touches are scored again. New items form
    new units, ``per_unit`` at a time in name order per folder, each named by its first item: a rerun that
    finds the same new items forms the same units, whatever an interrupted run committed before."""
    kept: dict[str, list[WorkItem]] = {}
    new: dict[str, list[WorkItem]] = {}
    for item in sorted(items, key=lambda i: i.name):
        if item.name in unit_of:
            kept.setdefault(unit_of[item.name], []).append(item)
        else:
            new.setdefault(item.folder, []).append(item)
    units = [WorkUnit(unit_id, tuple(members)) for unit_id, members in kept.items()]
    for folder, members in new.items():
        for start in range(0, len(members), per_unit):
            group = members[start:start + per_unit]
            first = hashlib.sha1(group[0].name.encode()).hexdigest()[:12]
            units.append(WorkUnit(f"{folder_label(folder)}-{first}", tuple(group)))
    return sorted(units, key=lambda u: u.unit_id)


@dataclass(frozen=True)
class NoOptions:
    """The options of a format that takes none."""


def parse_options(cls: type, values: Mapping[str, Any], format_name: str) -> Any:
    """``cls`` (a frozen dataclass of a format's options) from a mapping, e.g. ``--input-option k=v`` pairs:
    unknown keys refused, text turned into the int or bool a field's default has. Raises ConfigError."""
    from pipeline.config import ConfigError

    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"input format {format_name} has no option(s) {unknown}; it takes: {known}")
    typed = {}
    for name, value in values.items():
        default = fields[name].default
        try:
            if isinstance(value, str) and isinstance(default, bool):
                value = {"true": True, "false": False}[value.lower()]
            elif isinstance(value, str) and isinstance(default, int):
                value = int(value)
        except (KeyError, ValueError):
            raise ConfigError(f"input option {name}={value!r} must be {type(default).__name__}") from None
        typed[name] = value
    try:
        return cls(**typed)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"input format {format_name}: {error}") from error


def read_byte_range(fs: Any, path: str, offset: int, size: int) -> bytes:
    return fs.cat_file(path, start=offset, end=offset + size)


class Source(Protocol):
    """One input format. A module of this package that defines ``SOURCE`` adds the format."""

    name: str  # the --input-format value
    items_per_task: int  # work items one read task takes: a shard is plenty, an image file is not
    # New items' names sort after the old ones' (img2dataset numbers its shards), so the input may be listed
    # from where the last listing ended (pipeline.io.listing); False lists it in full on every run.
    names_in_order: bool

    def parse_options(self, values: Mapping[str, Any]) -> Any:
        """The format's typed options (see :func:`parse_options`); raises ConfigError."""
        ...

    def claims(self, listing: Listing) -> bool:
        """Whether the listing looks like this format (for --input-format auto; several claiming is an error)."""
        ...

    def list_items(self, listing: Listing, options: Any) -> Sequence[WorkItem]:
        """The work items of a listing, sorted by name; ``options`` are the format's own (parse_options)."""
        ...

    def per_unit(self, config: Any) -> int:
        """Work items per unit for a ScoreConfig (its ``source.options`` are this format's)."""
        ...

    def plan_units(self, items: Sequence[WorkItem], per_unit: int, committed: Any) -> UnitPlan:
        """Units of ``items`` (as :meth:`list_items` gave them), given the committed units
        (:class:`pipeline.io.units.Committed`); the same items plan the same units on every run."""
        ...

    def read(self, task: Mapping[str, Any], storage_options: Mapping[str, Any], options: Any) -> list[dict[str, Any]]:
        """Every row of one work item, in READ_SCHEMA's columns (``shard``/``unit`` are filled in by the caller).
        Content problems become row statuses; raises :class:`StorageError` when storage is at fault."""
        ...

    def owns_row(self, shard: str, member: str | None) -> bool:
        """Whether an output row with this ``shard`` and member came from this format (for reading it back)."""
        ...

    def fetch(self, fs: Any, path: str, member: str | None, offset: int, size: int) -> bytes:
        """A row's image bytes, from where its ``shard``, member, offset and size say they lie."""
        ...
