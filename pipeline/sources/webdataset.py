"""img2dataset's WebDataset shards: ``NNNNN.tar`` with its ``NNNNN.parquet`` sidecar (pipeline.io.shards).

A shard is one work item; a row's image is read back with one ranged read of its tar."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from pipeline.io.shards import SIDECAR_SUFFIX, TAR_SUFFIX, Shard, plan_units, shards_from
from pipeline.sources.base import Entry, NoOptions, WorkUnit, parse_options, read_byte_range, stem_of


class WebDatasetSource:
    name = "webdataset"
    items_per_task = 1
    names_in_order = True  # img2dataset numbers shards; a new download continues them or takes a new folder

    def parse_options(self, values: Mapping[str, Any]) -> NoOptions:
        return parse_options(NoOptions, values, self.name)

    def claims(self, entries: Sequence[Entry]) -> bool:
        # A folder of sidecars alone (every download failed, or the tars not yet there) is still img2dataset's.
        return any(e.uri.endswith(TAR_SUFFIX) or (e.uri.endswith(SIDECAR_SUFFIX) and stem_of(e.uri).isdigit())
                   for e in entries)

    def list_items(self, entries: Sequence[Entry], options: Any) -> list[Shard]:
        return shards_from(entries)

    def per_unit(self, config: Any) -> int:
        return config.shards_per_unit

    def plan_units(self, items: Sequence[Shard], per_unit: int,
                   records: Mapping[str, Mapping[str, Any]]) -> list[WorkUnit]:
        return plan_units(items, per_unit)  # img2dataset numbers shards: the number fixes the unit

    def read(self, task: Mapping[str, Any], storage_options: Mapping[str, Any], options: Any) -> list[dict[str, Any]]:
        from pipeline.stages.read import read_shard_rows

        return read_shard_rows(task.get("tar") or None, task.get("sidecar") or None, storage_options)

    def owns_row(self, shard: str, member: str | None) -> bool:
        return shard.endswith(TAR_SUFFIX)

    def fetch(self, fs: Any, path: str, member: str | None, offset: int, size: int) -> bytes:
        return read_byte_range(fs, path, offset, size)


SOURCE = WebDatasetSource()
