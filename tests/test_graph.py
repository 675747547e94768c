"""pipeline.graph: the Ray Data settings a job's dataset carries, without touching the process's own,
and the resources and threads its embed actors get."""

from __future__ import annotations

import pytest

from pipeline.config import ResourcesConfig, ScoreConfig
from pipeline.graph import build_dataset
from pipeline.io.shards import Shard, WorkUnit

SHARD = Shard(name="/data/00000.tar", tar="/data/00000.tar", sidecar="/data/00000.parquet", size=1, etag="1")


def embed_stage(resources: ResourcesConfig, shards: int = 1):
    """The EmbedScore operator of a job's (lazy) dataset over ``shards`` shards."""
    config = ScoreConfig(input=("/data",), output="/out", resources=resources)
    units = [WorkUnit(f"u{i}", (Shard(name=f"/data/{i:05d}.tar", tar=f"/data/{i:05d}.tar", sidecar=None, size=1,
                                      etag="1"),)) for i in range(shards)]
    op = build_dataset(config, units, run_id="r")._logical_plan.dag
    while "EmbedScore" not in op.name:
        (op,) = op.input_dependencies
    return op


@pytest.mark.parametrize("reserve", [True, False])
def test_per_operator_reservation_is_set_on_the_jobs_dataset_only(ray_local, reserve):
    import ray

    config = ScoreConfig(input=("/data",), output="/out", resources=ResourcesConfig(reserve_per_operator=reserve))
    before = ray.data.DataContext.get_current().op_resource_reservation_enabled

    ds = build_dataset(config, [WorkUnit("u0", (SHARD,))], run_id="r")  # lazy: nothing runs

    assert ds.context.op_resource_reservation_enabled is reserve
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled is before


@pytest.mark.parametrize("max_actors, threads", [(1, 2), (2, 1), (5, 1)])
def test_a_cpu_actor_runs_its_nodes_share_of_cpus_as_threads_that_wait_passively(ray_local, max_actors, threads):
    import ray

    stage = embed_stage(ResourcesConfig(min_actors=1, max_actors=max_actors))
    torch_threads = stage.fn_constructor_kwargs["torch_threads"]

    @ray.remote
    def in_a_worker_started_like_the_actor():
        import os
        return os.environ.get("OMP_WAIT_POLICY"), torch_threads()

    runtime_env = stage.ray_remote_args["runtime_env"]
    # ray_local has 2 CPUs on its one node.
    assert ray.get(in_a_worker_started_like_the_actor.options(runtime_env=runtime_env).remote()) == ("PASSIVE", threads)


def test_explicit_cpu_threads_win(ray_local):
    stage = embed_stage(ResourcesConfig(cpu_threads_per_actor=3))
    assert stage.fn_constructor_kwargs["torch_threads"] == 3
    assert stage.ray_remote_args["runtime_env"] == {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}


def test_a_gpu_actor_keeps_rays_threads_and_openmp_settings(ray_local):
    stage = embed_stage(ResourcesConfig(gpus_per_actor=1, cpu_threads_per_actor=3))
    assert stage.fn_constructor_kwargs["torch_threads"] is None
    assert "runtime_env" not in stage.ray_remote_args and stage.ray_remote_args["num_gpus"] == 1


@pytest.mark.parametrize("gpus, shards, initial", [(1, 100, 8), (1, 3, 3), (0, 100, 2)])
def test_a_gpu_pool_starts_full_unless_the_backlog_is_smaller_and_a_cpu_pool_starts_at_its_minimum(
        ray_local, gpus, shards, initial):
    stage = embed_stage(ResourcesConfig(gpus_per_actor=gpus, min_actors=2, max_actors=8), shards)
    pool = stage.compute
    assert (pool.min_size, pool.max_size, pool.initial_size) == (2, 8, initial)


@pytest.mark.parametrize("gpus, asked, concurrent", [(1, None, 2), (0, None, 1), (1, 3, 3), (0, 2, 2)])
def test_a_gpu_actor_works_on_two_batches_at_once_unless_told_otherwise(ray_local, gpus, asked, concurrent):
    stage = embed_stage(ResourcesConfig(gpus_per_actor=gpus, concurrent_batches_per_actor=asked))
    pool = stage.compute
    assert pool.max_concurrent_calls_per_actor == concurrent
    assert pool.enable_true_multi_threading is (concurrent > 1)
