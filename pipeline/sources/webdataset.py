"""img2dataset's WebDataset shards: ``NNNNN.tar`` with its ``NNNNN.parquet`` sidecar (pipeline.io.shards).

A shard is one work item; a row's image is read back with one ranged read of its tar."""

from __future__ import annotations

from typing import Any, Mapping

import pyarrow.compute as pc

from pipeline.io.shards import SIDECAR_SUFFIX, TAR_SUFFIX, ShardTable, plan_units, shards_from
from pipeline.sources.base import Listing, NoOptions, UnitPlan, parse_options, read_byte_range


class WebDatasetSource:
    name = "webdataset"
    items_per_task = 1
    names_in_order = True  # img2dataset numbers shards; a new download continues them or takes a new folder

    def parse_options(self, values: Mapping[str, Any]) -> NoOptions:
        return parse_options(NoOptions, values, self.name)

    def claims(self, listing: Listing) -> bool:
        # A folder of sidecars alone (every download failed, or the tars not yet there) is still img2dataset's.
        uris = listing.table["uri"]
        if pc.any(pc.ends_with(uris, TAR_SUFFIX)).as_py():
            return True
        names = pc.replace_substring_regex(uris.filter(pc.ends_with(uris, SIDECAR_SUFFIX)), r"^.*/", "")
        return bool(pc.any(pc.ascii_is_decimal(pc.replace_substring_regex(names, r"\..*$", ""))).as_py())

    def list_items(self, listing: Listing, options: Any) -> ShardTable:
        return shards_from(listing)

    def per_unit(self, config: Any) -> int:
        return config.shards_per_unit

    def plan_units(self, items: ShardTable, per_unit: int, committed: Any) -> UnitPlan:
        return plan_units(items, per_unit)  # img2dataset numbers shards: the number fixes the unit

    def read(self, task: Mapping[str, Any], storage_options: Mapping[str, Any], options: Any) -> list[dict[str, Any]]:
        from pipeline.stages.read import read_shard_rows

        return read_shard_rows(task.get("tar") or None, task.get("sidecar") or None, storage_options)

    def owns_row(self, shard: str, member: str | None) -> bool:
        return shard.endswith(TAR_SUFFIX)

    def fetch(self, fs: Any, path: str, member: str | None, offset: int, size: int) -> bytes:
        return read_byte_range(fs, path, offset, size)


SOURCE = WebDatasetSource()
