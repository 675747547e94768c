"""Find the input shards and group them into work units.

A shard is one img2dataset output pair in one folder: ``NNNNN.tar`` and its sidecar
``NNNNN.parquet``; either may be missing (a tar without sidecar, or a sidecar whose tar never
arrived). A work unit is a few shards of one folder, named deterministically so that a rerun
writes the same files instead of new ones.
"""

from __future__ import annotations

import functools
import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError
from pipeline.sources.base import Listing, UnitPlan, WorkUnit, folder_label, list_entries

__all__ = ["InputError", "Shard", "ShardTable", "WorkUnit", "list_shards", "plan_units", "shards_from"]

TAR_SUFFIX = ".tar"
SIDECAR_SUFFIX = ".parquet"
SHARD_COLUMNS = ("name", "tar", "sidecar", "size", "etag")  # a Shard's fields, in order


@dataclass(frozen=True)
class Shard:
    """One shard as listed: its tar and sidecar URIs and what identifies this version of it."""

    name: str  # URI of the tar, or of the sidecar when there is no tar
    tar: str | None
    sidecar: str | None
    size: int  # bytes of the tar (0 without one): a changed size means a changed shard
    etag: str | None  # the object store's ETag or the file's mtime: a changed tag means a changed shard

    # Computed once: planning LAION's 232,000 shards asks each for them several times.
    @functools.cached_property
    def folder(self) -> str:
        return posixpath.dirname(self.name)

    @functools.cached_property
    def stem(self) -> str:
        base = posixpath.basename(self.name)
        return base.rsplit(".", 1)[0]

    def version(self) -> dict[str, Any]:
        return {"name": self.name, "tar": self.tar, "sidecar": self.sidecar, "size": self.size, "etag": self.etag}

    def task(self) -> dict[str, Any]:
        return {"name": self.name, "tar": self.tar, "sidecar": self.sidecar}


class ShardTable(Sequence[Shard]):
    """The shards of a listing as one Arrow table (``name``, ``tar``, ``sidecar``, ``size``, ``etag``), sorted
    by name; a :class:`Shard` is made only for the shards asked for. LAION's input is 232,000 shards, and a
    nightly run scores a few of them."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    @classmethod
    def of(cls, shards: Iterable[Shard]) -> ShardTable:
        rows = [shard.version() for shard in shards]
        return cls(pa.table({name: pa.array([row[name] for row in rows], kind) for name, kind in
                             zip(SHARD_COLUMNS, (pa.string(), pa.string(), pa.string(), pa.int64(), pa.string()))}))

    def __len__(self) -> int:
        return self.table.num_rows

    @overload
    def __getitem__(self, index: int) -> Shard: ...

    @overload
    def __getitem__(self, index: slice) -> list[Shard]: ...

    def __getitem__(self, index: int | slice) -> Shard | list[Shard]:
        if isinstance(index, slice):
            return _shards(self.table.take(list(range(self.table.num_rows)[index])))
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return _shards(self.table.slice(index % len(self), 1))[0]

    def __iter__(self) -> Iterator[Shard]:
        return iter(_shards(self.table))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShardTable) and self.table.equals(other.table)

    __hash__ = None  # type: ignore[assignment]


def _shards(rows: pa.Table) -> list[Shard]:
    columns = rows.select(list(SHARD_COLUMNS)).to_pydict()
    return [Shard(*values) for values in zip(*(columns[name] for name in SHARD_COLUMNS))]



def _basename(uris: Any) -> Any:
    return pc.replace_substring_regex(uris, r"^.*/", "")


def _dirname(uris: Any) -> Any:
    """posixpath.dirname of URIs (each has a slash)."""
    return pc.replace_substring_regex(uris, r"/+[^/]*$", "")


def shards_from(listing: Listing) -> ShardTable:
    """The shards of a listing, sorted by name: tars paired with the sidecars beside them."""
    files = listing.table
    tars = files.filter(pc.ends_with(files["uri"], TAR_SUFFIX))
    sidecars = files.filter(pc.ends_with(files["uri"], SIDECAR_SUFFIX))["uri"]
    tar_bases = pc.utf8_slice_codeunits(tars["uri"], 0, -len(TAR_SUFFIX))
    sidecar_bases = pc.utf8_slice_codeunits(sidecars, 0, -len(SIDECAR_SUFFIX))
    sidecar_of_tar = pc.index_in(tar_bases, value_set=sidecar_bases.combine_chunks())
    with_tars = pa.table({"name": tars["uri"], "tar": tars["uri"], "sidecar": sidecars.take(sidecar_of_tar),
                          "size": tars["size"], "etag": tars["etag"]})
    # A sidecar without its tar is a shard whose downloads all failed, or whose tar is yet to come; a Parquet
    # file beside no tar whose name is not a number is no img2dataset sidecar (stats, other tables).
    paired = np.zeros(len(sidecars), dtype=bool)
    paired[sidecar_of_tar.drop_null().to_numpy()] = True
    alone = pa.array(~paired)
    lonely = sidecars.filter(alone).filter(pc.ascii_is_decimal(_basename(sidecar_bases.filter(alone))))
    if not len(lonely):
        return ShardTable(with_tars)  # in the listing's order: sorted by name
    without = pa.table({"name": lonely, "tar": pa.nulls(len(lonely), pa.string()), "sidecar": lonely,
                        "size": pa.repeat(pa.scalar(0, pa.int64()), len(lonely)),
                        "etag": pa.nulls(len(lonely), pa.string())})
    return ShardTable(pa.concat_tables([with_tars, without]).sort_by("name"))


def list_shards(inputs: Iterable[str], storage_options: Mapping[str, Any] | None = None) -> ShardTable:
    """Every shard named by the inputs (folders, globs or single files), sorted by name."""
    inputs = list(inputs)
    shards = shards_from(Listing.of(list_entries(inputs, storage_options)))
    if not len(shards):
        raise InputError(f"no .tar shards (or img2dataset .parquet sidecars) under {', '.join(inputs)}; "
                         f"give a folder, a glob or .tar files of img2dataset shards")
    return shards


_LONGEST_NUMBER = 18  # digits of a shard number that fit an int64 (img2dataset's have 5 or more)


def plan_units(shards: Iterable[Shard], shards_per_unit: int) -> UnitPlan:
    """Group shards into units that do not depend on which shards are already done.

    Numbered shards (img2dataset's 00000.tar) go by number // shards_per_unit, so a shard that
    arrives later joins the same unit on every run; other names (and numbers too long to be img2dataset's) go
    by sorted position among their folder's other names.
    """
    table = (shards if isinstance(shards, ShardTable) else ShardTable.of(shards)).table
    folder = _dirname(table["name"])
    stem = pc.replace_substring_regex(_basename(table["name"]), r"\.[^.]*$", "")
    numbered = pc.and_(pc.ascii_is_decimal(stem),
                       pc.less_equal(pc.utf8_length(pc.utf8_ltrim(stem, "0")), _LONGEST_NUMBER))
    group = np.zeros(table.num_rows, dtype=np.int64)
    if pc.any(numbered).as_py():
        group[numbered.to_numpy()] = pc.cast(stem.filter(numbered), pa.int64()).to_numpy() // shards_per_unit
    numbered = numbered.to_numpy()
    named = np.flatnonzero(~numbered)
    if len(named):
        order = pc.sort_indices(pa.table({"folder": folder.take(named), "name": table["name"].take(named)}),
                                sort_keys=[("folder", "ascending"), ("name", "ascending")]).to_numpy()
        folders = folder.take(named).take(order).to_numpy(zero_copy_only=False)
        starts = np.r_[True, folders[1:] != folders[:-1]]
        position = np.arange(len(order)) - np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
        group[named[order]] = position // shards_per_unit
    index = pc.utf8_lpad(pc.cast(pa.array(group), pa.string()), 6, "0")
    index = pc.if_else(pa.array(numbered), index, pc.binary_join_element_wise("n", index, ""))
    folders = pc.dictionary_encode(folder.combine_chunks())
    labels = pa.array([folder_label(f) for f in folders.dictionary.to_pylist()], pa.string()).take(folders.indices)
    unit = pc.binary_join_element_wise(labels, index, "-")
    return UnitPlan(table.append_column("unit", unit).select(["unit", *SHARD_COLUMNS]), _work_units)


def _work_units(rows: pa.Table) -> list[WorkUnit]:
    members: dict[str, list[Shard]] = {}
    for unit, shard in zip(rows["unit"].to_pylist(), _shards(rows)):
        members.setdefault(unit, []).append(shard)
    return [WorkUnit(unit, tuple(shards)) for unit, shards in members.items()]
