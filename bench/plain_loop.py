"""The single-process reference: the scoring job's work with no Ray, for `make bench` to compare with.

Same stages, same code, same output as :func:`pipeline.runner.run_score`: every shard is read and joined
with its sidecar (:func:`pipeline.stages.read.read_shard_rows`), decoded (:class:`Decode`), embedded and
scored (:class:`EmbedScore`, same loader and model), staged (:class:`WriteStaging`) and committed one unit
at a time (:func:`commit_unit`: band files + one Delta commit), then the cutoff table is written. Batches are
``batch_size`` rows within a unit, as the job's decode and embed batches are.

What it leaves out is what Ray adds: no lease, no tasks, no actors, no object store. It is the "could a
for-loop do it?" baseline; the Ray job should come close to it on one machine and pull ahead on many.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from bench.batches import numpy_batch
from pipeline.config import ScoreConfig
from pipeline.cutoffs import write_cutoffs
from pipeline.io.commits import UnitCommitter
from pipeline.io.shards import list_shards, plan_units
from pipeline.io.writer import WriteStaging, commit_unit
from pipeline.models.clip import image_geometry
from pipeline.planning import run_identity
from pipeline.runner import new_run_id
from pipeline.stages.decode import Decode
from pipeline.stages.embed import EmbedScore
from pipeline.stages.read import read_shard_rows, to_table


@dataclass
class PlainSummary:
    run_id: str
    units: int = 0
    rows: int = 0
    scored: int = 0
    wall_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=lambda: {
        "load": 0.0, "read": 0.0, "decode": 0.0, "embed": 0.0, "stage": 0.0, "commit": 0.0})


def run_plain(config: ScoreConfig, embed_loader: Any = None, run_id: str | None = None) -> PlainSummary:
    """Score every shard under ``config.input`` into ``config.output`` in this process (a fresh output:
    nothing is planned against earlier commits)."""
    started = time.perf_counter()
    summary = PlainSummary(run_id=run_id or new_run_id())
    timing = summary.stage_s

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        timing[name] += time.perf_counter() - t0
        return result

    units = plan_units(list_shards(config.input, config.storage_options), config.shards_per_unit).work_units()
    image_size, interpolation = image_geometry(config.model)
    decode = Decode(config.decode, image_size=image_size, interpolation=interpolation)
    embed = timed("load", lambda: EmbedScore(
        config.model, config.heads, write_embeddings=config.write_embeddings, search_dirs=config.weights_dirs,
        storage_options=config.storage_options, loader=embed_loader, caption_similarity=config.caption_similarity))
    staging = WriteStaging(config.output, summary.run_id, config.storage_options)
    identity = run_identity(config, config.shards_per_unit)
    committer = UnitCommitter(config.output, config.storage_options)
    batch_size = config.resources.embed_batch_size

    for unit in units:
        unit_started = time.perf_counter()
        tables = []
        for shard in unit.shards:
            rows = timed("read", read_shard_rows, shard.tar, shard.sidecar, config.storage_options)
            tables.append(to_table(rows, shard.name, unit.unit_id))
        table = pa.concat_tables(tables)
        first_rows = None
        for start in range(0, table.num_rows, batch_size):
            batch = numpy_batch(table.slice(start, batch_size))
            batch = timed("decode", decode, batch)
            batch = timed("embed", embed, batch)
            timed("stage", staging, batch)
            first_rows = first_rows if first_rows is not None else time.perf_counter() - unit_started
        timings = {"first_rows_s": round(first_rows or 0.0, 3),
                   "all_rows_s": round(time.perf_counter() - unit_started, 3)}
        record = timed("commit", commit_unit, committer, summary.run_id, unit.unit_id, unit.versions(), identity,
                       timings)
        summary.units += 1
        summary.rows += record["rows"]
        summary.scored += record["score"]["scored"]
    timed("commit", write_cutoffs, config.output, config.storage_options)
    summary.wall_s = time.perf_counter() - started
    return summary
