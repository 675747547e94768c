"""Select images by a text query: rank committed rows by CLIP text-image similarity, keep a score threshold,
take the top K, and optionally spread the picks.

The query is embedded by the text tower of the SAME CLIP model that made the stored image embeddings: the
model identity comes from the records (``model_key`` and the recorded model identity) and is checked
against the loaded weights (architecture and sha256), so a query is never compared with embeddings from
another model. The stored ``embedding`` column (L2-normalised fp16, written by ``score --write-embeddings``)
is all that is read from the images: no image is decoded or re-embedded.

Steps, per committed data file (the unit of parallelism):

1. skip files whose score band cannot reach ``min_score`` or whose units are not wanted (from the table's
   log, no data file read);
2. read ``status == ok AND aesthetic_score >= min_score`` (row groups pruned by their score statistics)
   for the selected model, in record batches;
3. cosine similarity with the query = dot product of unit vectors; keep this file's best ``pool`` rows.

The files' candidates are merged on the driver into the global best ``pool`` (exact: the global top-N is
inside the union of every file's top-N). On a small prefix the files are read in the driver process; past
``ray_min_rows`` rows (counted from the log) each file is a Ray task and the driver merges results as
they arrive, so its memory holds ``pool`` rows plus one file's result per task in flight.

Diversity (``diverse=True``): **maximal marginal relevance** (Carbonell & Goldstein 1998) over the image
embeddings. From the ``pool_factor * K`` most query-similar rows it picks, one at a time, the row maximising

    lambda * relevance(row) - (1 - lambda) * max similarity(row, rows already picked)

Both terms are put on comparable scales, so one ``mmr_lambda`` (default 0.5) means the same for any model:
relevance is the query similarity min-max scaled to [0, 1] over the pool (CLIP text-image cosines sit in a
narrow band, ~0.15-0.35 for ViT-L/14), and the similarity between images is the cosine of pool-centred
embeddings (:func:`centred_unit`: CLIP image embeddings share a dominant direction, so raw cosines of
unrelated photos are typically 0.4-0.6 under ViT-L/14 and ~0.99 under the random tiny model, which would leave the query
term deciding alone). The reported ``max_similarity_to_earlier_picks`` is the plain cosine, easier to read.

Why MMR rather than k-means clusters:

- it keeps the query in the objective: every pick is still relevant, a cluster centre need not be;
- it needs no number of clusters (k-means with k=K gives clusters whose members are not ranked against the
  query; k < K needs a per-cluster quota rule), and no random initialisation: the result is deterministic
  (ties go to the more query-similar row, then key order), so the Ray and local paths agree exactly;
- it yields an order (the MMR rank) and a per-pick reason (its similarity to the closest earlier pick);
- it costs K x pool dot products on the driver, independent of the prefix size.

Output (``write_selection``): ``selection.parquet`` (one row per pick, with the reasons: query similarity and
its rank, aesthetic score, MMR rank and score, similarity to the closest earlier pick, a one-line ``reason``),
``selection.json`` (the parameters, the model, counts, and the mean pairwise embedding distance of the picks
beside that of plain top-K), and with ``webdataset=True`` ``selection-000000.tar``: the selected images, each
fetched from its shard with one ranged read, with ``.txt`` caption and ``.json`` metadata members.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import webdataset

from pipeline import bands
from pipeline import schema as S
from pipeline.analysis.reading import fetch_images
from pipeline.config import TINY_MODEL, ModelConfig
from pipeline.index import describe, open_index, stale_units
from pipeline.io.delta import embeddings_of, open_table, snapshot_files
from pipeline.io.storage import filesystem, full_uri, join, write_bytes_atomic
from pipeline.io.units import read_units
from pipeline.io.units import versions as unit_versions

log = logging.getLogger(__name__)

SIMILARITY = "query_similarity"
SIMILARITY_RANK = "similarity_rank"  # rank by query similarity among rows passing the score threshold
RANK = "rank"  # final order of the selection
MMR_RANK = "mmr_rank"
MMR_SCORE = "mmr_score"
NEAREST_PICK = "max_similarity_to_earlier_picks"
REASON = "reason"

# What a candidate row carries from the Parquet (embedding last: the wide one).
CANDIDATE_COLUMNS = (S.KEY, S.SHARD, S.UNIT, S.MEMBER, S.OFFSET, S.SIZE, S.IMAGE_FORMAT, S.URL, S.CAPTION,
                     S.AESTHETIC_SCORE, S.MODEL, S.EMBEDDING)

DEFAULT_RAY_MIN_ROWS = 500_000


class SelectionError(ValueError):
    """The selection cannot run as asked (no embeddings, no committed units, model mismatch)."""


class MissingEmbeddings(SelectionError):
    pass


# Model identity ----------------------------------------------------------------------------------

_PIN = re.compile(r"@[0-9a-f]{12}$")


def model_config_of(record: Mapping[str, Any]) -> ModelConfig:
    """The CLIP model that scored a unit, from its record's ``clip`` record (weights pinned by sha256);
    records written before that record existed name it in their ``model_key``."""
    clip = record.get("clip")
    if not clip:
        return model_config_from_key(record["model_key"])
    if clip["name"] == TINY_MODEL:
        return ModelConfig(name=TINY_MODEL, precision="fp32", seed=int(clip.get("seed") or 0))
    return ModelConfig(name=clip["name"], pretrained=clip["pretrained"], pretrained_sha256=clip.get("sha256"),
                       precision="fp32")


def model_config_from_key(model_key: str) -> ModelConfig:
    """The CLIP model an older record's ``model_key`` names (``<name>/<weights>[@pin]|<heads>``)."""
    clip_part = model_key.split("|", 1)[0]
    name, _, weights = clip_part.partition("/")
    if not name or not weights:
        raise SelectionError(f"cannot read a model from model_key {model_key!r}")
    if name == TINY_MODEL:
        seed = int(weights.split("=", 1)[1]) if weights.startswith("seed=") else 0
        return ModelConfig(name=TINY_MODEL, precision="fp32", seed=seed)
    return ModelConfig(name=name, pretrained=_PIN.sub("", weights), precision="fp32")


def same_model(loaded_identity: str, recorded_identity: str) -> bool:
    """Architecture and weights digest agree (the label, a tag or a file name, may differ)."""
    if loaded_identity == recorded_identity:
        return True
    if "@" not in loaded_identity or "@" not in recorded_identity:
        return False
    return (loaded_identity.split("/", 1)[0] == recorded_identity.split("/", 1)[0]
            and loaded_identity.rsplit("@", 1)[1] == recorded_identity.rsplit("@", 1)[1])


def models_in(records: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """Recorded CLIP identity -> unit ids scored with it."""
    units: dict[str, list[str]] = {}
    for unit_id, record in records.items():
        for identity in record.get("model") or []:
            units.setdefault(identity, []).append(unit_id)
    return units


@dataclass(frozen=True)
class QueryModel:
    """The text side of the scoring model: what embedded the query, and which rows it may be compared with."""

    identity: str  # as recorded in the rows' `model` column
    config: ModelConfig
    embedding: np.ndarray  # (D,) float32, unit norm


def embed_query(query: str, records: Mapping[str, Mapping[str, Any]], model: ModelConfig | None = None,
                weights_dirs: Sequence[str] = (), storage_options: Mapping[str, Any] | None = None,
                device: str | None = None) -> QueryModel:
    """Embed ``query`` with the text tower of the model the scores were made with.

    ``model`` overrides the model read from the records (e.g. a local copy of the weights when the
    scores name a hub tag); it must still be the same architecture and weights as some committed unit.
    """
    import torch
    import torch.nn.functional as F

    from pipeline.models.clip import load_clip

    recorded = models_in(records)
    if not recorded:
        raise SelectionError("no committed unit records a model identity")
    if model is None:
        configs = {model_config_of(m) for m in records.values()}
        if len(configs) > 1:
            raise SelectionError(f"the units were scored with {len(configs)} models ({sorted(recorded)}); "
                                 f"choose one with --model/--pretrained")
        model = configs.pop()
    clip = load_clip(model, device=device or "cpu", search_dirs=tuple(weights_dirs), storage_options=storage_options)
    matching = [identity for identity in recorded if same_model(clip.identity, identity)]
    if not matching:
        raise SelectionError(f"the loaded model is {clip.identity}, but the embeddings were made with "
                             f"{sorted(recorded)}; a text query must be embedded by the same model")
    tokens = clip.tokenizer([query]).to(clip.device)
    with torch.inference_mode():
        text = F.normalize(clip.model.encode_text(tokens).float(), dim=-1)
    return QueryModel(matching[0], model, text[0].cpu().numpy().astype(np.float32))


# Candidates ----------------------------------------------------------------------------------------


def _embeddings(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(N, D) float32 from an embedding column."""
    return embeddings_of(column)


def _top_rows(table: pa.Table, limit: int) -> pa.Table:
    """The ``limit`` most similar rows, ties broken by key then shard (deterministic across paths)."""
    if table.num_rows == 0:
        return table
    sims = table[SIMILARITY].to_numpy()
    order = np.lexsort((np.asarray(table[S.SHARD].to_pylist(), dtype=object).astype(str),
                        np.asarray(table[S.KEY].to_pylist(), dtype=object).astype(str), -sims))
    return table.take(pa.array(order[:limit]))


def file_candidates(uri: str, query: np.ndarray, min_score: float | None, model_identity: str, limit: int,
                    storage_options: Mapping[str, Any] | None = None,
                    batch_rows: int = 8192, exclude: Mapping[str, frozenset[str]] | None = None,
                    units: Collection[str] | None = None) -> tuple[pa.Table, int]:
    """One data file's best ``limit`` rows for ``query`` among ok rows scoring >= ``min_score`` (of ``units``
    when given, and not in ``exclude``, shard -> keys: the duplicates ``--dedup`` leaves out), and how many rows
    passed that filter.

    Plain function of its arguments: run in the driver or as a Ray task. The table carries
    :data:`CANDIDATE_COLUMNS` plus ``score_band`` and ``query_similarity``.
    """
    fs, path = filesystem(uri, storage_options)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    if S.EMBEDDING not in dataset.schema.names:
        raise MissingEmbeddings(_missing_embeddings_message([uri]))
    expression = (pads.field(S.STATUS) == S.Status.OK.value) & (pads.field(S.MODEL) == model_identity)
    if min_score is not None:
        expression = expression & (pads.field(S.AESTHETIC_SCORE) >= min_score)
    if units is not None:
        expression = expression & pads.field(S.UNIT).isin(sorted(units))
    columns = [c for c in CANDIDATE_COLUMNS if c in dataset.schema.names]
    band = _band_of_path(path)
    best: pa.Table | None = None
    passing = 0
    for batch in dataset.to_batches(columns=columns, filter=expression, batch_size=batch_rows):
        if exclude and batch.num_rows:
            keep = [key not in exclude.get(shard, ()) for shard, key in
                    zip(batch.column(S.SHARD).to_pylist(), batch.column(S.KEY).to_pylist())]
            batch = batch.filter(pa.array(keep))
        passing += batch.num_rows
        if batch.num_rows == 0:
            continue
        embeddings = _embeddings(batch.column(S.EMBEDDING))
        sims = embeddings @ query.astype(np.float32)
        table = pa.Table.from_batches([batch]).append_column(SIMILARITY, pa.array(sims.astype(np.float32)))
        if best is not None:
            table = pa.concat_tables([best, table])
        best = _top_rows(table, limit)
    if best is None:
        schema = dataset.schema
        fields = [schema.field(c) for c in columns] + [pa.field(SIMILARITY, pa.float32())]
        best = pa.schema(fields).empty_table()
    return best.append_column(S.SCORE_BAND, pa.array([band] * best.num_rows, pa.string())), passing


def _band_of_path(path: str) -> str:
    for part in path.split("/"):
        if part.startswith(S.SCORE_BAND + "="):
            return part.split("=", 1)[1]
    return ""


def _missing_embeddings_message(uris: Sequence[str]) -> str:
    return (f"{len(uris)} committed file(s) have no '{S.EMBEDDING}' column (e.g. {uris[0]}): selection by text "
            f"compares the query with the stored CLIP image embeddings. Score with --write-embeddings "
            f"(into a new output prefix: units already scored by the same model count as done).")


def _merge(tables: Sequence[pa.Table], limit: int) -> pa.Table:
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return pa.table({})
    return _top_rows(pa.concat_tables(tables, promote_options="permissive"), limit)


@dataclass(frozen=True)
class FilePlan:
    uris: list[str]
    rows: int  # rows in those files, from the table's log (rows of other units included)
    skipped_by_band: int  # files whose band cannot reach min_score
    units: frozenset[str] | None = None  # the units to read from those files (None: every unit of the model)


def plan_files(output: str, records: Mapping[str, Mapping[str, Any]], model_identity: str,
               min_score: float | None, storage_options: Mapping[str, Any] | None = None,
               units: Collection[str] | None = None) -> FilePlan:
    """The snapshot's data files that can hold a candidate: files of bands that reach ``min_score`` holding
    rows of this model's units (among ``units`` when given).

    A unit's rows lie in its own files or, once compacted, in files shared with other units; a file is read
    when the range of units its statistics give holds a wanted unit (a file without them is read).
    """
    wanted = sorted(unit_id for unit_id, record in records.items()
                    if model_identity in (record.get("model") or []) and (units is None or unit_id in units))
    only = None if units is None else frozenset(wanted)
    table = open_table(output, storage_options) if wanted else None
    if table is None:
        return FilePlan([], 0, 0, only)
    fs, root = filesystem(output, storage_options)
    uris, rows, skipped = [], 0, 0
    for file in snapshot_files(table):
        if file.band == bands.UNSCORED or not file.may_hold(wanted):
            continue
        low_high = bands.RANGES.get(file.band)
        if min_score is not None and low_high is not None and low_high[1] <= min_score:
            skipped += 1
            continue
        uris.append(full_uri(fs, join(root, file.path)))
        rows += file.rows
    return FilePlan(uris, rows, skipped, only)


def check_embeddings(uris: Sequence[str], records: Mapping[str, Mapping[str, Any]],
                     storage_options: Mapping[str, Any] | None = None) -> None:
    """Fail before loading any model when the files have no embeddings: one footer per run is read
    (a run writes the same columns in all its files)."""
    if not uris:
        return
    by_unit_run = {unit_id: str(m.get("run_id")) for unit_id, m in records.items()}
    seen_runs: dict[str, str] = {}
    for uri in uris:
        unit = uri.rsplit("/", 1)[-1][: -len(".parquet")]
        seen_runs.setdefault(by_unit_run.get(unit, uri), uri)
    missing = []
    for uri in seen_runs.values():
        fs, path = filesystem(uri, storage_options)
        with fs.open(path, "rb") as handle:
            if S.EMBEDDING not in pq.read_schema(handle).names:
                missing.append(uri)
    if missing:
        raise MissingEmbeddings(_missing_embeddings_message(missing))


def _duplicates_by_shard(output: str, storage_options: Mapping[str, Any] | None) -> dict[str, frozenset[str]]:
    """shard -> keys of the rows ``aesthetics dedup`` found to be another row's duplicate."""
    from pipeline.dedup import duplicate_rows

    duplicates = duplicate_rows(output, storage_options)
    by_shard: dict[str, set[str]] = {}
    for shard, key in zip(duplicates[S.SHARD].to_pylist(), duplicates[S.KEY].to_pylist()):
        by_shard.setdefault(shard, set()).add(key)
    return {shard: frozenset(keys) for shard, keys in by_shard.items()}


def _candidates_local(uris: Sequence[str], query: np.ndarray, min_score: float | None, identity: str,
                      limit: int, storage_options: Mapping[str, Any] | None,
                      exclude: Mapping[str, frozenset[str]] | None = None,
                      units: Collection[str] | None = None) -> tuple[pa.Table, int]:
    best: pa.Table | None = None
    passing = 0
    for uri in uris:
        found, count = file_candidates(uri, query, min_score, identity, limit, storage_options, exclude=exclude,
                                       units=units)
        passing += count
        best = _merge([best, found] if best is not None else [found], limit)
    return (best if best is not None else pa.table({})), passing


def _candidates_ray(uris: Sequence[str], query: np.ndarray, min_score: float | None, identity: str,
                    limit: int, storage_options: Mapping[str, Any] | None,
                    exclude: Mapping[str, frozenset[str]] | None = None,
                    units: Collection[str] | None = None, max_in_flight: int | None = None) -> tuple[pa.Table, int]:
    """One Ray task per file; results merged into the running top-``limit`` as they come back."""
    import ray

    from pipeline.ray_session import ensure_ray

    ensure_ray()
    remote = ray.remote(num_cpus=1, max_retries=2)(file_candidates)
    query_ref = ray.put(query)
    exclude_ref, units_ref = ray.put(exclude), ray.put(units)
    if max_in_flight is None:
        max_in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: list[Any] = []
    best: pa.Table | None = None
    passing = 0
    queue = list(uris)
    try:
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                pending.append(remote.remote(queue.pop(0), query_ref, min_score, identity, limit,
                                             dict(storage_options or {}), exclude=exclude_ref,
                                             units=units_ref))
            done, pending = ray.wait(pending, num_returns=1)
            found, count = ray.get(done[0])
            passing += count
            best = _merge([best, found] if best is not None else [found], limit)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, SelectionError):
            raise cause from None
        raise
    return (best if best is not None else pa.table({})), passing


# Diversity -----------------------------------------------------------------------------------------


def mmr(embeddings: np.ndarray, relevance: np.ndarray, k: int, lam: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Maximal marginal relevance: (picked row indices in pick order, their MMR objective values).

    ``embeddings`` (N, D) unit rows (the redundancy space), ``relevance`` (N,) on a [0, 1] scale.
    """
    n = len(relevance)
    k = min(k, n)
    picked = np.empty(k, dtype=np.int64)
    scores = np.empty(k, dtype=np.float64)
    closest = np.zeros(n)  # max similarity of each row to the picks so far (0 before the first pick)
    available = np.ones(n, dtype=bool)
    for i in range(k):
        objective = lam * relevance - (1.0 - lam) * closest
        objective[~available] = -np.inf
        j = int(np.argmax(objective))  # ties: the lowest index, i.e. the more query-similar row
        picked[i], scores[i] = j, objective[j]
        available[j] = False
        similarity = embeddings @ embeddings[j]
        closest = similarity if i == 0 else np.maximum(closest, similarity)
    return picked, scores


def centred_unit(embeddings: np.ndarray) -> np.ndarray:
    """Rows minus their mean, renormalised: the space MMR measures redundancy in.

    CLIP image embeddings sit in a narrow cone (unrelated photos have cosine of typically 0.4-0.6 under ViT-L/14, ~0.99
    under the random tiny model), which squeezes raw cosines into a sliver of [-1, 1] and lets the query
    term decide alone. Centring on the pool's mean removes the shared direction, so redundancy spans the
    same range whatever the model, and one ``mmr_lambda`` means the same thing for both.
    """
    centred = embeddings.astype(np.float64) - embeddings.astype(np.float64).mean(axis=0, keepdims=True)
    return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)


def nearest_earlier(embeddings: np.ndarray) -> np.ndarray:
    """Each row's max cosine similarity to the rows before it (NaN for the first), on unit rows."""
    out = np.full(len(embeddings), np.nan)
    if len(embeddings) > 1:
        sims = embeddings @ embeddings.T
        for i in range(1, len(embeddings)):
            out[i] = sims[i, :i].max()
    return out


def mean_pairwise_distance(embeddings: np.ndarray) -> float:
    """Mean cosine distance (1 - cos) over all unordered pairs of unit rows; NaN under two rows."""
    n = len(embeddings)
    if n < 2:
        return float("nan")
    e = embeddings.astype(np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sims = e @ e.T
    return float(1.0 - sims[np.triu_indices(n, 1)].mean())


# The selection ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectOptions:
    query: str
    min_score: float | None = None
    top_k: int = 100
    diverse: bool = False
    mmr_lambda: float = 0.5
    pool_factor: int = 5  # diverse: MMR picks among the pool_factor * top_k most query-similar rows
    use_ray: bool | None = None  # None: Ray when the candidate files hold >= ray_min_rows rows
    ray_min_rows: int = DEFAULT_RAY_MIN_ROWS
    dedup: bool = False  # leave out rows that are not their duplicate group's keeper (aesthetics dedup)
    use_index: bool | None = None  # None: the output's ANN index when it holds this model; True: it or fail
    candidates: int | None = None  # rows the index proposes for exact re-ranking (default 10 x the pool)

    def __post_init__(self) -> None:
        if not self.query or not self.query.strip():
            raise SelectionError("the query must not be empty")
        if self.top_k < 1:
            raise SelectionError(f"top_k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.mmr_lambda <= 1.0:
            raise SelectionError(f"mmr_lambda must be in [0, 1], got {self.mmr_lambda}")
        if self.pool_factor < 1:
            raise SelectionError(f"pool_factor must be >= 1, got {self.pool_factor}")
        if self.candidates is not None and self.candidates < 1:
            raise SelectionError(f"candidates must be >= 1, got {self.candidates}")
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise SelectionError(f"min_score must be finite, got {self.min_score}")

    @property
    def pool(self) -> int:
        return self.top_k * (self.pool_factor if self.diverse else 1)


@dataclass
class Selection:
    table: pa.Table  # the picks, in final order, with the reasons (and embeddings)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return self.table[S.KEY].to_pylist() if self.table.num_rows else []


def _reason(row: Mapping[str, Any], threshold: float | None, pool_rows: int, diverse: bool) -> str:
    passing = f"score >= {threshold:g}" if threshold is not None else "ok"
    text = (f"query similarity {row[SIMILARITY]:.4f} (#{row[SIMILARITY_RANK]} of the {passing} rows), "
            f"aesthetic score {row[S.AESTHETIC_SCORE]:.3f}")
    if diverse:
        near = row[NEAREST_PICK]
        text += f"; MMR pick {row[MMR_RANK]} of a pool of {pool_rows}"
        text += "" if near is None or (isinstance(near, float) and math.isnan(near)) \
            else f", closest earlier pick at cosine {near:.3f}"
    return text


def select_images(output: str, options: SelectOptions, model: ModelConfig | None = None,
                  weights_dirs: Sequence[str] = (), storage_options: Mapping[str, Any] | None = None,
                  device: str | None = None, query_model: QueryModel | None = None) -> Selection:
    """Rank the committed rows of ``output`` by ``options.query`` and pick ``options.top_k`` of them.

    ``query_model`` skips loading CLIP (a precomputed query embedding and the identity it matches).
    """
    started = time.time()
    records = read_units(output, storage_options)
    if not records:
        raise SelectionError(f"no committed units under {output}")
    if query_model is None:
        # Check the embeddings exist before loading a model (which may be 1.7 GB). With a query embedding
        # given (a server answering many queries) a missing column is found when a file is read.
        for identity in models_in(records):
            check_embeddings(plan_files(output, records, identity, None, storage_options).uris, records,
                             storage_options)
        query_model = embed_query(options.query, records, model, weights_dirs, storage_options, device)
    exclude = _duplicates_by_shard(output, storage_options) if options.dedup else None
    index = _usable_index(output, options, query_model.identity, storage_options)
    brute_units = None
    pool, count_passing, index_info = None, 0, None
    if index is not None:
        # The index answers for the units it holds at their current version; units scored since it was
        # last updated are read from their files, so a query never misses them (nor sees stale rows).
        current = {u: version for u, (version, _) in unit_versions(output, storage_options).items()
                   if query_model.identity in (records.get(u, {}).get("model") or [])}
        stale = stale_units(index, current)
        pool, count_passing = index.search(query_model.embedding, options.pool, options.candidates,
                                           options.min_score, exclude, skip_units=stale)
        brute_units = stale
        index_info = {**describe(index.manifest), "candidates": options.candidates or 10 * options.pool,
                      "units_read_from_files": len(stale)}
    plan = plan_files(output, records, query_model.identity, options.min_score, storage_options, brute_units)
    use_ray = options.use_ray if options.use_ray is not None else plan.rows >= options.ray_min_rows
    gather = _candidates_ray if use_ray and plan.uris else _candidates_local
    if plan.uris or pool is None:
        found, passing = gather(plan.uris, query_model.embedding, options.min_score, query_model.identity,
                                options.pool, storage_options, exclude, plan.units)
        pool = found if pool is None else _merge([pool, found], options.pool)
        count_passing += passing
    picks = _finish(pool, options, count_passing)
    embeddings = _embeddings(picks[S.EMBEDDING]) if picks.num_rows else np.zeros((0, 1), np.float32)
    plain = pool.slice(0, options.top_k) if pool.num_rows else pool
    plain_embeddings = _embeddings(plain[S.EMBEDDING]) if plain.num_rows else embeddings
    info = {
        "query": options.query,
        "output": output,
        "model": query_model.identity,
        "model_config": dataclasses.asdict(query_model.config),
        "min_score": options.min_score,
        "top_k": options.top_k,
        "diverse": options.diverse,
        "method": "mmr" if options.diverse else "top-k by query similarity",
        "mmr_lambda": options.mmr_lambda if options.diverse else None,
        "pool": int(pool.num_rows),
        "rows_passing": count_passing,
        "files_read": len(plan.uris),
        "files_skipped_by_band": plan.skipped_by_band,
        "rows_in_files_read": plan.rows,
        "used_ray": bool(use_ray and plan.uris),
        "dedup": options.dedup,
        "index": index_info,
        "selected": int(picks.num_rows),
        "mean_pairwise_distance": mean_pairwise_distance(embeddings),
        "mean_pairwise_distance_plain_top_k": mean_pairwise_distance(plain_embeddings),
        "tiny_random": any(m.get("tiny_random") for m in records.values()),
        "seconds": round(time.time() - started, 3),
    }
    return Selection(picks, info)


def _usable_index(output: str, options: SelectOptions, identity: str, storage_options: Mapping[str, Any] | None):
    """The output's ANN index when the options allow it and it holds ``identity``'s embeddings."""
    if options.use_index is False:
        return None
    index = open_index(output, storage_options)
    if index is not None and index.model == identity:
        return index
    if options.use_index:
        why = "has no index" if index is None else f"has an index of {index.model}, not {identity}"
        raise SelectionError(f"{output} {why}: run `aesthetics index {output}` first")
    return None


def _finish(pool: pa.Table, options: SelectOptions, count_passing: int) -> pa.Table:
    if pool.num_rows == 0:
        return pool
    n = pool.num_rows
    pool = pool.append_column(SIMILARITY_RANK, pa.array(np.arange(1, n + 1, dtype=np.int64)))
    if options.diverse:
        sims = pool[SIMILARITY].to_numpy().astype(np.float64)
        spread = sims.max() - sims.min()
        relevance = (sims - sims.min()) / spread if spread > 0 else np.ones_like(sims)
        order, scores = mmr(centred_unit(_embeddings(pool[S.EMBEDDING])), relevance, options.top_k,
                            options.mmr_lambda)
        picks = pool.take(pa.array(order))
        picks = picks.append_column(MMR_RANK, pa.array(np.arange(1, len(order) + 1, dtype=np.int64)))
        picks = picks.append_column(MMR_SCORE, pa.array(scores.astype(np.float32)))
    else:
        picks = pool.slice(0, options.top_k)
        picks = picks.append_column(MMR_RANK, pa.nulls(picks.num_rows, pa.int64()))
        picks = picks.append_column(MMR_SCORE, pa.nulls(picks.num_rows, pa.float32()))
    raw = _embeddings(picks[S.EMBEDDING]).astype(np.float64)
    nearest = nearest_earlier(raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12))
    picks = picks.append_column(NEAREST_PICK, pa.array(nearest.astype(np.float32), from_pandas=True))
    picks = picks.append_column(RANK, pa.array(np.arange(1, picks.num_rows + 1, dtype=np.int64)))
    rows = picks.drop_columns([S.EMBEDDING]).to_pylist()
    reasons = [_reason(row, options.min_score, n, options.diverse) for row in rows]
    picks = picks.append_column(REASON, pa.array(reasons, pa.string()))
    first = [RANK, S.KEY, SIMILARITY, SIMILARITY_RANK, S.AESTHETIC_SCORE, MMR_RANK, MMR_SCORE, NEAREST_PICK, REASON]
    rest = [c for c in picks.column_names if c not in first and c != S.EMBEDDING]
    return picks.select(first + rest + [S.EMBEDDING])


# Writing ------------------------------------------------------------------------------------------

SELECTION_PARQUET = "selection.parquet"
SELECTION_JSON = "selection.json"


def _member_keys(keys: Sequence[str], ranks: Sequence[int]) -> list[str]:
    clean = [re.sub(r"[^A-Za-z0-9_-]", "_", k or "") or f"row{r}" for k, r in zip(keys, ranks)]
    if len(set(clean)) == len(clean):
        return clean
    return [f"{r:06d}_{k}" for k, r in zip(clean, ranks)]


def write_webdataset(selection: Selection, path_uri: str, storage_options: Mapping[str, Any] | None = None,
                     source_storage_options: Mapping[str, Any] | None = None) -> int:
    """One WebDataset tar of the picks: ``<key>.<ext>`` (the original bytes, one ranged read each from the
    source shard), ``<key>.txt`` (caption), ``<key>.json`` (row and reasons). Returns the sample count."""
    rows = selection.table.drop_columns([S.EMBEDDING]).to_pylist() if selection.table.num_rows else []
    images = fetch_images(rows, source_storage_options)
    names = _member_keys([r[S.KEY] for r in rows], [r[RANK] for r in rows])
    buffer = io.BytesIO()
    # webdataset's own writer: the members are exactly what its readers (and img2dataset) expect.
    with webdataset.TarWriter(buffer, encoder=False, mtime=0) as archive:
        for name, row, data in zip(names, rows, images):
            extension = (row.get(S.IMAGE_FORMAT) or "jpg").lower()
            meta = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
            archive.write({"__key__": name, extension: data, "txt": (row.get(S.CAPTION) or "").encode(),
                           "json": json.dumps(meta, sort_keys=True, default=str).encode()})
    fs, path = filesystem(path_uri, storage_options)
    write_bytes_atomic(fs, path, buffer.getvalue())
    return len(rows)


def write_selection(selection: Selection, out: str, webdataset: bool = False,
                    storage_options: Mapping[str, Any] | None = None,
                    source_storage_options: Mapping[str, Any] | None = None,
                    keep_embeddings: bool = True) -> dict[str, str]:
    """Write ``selection.parquet``, ``selection.json`` and optionally ``selection-000000.tar`` under ``out``.
    Returns the paths written by kind."""
    fs, root = filesystem(out, storage_options)
    fs.makedirs(root, exist_ok=True)
    table = selection.table if keep_embeddings or S.EMBEDDING not in selection.table.column_names \
        else selection.table.drop_columns([S.EMBEDDING])
    written = {}
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    write_bytes_atomic(fs, join(root, SELECTION_PARQUET), sink.getvalue())
    written["parquet"] = join(out, SELECTION_PARQUET)
    if webdataset:
        tar_uri = join(out, "selection-000000.tar")
        count = write_webdataset(selection, tar_uri, storage_options, source_storage_options or storage_options)
        selection.info["webdataset"] = {"path": tar_uri, "samples": count}
        written["webdataset"] = tar_uri
    info = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in selection.info.items()}
    write_bytes_atomic(fs, join(root, SELECTION_JSON), json.dumps(info, indent=2, default=str).encode())
    written["json"] = join(out, SELECTION_JSON)
    return written


def read_selection(out: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    fs, root = filesystem(out, storage_options)
    with fs.open(join(root, SELECTION_PARQUET), "rb") as handle:
        return pq.read_table(handle)


__all__ = [
    "MissingEmbeddings", "QueryModel", "SelectOptions", "Selection", "SelectionError", "centred_unit", "embed_query",
    "file_candidates", "mean_pairwise_distance", "mmr", "model_config_from_key", "model_config_of", "nearest_earlier", "read_selection",
    "select_images", "write_selection", "write_webdataset",
]
