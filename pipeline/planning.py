"""What a run must do: which units are done, which are pending and why, judged by what scored them.

A unit is done when its record lists exactly its work items (shards, image files, ...) at their current versions and was scored by
the same model identity: the CLIP weights' sha256, the precision they ran in and each head's sha256.
Where a file lives and what it is called play no part: the same weights copied elsewhere score the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ScoreConfig
from pipeline.io.units import Committed
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
    unit_ids: list[str]  # every unit of the input, sorted
    shards_per_unit: int
    pending: list[WorkUnit]
    done: list[str]
    stale: list[str]  # committed under another model or head; redone only with rescore
    reasons: dict[str, str]  # why each pending unit is pending



def _grouped(codes: np.ndarray, names: pa.Array) -> np.ndarray:
    """Row order that groups rows by unit code, each unit's rows in name order."""
    order = np.argsort(codes, kind="stable")
    if len(order) > 1:
        grouped, ordered = codes[order], names.take(order)
        later = pc.greater(ordered.slice(1), ordered.slice(0, len(order) - 1)).to_numpy(zero_copy_only=False)
        if not np.all(later | (grouped[1:] != grouped[:-1])):  # some unit's rows are not in name order
            return pc.sort_indices(pa.table({"code": codes, "name": names}),
                                   sort_keys=[("code", "ascending"), ("name", "ascending")]).to_numpy()
    return order


def _same_items(planned: pa.Table, pcodes: np.ndarray, stored: pa.Table, scodes: np.ndarray, units: int) -> np.ndarray:
    """Per unit code: whether its stored items are exactly its planned ones (names, sizes, ETags; a missing size
    or ETag equal to a missing one). Both sides are grouped by unit, in name order, and matched row for row."""
    listed, kept = np.bincount(pcodes, minlength=units), np.bincount(scodes, minlength=units)
    porder = _grouped(pcodes, planned["name"].combine_chunks())
    sorder = _grouped(scodes, stored["name"].combine_chunks())
    pstart, sstart = np.r_[0, np.cumsum(listed)[:-1]], np.r_[0, np.cumsum(kept)[:-1]]
    code = pcodes[porder]
    comparable = (listed == kept)[code]
    offset = np.arange(len(porder)) - pstart[code]
    mine, theirs = porder[comparable], sorder[(sstart[code] + offset)[comparable]]
    equal = np.ones(len(mine), dtype=bool)
    for column, missing in (("name", None), ("size", -1), ("etag", "\0")):
        a, b = planned[column].take(mine), stored[column].take(theirs)
        if missing is not None:
            a, b = pc.fill_null(a, missing), pc.fill_null(b, missing)
        equal &= pc.equal(a, b).to_numpy(zero_copy_only=False)
    differing = np.bincount(code[comparable], weights=~equal, minlength=units) > 0
    return (listed == kept) & ~differing


def unit_verdicts(planned: pa.Table, committed: Committed, key: str | None) -> pa.Table:
    """Why each planned unit needs scoring: one row per unit of ``planned`` (one row per work item, with
    ``unit``, ``name``, ``size``, ``etag``), sorted, with ``reason`` null where the committed row is current:
    it lists exactly the unit's items at their versions and, unless ``key`` is None, was scored by that model.
    A reason starting with STALE needs --rescore.

    LAION is 232,000 shards in 58,000 units: the comparison is vectorised over Arrow columns, with no Python
    per unit and no hashing of names."""
    stored = committed.items()
    encoded = pc.dictionary_encode(planned["unit"].combine_chunks())
    units, pcodes = encoded.dictionary, encoded.indices.to_numpy()
    scodes = pc.index_in(stored["unit"].combine_chunks(), value_set=units)
    listed_units = pc.is_valid(scodes)
    stored = stored.filter(listed_units)
    same = _same_items(planned, pcodes, stored, scodes.filter(listed_units).to_numpy(), len(units))
    row = pc.index_in(units, value_set=committed.table["unit"].combine_chunks())
    model = pc.fill_null(committed.table["model_key"].take(row), "None")
    other_model = np.zeros(len(units), dtype=bool) if key is None else pc.not_equal(model, key).to_numpy(
        zero_copy_only=False)
    reason = pc.case_when(
        pc.make_struct(pc.is_null(row), pa.array(~same), pa.array(other_model)),
        "new", "shards added or changed", pc.binary_join_element_wise(f"{STALE}: ", model, ""))
    return pa.table({"unit": units, "reason": reason}).sort_by("unit")


def plan_run(config: ScoreConfig, items: Sequence[WorkItem], committed: Committed | None = None) -> Plan:
    """Units of the work ``items`` against what ``config.output`` has committed, for a pinned ``config`` (its
    input format resolved)."""
    if committed is None:
        committed = Committed.read(config.output, config.storage_options)
    source = get_source(config.source.format)
    wanted = source.per_unit(config)
    shards_per_unit = committed.shards_per_unit() or wanted
    if shards_per_unit != wanted:
        # Regrouping would give committed items new unit ids, and their rows would exist twice.
        log.warning("output %s was scored with %d work items per unit; keeping that (not %d)",
                    config.output, shards_per_unit, wanted)
    planned = source.plan_units(items, shards_per_unit, committed)
    verdicts = unit_verdicts(planned.table, committed, model_key(config))
    plan = Plan(verdicts["unit"].to_pylist(), shards_per_unit, [], [], [], {})
    for unit, why in zip(plan.unit_ids, verdicts["reason"].to_pylist()):
        if why is None:
            plan.done.append(unit)
        elif why.startswith(STALE) and not config.rescore:
            plan.stale.append(unit)
        else:
            plan.reasons[unit] = why
    plan.pending = planned.work_units(plan.reasons)
    return plan
