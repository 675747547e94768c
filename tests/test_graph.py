"""pipeline.graph: the Ray Data settings a job's dataset carries, without touching the process's own."""

from __future__ import annotations

import pytest

from pipeline.config import ResourcesConfig, ScoreConfig
from pipeline.graph import build_dataset
from pipeline.io.shards import Shard, WorkUnit


@pytest.mark.parametrize("reserve", [True, False])
def test_per_operator_reservation_is_set_on_the_jobs_dataset_only(ray_local, reserve):
    import ray

    shard = Shard(name="/data/00000.tar", tar="/data/00000.tar", sidecar="/data/00000.parquet", size=1, etag="1")
    config = ScoreConfig(input=("/data",), output="/out", resources=ResourcesConfig(reserve_per_operator=reserve))
    before = ray.data.DataContext.get_current().op_resource_reservation_enabled

    ds = build_dataset(config, [WorkUnit("u0", (shard,))], run_id="r")  # lazy: nothing runs

    assert ds.context.op_resource_reservation_enabled is reserve
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled is before
