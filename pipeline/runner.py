"""Run a scoring job: check it, plan units against what is committed, execute, commit, summarise.

This is the driver's side of the job; the checks live in preflight.py, the planning rules in
planning.py, the Ray Data graph in graph.py.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pipeline import schema as S
from pipeline.config import ScoreConfig
from pipeline.cutoffs import CutoffTable, write_cutoffs
from pipeline.errors import OutputError
from pipeline.housekeeping import CompactionsDuringRun, Optimized
from pipeline.io import layout, runs
from pipeline.io import units as unit_table
from pipeline.io.commits import UnitCommitter
from pipeline.io.lease import Lease
from pipeline.io.shards import WorkUnit
from pipeline.io.storage import filesystem, join, write_json_atomic
from pipeline.io.writer import commit_unit
from pipeline.planning import model_key, plan_run, run_identity
from pipeline.preflight import PreparedRun, prepare_run
from pipeline.ray_session import ensure_ray
from pipeline.sources import describe

log = logging.getLogger(__name__)

COMMIT_THREADS = 2


@dataclass
class RunSummary:
    run_id: str
    output: str
    input: list[str]
    shards_per_unit: int
    model_key: str
    units_total: int
    units_done_before: int
    units_committed: list[str] = field(default_factory=list)
    units_failed: dict[str, str] = field(default_factory=dict)
    units_failing: dict[str, str] = field(default_factory=dict)  # failed and not committed since, over all runs
    units_stale: list[str] = field(default_factory=list)
    pending_reasons: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    scored: int = 0
    counts_by_status: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    tiny_random: bool = False
    cutoffs: list[CutoffTable] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # the input format and its options: status lists it again
    compacted: list[Optimized] = field(default_factory=list)  # compactions of the data table, as committed and at the end

    @property
    def ok(self) -> bool:
        return not self.units_failed

    def to_json(self) -> dict[str, Any]:
        payload = dataclasses.asdict(self)
        payload["cutoffs"] = [t.to_json() for t in self.cutoffs]
        payload["rows_per_s"] = round(self.rows / self.wall_s, 2) if self.wall_s else None
        return payload


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _remove_orphan_staging(config: ScoreConfig, run_id: str) -> None:
    """Staging left by dead runs; only called while this run holds the lease."""
    fs, root = filesystem(config.output, config.storage_options)
    staging = join(root, layout.STAGING)
    if fs.exists(staging):
        for folder in fs.ls(staging, detail=False):
            if not folder.rstrip("/").endswith(run_id):
                fs.rm(folder, recursive=True)


def execute(config: ScoreConfig, units: Sequence[WorkUnit], run_id: str, summary: RunSummary,
            identity: Mapping[str, Any], committer: UnitCommitter, embed_loader: Any = None,
            on_commit: Callable[[dict[str, Any]], None] | None = None, exclusions: Any = None,
            after_commit: Callable[[UnitCommitter], None] | None = None) -> None:
    """Stream the pipeline; commit each unit the moment all its shards' rows have been staged.
    ``after_commit`` is called in the commit thread after each commit (a compaction)."""
    from pipeline.graph import build_dataset  # imports the stages: keep `plan` and `status` light

    started = time.time()
    shard_names = {u.unit_id: {s.name for s in u.shards} for u in units}
    by_id = {u.unit_id: u for u in units}
    received: dict[str, Counter] = defaultdict(Counter)
    expected: dict[str, dict[str, int]] = defaultdict(dict)
    first_seen: dict[str, float] = {}
    commits: dict[str, Future] = {}

    ds = build_dataset(config, units, run_id, embed_loader=embed_loader, exclusions=exclusions)
    # A commit is a few object-store reads and writes: driver threads do it while the stream goes
    # on, with no Ray worker to start and no CPU taken from decode.
    with ThreadPoolExecutor(max_workers=COMMIT_THREADS, thread_name_prefix="commit") as threads:
        for stats in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for unit_id, shard, rows, shard_rows in zip(stats[S.UNIT], stats[S.SHARD], stats["rows"],
                                                        stats[S.SHARD_ROWS]):
                unit_id, shard = str(unit_id), str(shard)
                received[unit_id][shard] += int(rows)
                expected[unit_id][shard] = int(shard_rows)
                first_seen.setdefault(unit_id, time.time() - started)
                complete = all(received[unit_id][s] >= expected[unit_id].get(s, np.inf)
                               for s in shard_names[unit_id])
                if complete and unit_id not in commits:
                    timings = {"first_rows_s": round(first_seen[unit_id], 3),
                               "all_rows_s": round(time.time() - started, 3)}
                    commits[unit_id] = threads.submit(
                        _commit, after_commit, committer, run_id, unit_id, by_id[unit_id].versions(), identity, timings)

    for unit_id in shard_names:
        if unit_id not in commits:
            missing = {s: f"{received[unit_id][s]}/{expected[unit_id].get(s, '?')}" for s in shard_names[unit_id]}
            summary.units_failed[unit_id] = f"rows never all arrived: {missing}"
    for unit_id, future in commits.items():
        try:
            record = future.result()
        except Exception as exc:  # noqa: BLE001 - one unit's failure must not lose the others
            summary.units_failed[unit_id] = f"{type(exc).__name__}: {exc}"
            continue
        summary.units_committed.append(unit_id)
        summary.rows += record["rows"]
        summary.scored += record["score"]["scored"]
        for status, count in record["counts_by_status"].items():
            summary.counts_by_status[status] = summary.counts_by_status.get(status, 0) + count
        if on_commit:
            on_commit(record)


def _commit(after_commit: Callable[[UnitCommitter], None] | None, committer: UnitCommitter,
            *args: Any) -> dict[str, Any]:
    record = commit_unit(committer, *args)
    if after_commit:
        after_commit(committer)
    return record


def run_score(config: ScoreConfig, run_id: str | None = None, embed_loader: Any = None,
              lease_ttl_s: float = 300.0) -> RunSummary:
    """Score every pending unit under config.output; committed units are skipped.

    Everything is checked before the output is touched (:func:`pipeline.preflight.prepare_run`); a check
    that fails raises a :class:`pipeline.errors.UserError` and leaves no trace. ``embed_loader`` replaces
    the model loading (tests, benchmarks), so the CLIP weights named by the config are not checked then.
    """
    prepared = prepare_run(config, check_clip_weights=embed_loader is None)
    return run_prepared(prepared, run_id, embed_loader, lease_ttl_s)


def run_prepared(prepared: PreparedRun, run_id: str | None = None, embed_loader: Any = None,
                 lease_ttl_s: float = 300.0, on_start: Callable[[], None] | None = None) -> RunSummary:
    """:func:`run_score` once its checks have passed; ``on_start`` is called once the run holds the output."""
    run_id = run_id or new_run_id()
    started = time.time()
    config = prepared.config
    try:
        lease = Lease(config.output, run_id, ttl_s=lease_ttl_s, storage_options=config.storage_options).acquire()
    except (PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError) as error:
        raise OutputError(f"cannot write the output {config.output}: {error}") from error
    try:
        if on_start:
            on_start()
        committer = UnitCommitter(config.output, config.storage_options)  # first, it completes a stopped run's
        if prepared.listing is not None:
            prepared.listing.save()  # the next run lists from where this listing ended
        plan = plan_run(config, prepared.shards)
        identity = run_identity(config, plan.shards_per_unit, prepared.requested_precision)
        summary = RunSummary(run_id=run_id, output=config.output, input=list(config.input),
                             shards_per_unit=plan.shards_per_unit,
                             model_key=model_key(config), units_total=len(plan.unit_ids),
                             units_done_before=len(plan.done), units_stale=plan.stale,
                             pending_reasons=plan.reasons, tiny_random=config.model.is_tiny_random,
                             source=describe(config.source))
        for unit_id in plan.stale:
            log.warning("unit %s was scored with another model or head; pass --rescore to redo it", unit_id)
        _remove_orphan_staging(config, run_id)
        if plan.pending:
            ensure_ray()
            compactions = CompactionsDuringRun(config.output, config.storage_options, config.compact_at)
            execute(config, plan.pending, run_id, summary, identity, committer, embed_loader=embed_loader,
                    exclusions=prepared.exclusions, after_commit=compactions.after_commit)
            if summary.units_committed:
                if compactions.at_end() is None:  # it compacts the unit table too
                    unit_table.compact(config.output, config.storage_options)
            summary.compacted = compactions.done
        fs, root = filesystem(config.output, config.storage_options)
        own_staging = layout.staging_dir(root, run_id, "").rstrip("/")
        if fs.exists(own_staging):  # what is left belongs to failed units: the next run redoes them
            fs.rm(own_staging, recursive=True)
        summary.cutoffs = write_cutoffs(config.output, config.storage_options)
        before = runs.failing(runs.latest(config.output, config.storage_options), config.output,
                              config.storage_options)
        summary.units_failing = runs.carried_forward(before, run_id, summary.units_committed, summary.units_failed)
        summary.wall_s = round(time.time() - started, 3)
        write_json_atomic(fs, layout.run_file(root, run_id), summary.to_json())
    finally:
        lease.release()
    return summary
