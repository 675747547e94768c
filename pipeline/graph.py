"""The one place that wires Ray Data and sets resources.

    work items (pipeline.sources) -> read (CPU tasks) -> decode (CPU tasks) -> embed+score (actor pool, GPU
    when the cluster has one) -> stage to Parquet (CPU tasks) -> tiny stats rows to the driver

Read, decode and staging are stateless tasks so they spread over CPU nodes and scale with them;
only the model holder is an actor, loaded once per actor.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Sequence

import ray

from pipeline.config import ScoreConfig
from pipeline.exclusions import Exclusions
from pipeline.models.clip import image_geometry
from pipeline.models.prompts import load_prompt_sets
from pipeline.sources import WorkUnit, get_source
from pipeline.stages.embed import EmbedScore
from pipeline.stages.tasks import decode_images, read_items, stage_rows

STAGING_CPUS = 0.5  # staging writes are I/O; they should not hold a whole core from decode


def gpus_per_actor(config: ScoreConfig) -> float:
    """An explicit request wins; then the device the run decided on; with 'auto', one GPU per actor when the
    cluster has any."""
    if config.resources.gpus_per_actor is not None:
        return config.resources.gpus_per_actor
    if config.model.device != "auto":
        return 1.0 if config.model.device == "cuda" else 0.0
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def node_cpu_share(actors: int) -> int:
    """This node's Ray CPUs divided among ``actors``, at least one. Runs inside the actor, on its node."""
    node_id = ray.get_runtime_context().get_node_id()
    cpus = next(node["Resources"].get("CPU", 1.0) for node in ray.nodes() if node["NodeID"] == node_id)
    return max(1, int(cpus // actors))


def cpu_actor_threads(config: ScoreConfig) -> int | Callable[[], int]:
    """torch threads for an embed actor on CPU: explicit, else its node's share (see ResourcesConfig)."""
    resources = config.resources
    if resources.cpu_threads_per_actor is not None:
        return resources.cpu_threads_per_actor
    return functools.partial(node_cpu_share, resources.max_actors)


def embed_pool(config: ScoreConfig, shards: int, gpus: float) -> ray.data.ActorPoolStrategy:
    """The embed actors. On GPUs the pool starts at its full size: growing from one actor, Ray Data adds
    actors only as their queues back up, each loading its model, while the GPUs already paid for sit idle.
    A run with fewer shards than actors (a nightly run on a small backlog) starts with one per shard. On CPU
    the actors share cores with decode, so the pool starts at its minimum and Ray Data grows it.
    See ResourcesConfig.concurrent_batches_per_actor for the batches each actor works on at once."""
    resources = config.resources
    initial = resources.min_actors
    if gpus:
        initial = max(resources.min_actors, min(resources.max_actors, shards))
    concurrent = resources.concurrent_batches_per_actor or (2 if gpus else 1)
    return ray.data.ActorPoolStrategy(min_size=resources.min_actors, max_size=resources.max_actors,
                                      initial_size=initial, max_concurrent_calls_per_actor=concurrent,
                                      enable_true_multi_threading=concurrent > 1)


def build_dataset(config: ScoreConfig, units: Sequence[WorkUnit], run_id: str,
                  embed_loader: Any = None, exclusions: Exclusions | None = None) -> ray.data.Dataset:
    """The whole pipeline as one lazy Dataset of per-(unit, shard) stats rows."""
    resources = config.resources
    storage: dict[str, Any] = dict(config.storage_options)
    source = get_source(config.source.format)
    step = source.items_per_task
    # JSON, so a read task's items reach it as one string whatever their fields are.
    tasks = [{"unit": u.unit_id, "items": json.dumps([item.task() for item in u.shards[i:i + step]])}
             for u in units for i in range(0, len(u.shards), step)]
    image_size, interpolation = image_geometry(config.model)
    gpus = gpus_per_actor(config)
    # A CPU actor runs more threads than its num_cpus: they must yield a shared core, not spin on it.
    # libgomp reads OMP_WAIT_POLICY once, when torch loads, so it is set for the actor's process.
    actor_env = {} if gpus else {"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}}

    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))  # one read task per few items
    ds.context.op_resource_reservation_enabled = resources.reserve_per_operator  # derived datasets copy it
    ds = ds.map_batches(
        read_items, fn_kwargs={"source": source.name, "options": config.source.options, "storage_options": storage,
                               "rows_per_batch": config.decode.batch_size, "exclusions": exclusions},
        batch_size=1, batch_format="numpy", num_cpus=1, concurrency=resources.read_concurrency,
    )
    ds = ds.map_batches(
        decode_images,
        fn_kwargs={"decode_config": config.decode, "image_size": image_size, "interpolation": interpolation},
        # The read already yields blocks of decode.batch_size rows. A batch size here would also be
        # the fused read+decode task's input size, i.e. that many *read tasks* in one task.
        batch_size=None, batch_format="numpy", num_cpus=resources.decode_cpus,
        concurrency=resources.decode_task_limit,
    )
    ds = ds.map_batches(
        EmbedScore,
        fn_constructor_kwargs={
            "model": config.model, "heads": config.heads, "write_embeddings": config.write_embeddings,
            "search_dirs": config.weights_dirs, "storage_options": storage, "loader": embed_loader,
            # Parsed here, so a bad prompt file fails before Ray starts and nodes need no copy of it.
            "prompts": load_prompt_sets(config.prompts, storage) if config.prompts else None,
            "torch_threads": None if gpus else cpu_actor_threads(config),
            "caption_similarity": config.caption_similarity,
        },
        batch_size=resources.embed_batch_size, batch_format="numpy",
        compute=embed_pool(config, len(tasks), gpus),
        num_gpus=gpus, num_cpus=resources.cpus_per_actor, **actor_env,
        # The model's host memory, so Ray places actors where they fit. Being a request decode does
        # not make, it also keeps Ray from fusing decode into the model holder when no GPU is asked
        # for: decode must scale on CPU tasks, not run inside the embed actor. (Ray restarts a dead
        # actor and retries its batch by default; the commit drops any row staged twice.)
        memory=int(resources.memory_per_actor_gb * 2**30),
    )
    return ds.map_batches(
        stage_rows, fn_kwargs={"output": config.output, "run_id": run_id, "storage_options": storage},
        batch_size=None, batch_format="numpy", num_cpus=STAGING_CPUS,
    )
