"""What a run must do: which units are done, which are pending and why, judged by what scored them.

A unit is done when its record lists exactly its work items (shards, image files, ...) at their current versions and was scored by
the same model identity: the CLIP weights' sha256, the precision they ran in and each head's sha256.
Where a file lives and what it is called play no part: the same weights copied elsewhere score the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pipeline.config import ScoreConfig
from pipeline.io.units import read_facts
from pipeline.sources import WorkItem, WorkUnit, get_source

log = logging.getLogger(__name__)

STALE = "scored with another model or head"
_DIGEST_CHARS = 16


def _digest(sha256: str | None) -> str:
    return (sha256 or "unpinned")[:_DIGEST_CHARS]


def model_key(config: ScoreConfig) -> str:
    """What makes scores comparable: CLIP weights and precision, the heads, and the exclusion list if any,
    each by sha256.

    ``config`` is a pinned one (see :mod:`pipeline.preflight`): its weights carry their digests."""
    model = config.model
    if model.is_tiny_random:
        clip = f"{model.name}(seed={model.seed})"
    else:
        clip = f"{model.name}@{_digest(model.pretrained_sha256)}"
    heads = ",".join(f"{h.name}@{_digest(h.weights.sha256)}" for h in config.heads)
    # An exclusion list changes which rows are scored: units scored under another list are not comparable.
    exclusions = f"|exclude@{_digest(config.exclude_hashes_sha256)}" if config.exclude_hashes else ""
    return f"{clip}/{model.precision}|{heads}{exclusions}"


def run_identity(config: ScoreConfig, shards_per_unit: int, requested_precision: str | None = None) -> dict[str, Any]:
    """What every unit record of a run says about the model that scored it."""
    model = config.model
    return {
        "model_key": model_key(config),
        "shards_per_unit": shards_per_unit,
        "tiny_random": model.is_tiny_random,
        "precision": model.precision,
        "precision_requested": requested_precision or model.precision,
        "clip": {"name": model.name, "pretrained": None if model.is_tiny_random else model.pretrained,
                 "sha256": model.pretrained_sha256, "seed": model.seed if model.is_tiny_random else None,
                 "precision": model.precision, "device": model.device},
        "heads": [{"name": h.name, "uri": h.weights.uri, "sha256": h.weights.sha256} for h in config.heads],
        # How the pixels were made: a served upload decodes the same way to give the same score.
        "decode": {"fast": config.decode.fast, "apply_exif_orientation": config.decode.apply_exif_orientation},
    }


@dataclass
class Plan:
    units: list[WorkUnit]
    shards_per_unit: int
    pending: list[WorkUnit]
    done: list[str]
    stale: list[str]  # committed under another model or head; redone only with rescore
    reasons: dict[str, str]  # why each pending unit is pending


def committed_shards_per_unit(records: Mapping[str, Mapping[str, Any]]) -> int | None:
    """The unit size a prefix was first scored with: it fixes unit membership for good."""
    sizes = {m["shards_per_unit"] for m in records.values() if "shards_per_unit" in m}
    if len(sizes) > 1:
        raise RuntimeError(f"records disagree on shards_per_unit ({sorted(sizes)}): the prefix is inconsistent")
    return sizes.pop() if sizes else None


def pending_reason(unit: WorkUnit, record: Mapping[str, Any] | None, key: str | None) -> str | None:
    """Why ``unit`` needs scoring (None: its record is current). A reason starting with STALE needs
    --rescore; ``key=None`` accepts any model."""
    if record is None:
        return "new"
    if not unit.matches(record["shards"]):
        return "shards added or changed"
    if key is not None and record.get("model_key") != key:
        return f"{STALE}: {record.get('model_key')}"
    return None


def plan_run(config: ScoreConfig, shards: Sequence[WorkItem],
             records: Mapping[str, Mapping[str, Any]] | None = None) -> Plan:
    """Units of the work items ``shards`` against what ``config.output`` has committed, for a pinned
    ``config`` (its input format resolved)."""
    if records is None:
        records = read_facts(config.output, config.storage_options)
    source = get_source(config.source.format)
    wanted = source.per_unit(config)
    shards_per_unit = committed_shards_per_unit(records) or wanted
    if shards_per_unit != wanted:
        # Regrouping would give committed items new unit ids, and their rows would exist twice.
        log.warning("output %s was scored with %d work items per unit; keeping that (not %d)",
                    config.output, shards_per_unit, wanted)
    units = source.plan_units(shards, shards_per_unit, records)
    key = model_key(config)
    plan = Plan(units, shards_per_unit, [], [], [], {})
    for unit in units:
        why = pending_reason(unit, records.get(unit.unit_id), key)
        if why is None:
            plan.done.append(unit.unit_id)
        elif why.startswith(STALE) and not config.rescore:
            plan.stale.append(unit.unit_id)
        else:
            plan.pending.append(unit)
            plan.reasons[unit.unit_id] = why
    return plan
