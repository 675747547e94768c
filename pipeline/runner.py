"""Run a scoring job: plan units against what is committed, execute, commit, summarise.

This is the driver's side of the job; the Ray Data graph itself lives in graph.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import ray

from pipeline import schema as S
from pipeline.config import ScoreConfig
from pipeline.cutoffs import CutoffTable, write_cutoffs
from pipeline.io import layout
from pipeline.io.lease import Lease
from pipeline.io.manifests import read_manifests
from pipeline.io.shards import WorkUnit, list_shards, plan_units
from pipeline.io.storage import filesystem, join, write_json_atomic
from pipeline.io.writer import commit_unit

log = logging.getLogger(__name__)

COMMIT_THREADS = 2


class RunFailed(RuntimeError):
    """The run finished but some units did not commit or the books do not balance."""


def model_key(config: ScoreConfig) -> str:
    """What makes scores comparable: model, weights and heads. A change makes units stale."""
    model = config.model
    weights = f"seed={model.seed}" if model.is_tiny_random else model.pretrained
    pin = f"@{model.pretrained_sha256[:12]}" if model.pretrained_sha256 else ""
    heads = ",".join(f"{h.name}@{(h.weights.sha256 or 'unpinned')[:12]}" for h in config.heads)
    return f"{model.name}/{weights}{pin}|{heads}"


@dataclass
class Plan:
    units: list[WorkUnit]
    shards_per_unit: int
    pending: list[WorkUnit]
    done: list[str]
    stale: list[str]  # committed under another model or head; redone only with rescore
    reasons: dict[str, str]  # why each pending unit is pending


def committed_shards_per_unit(manifests: Mapping[str, Mapping[str, Any]]) -> int | None:
    """The unit size a prefix was first scored with: it fixes unit membership for good."""
    sizes = {m["shards_per_unit"] for m in manifests.values() if "shards_per_unit" in m}
    if len(sizes) > 1:
        raise RuntimeError(f"manifests disagree on shards_per_unit ({sorted(sizes)}): the prefix is inconsistent")
    return sizes.pop() if sizes else None


STALE = "scored with another model or head"


def pending_reason(unit: WorkUnit, manifest: Mapping[str, Any] | None, key: str | None) -> str | None:
    """Why ``unit`` needs scoring (None: its manifest is current). A reason starting with STALE needs
    --rescore; ``key=None`` accepts any model."""
    if manifest is None:
        return "new"
    if not unit.matches(manifest["shards"]):
        return "shards added or changed"
    if key is not None and manifest.get("model_key") != key:
        return f"{STALE}: {manifest.get('model_key')}"
    return None


def plan_run(config: ScoreConfig, manifests: Mapping[str, Mapping[str, Any]] | None = None) -> Plan:
    if manifests is None:
        manifests = read_manifests(config.output, config.storage_options)
    shards_per_unit = committed_shards_per_unit(manifests) or config.shards_per_unit
    if shards_per_unit != config.shards_per_unit:
        # Regrouping would give committed shards new unit ids, and their rows would exist twice.
        log.warning("output %s was scored with %d shards per unit; keeping that (not %d)",
                    config.output, shards_per_unit, config.shards_per_unit)
    units = plan_units(list_shards(config.input, config.storage_options), shards_per_unit)
    key = model_key(config)
    plan = Plan(units, shards_per_unit, [], [], [], {})
    for unit in units:
        why = pending_reason(unit, manifests.get(unit.unit_id), key)
        if why is None:
            plan.done.append(unit.unit_id)
        elif why.startswith(STALE) and not config.rescore:
            plan.stale.append(unit.unit_id)
        else:
            plan.pending.append(unit)
            plan.reasons[unit.unit_id] = why
    return plan


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
    units_stale: list[str] = field(default_factory=list)
    pending_reasons: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    scored: int = 0
    counts_by_status: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    tiny_random: bool = False
    cutoffs: list[CutoffTable] = field(default_factory=list)

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


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray that listens on 127.0.0.1 only."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        start_local_ray(log_to_driver=True)


def start_local_ray(**init_kwargs: Any) -> None:
    """A single-node Ray whose every server listens on 127.0.0.1, with token auth (Ray's default).

    Ray replaces a node address of 127.0.0.1 with the machine's network address and serves its
    GCS, raylet and worker gRPC ports there, open to the network. With Ray's multi-node mode off (its
    default on macOS and Windows) the node address stays the loopback one and every server binds to
    it; nothing joins a local run, so nothing is lost."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes ray.init starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # read once at import, so this process needs it set too
    ray.init(include_dashboard=False, **init_kwargs)


def _identity(config: ScoreConfig, shards_per_unit: int) -> dict[str, Any]:
    return {
        "model_key": model_key(config),
        "shards_per_unit": shards_per_unit,
        "tiny_random": config.model.is_tiny_random,
        "precision": config.model.precision,
        "heads": [{"name": h.name, "uri": h.weights.uri, "sha256": h.weights.sha256} for h in config.heads],
    }


def _remove_orphan_staging(config: ScoreConfig, run_id: str) -> None:
    """Staging left by dead runs; only called while this run holds the lease."""
    fs, root = filesystem(config.output, config.storage_options)
    staging = join(root, layout.STAGING)
    if fs.exists(staging):
        for folder in fs.ls(staging, detail=False):
            if not folder.rstrip("/").endswith(run_id):
                fs.rm(folder, recursive=True)


def execute(config: ScoreConfig, units: Sequence[WorkUnit], run_id: str, summary: RunSummary,
            shards_per_unit: int, embed_loader: Any = None, on_commit: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Stream the pipeline; commit each unit the moment all its shards' rows have been staged."""
    from pipeline.graph import build_dataset  # imports the stages: keep `plan` and `status` light

    started = time.time()
    shard_names = {u.unit_id: {s.name for s in u.shards} for u in units}
    by_id = {u.unit_id: u for u in units}
    received: dict[str, Counter] = defaultdict(Counter)
    expected: dict[str, dict[str, int]] = defaultdict(dict)
    first_seen: dict[str, float] = {}
    commits: dict[str, Future] = {}
    identity = _identity(config, shards_per_unit)

    ds = build_dataset(config, units, run_id, embed_loader=embed_loader)
    # A commit is a few object-store reads and writes: driver threads do it while the stream goes
    # on, with no Ray worker to start and no CPU taken from decode.
    with ThreadPoolExecutor(max_workers=COMMIT_THREADS, thread_name_prefix="commit") as committer:
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
                    commits[unit_id] = committer.submit(
                        commit_unit, config.output, run_id, unit_id, by_id[unit_id].versions(), identity,
                        timings, dict(config.storage_options))

    for unit_id in shard_names:
        if unit_id not in commits:
            missing = {s: f"{received[unit_id][s]}/{expected[unit_id].get(s, '?')}" for s in shard_names[unit_id]}
            summary.units_failed[unit_id] = f"rows never all arrived: {missing}"
    for unit_id, future in commits.items():
        try:
            manifest = future.result()
        except Exception as exc:  # noqa: BLE001 - one unit's failure must not lose the others
            summary.units_failed[unit_id] = f"{type(exc).__name__}: {exc}"
            continue
        summary.units_committed.append(unit_id)
        summary.rows += manifest["rows"]
        summary.scored += manifest["score"]["scored"]
        for status, count in manifest["counts_by_status"].items():
            summary.counts_by_status[status] = summary.counts_by_status.get(status, 0) + count
        if on_commit:
            on_commit(manifest)


def run_score(config: ScoreConfig, run_id: str | None = None, embed_loader: Any = None,
              lease_ttl_s: float = 300.0) -> RunSummary:
    """Score every pending unit under config.output; committed units are skipped."""
    run_id = run_id or new_run_id()
    started = time.time()
    with Lease(config.output, run_id, ttl_s=lease_ttl_s, storage_options=config.storage_options):
        plan = plan_run(config)
        summary = RunSummary(run_id=run_id, output=config.output, input=list(config.input),
                             shards_per_unit=plan.shards_per_unit,
                             model_key=model_key(config), units_total=len(plan.units),
                             units_done_before=len(plan.done), units_stale=plan.stale,
                             pending_reasons=plan.reasons, tiny_random=config.model.is_tiny_random)
        for unit_id in plan.stale:
            log.warning("unit %s was scored with another model or head; pass --rescore to redo it", unit_id)
        _remove_orphan_staging(config, run_id)
        if plan.pending:
            ensure_ray()
            execute(config, plan.pending, run_id, summary, plan.shards_per_unit, embed_loader=embed_loader)
        fs, root = filesystem(config.output, config.storage_options)
        own_staging = layout.staging_dir(root, run_id, "").rstrip("/")
        if fs.exists(own_staging):  # what is left belongs to failed units: the next run redoes them
            fs.rm(own_staging, recursive=True)
        summary.cutoffs = write_cutoffs(config.output, config.storage_options)
        summary.wall_s = round(time.time() - started, 3)
        write_json_atomic(fs, layout.run_file(root, run_id), summary.to_json())
    return summary
