"""Data-parallel training of one head config with Ray Train, for labelled sets whose embeddings do not fit one
process.

The labelled rows are a Ray Data dataset, never a matrix in one process:

1. the scored output's Parquet files (committed units only, see :func:`pipeline.training.scored.data_files`) are
   read with just the embedding and join columns, and each batch is joined with the label table (small: keys,
   scores and vote counts go to the tasks) and given its split by :func:`~pipeline.training.splits.
   split_assignments` (the seeded hash of the key :func:`~pipeline.training.train_head.train_head` splits by);
2. one Ray Data aggregation pass gives the rows per split and the training split's per-dimension input mean and
   std and label mean and std (the conditioning ``train_head`` computes in memory);
3. a :class:`ray.train.torch.TorchTrainer` runs ``workers`` copies of the training loop; each streams its shard
   of the training and validation rows (``ray.train.get_dataset_shard``), trains the
   :class:`~pipeline.training.train_head.ConditionedHead` with the same objective as ``train_head`` under DDP,
   all-reduces the validation loss every epoch, stops early on it after ``patience`` epochs without
   improvement, and reports (``ray.train.report``) a checkpoint of the best state dict;
4. the driver exports the best state dict to the LAION file layout exactly as ``train_head`` does, and computes
   the validation and test metrics from predictions streamed over those rows (only predictions and labels
   come back to the driver).

Differences from ``train_head``: ``batch_size`` is the global batch (each worker takes its share); the order
of training rows is shuffled per epoch within a local buffer, not globally; a split's rows are divided equally
among the workers, so up to ``workers - 1`` rows of each split may sit out an epoch; a key scored twice (in
two committed units) trains twice (both copies land in the same split, so nothing leaks between splits); the
record has no metrics on the training split. Losses: mse, l1, bce and emd (the vote counts travel with the
labels).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.config import ConfigError
from pipeline.io.storage import pyarrow_filesystem
from pipeline.training import checkpoints
from pipeline.training.labels import AVA_VOTE_BINS, LabelTable
from pipeline.training.scored import (
    JOIN_KEY,
    ScoredDataError,
    data_files,
    embedding_matrix,
    embedding_width,
    is_embedding_type,
    join_columns,
    join_keys,
)
from pipeline.training.splits import SPLIT_NAMES, TEST, TRAIN, VALIDATION, split_assignments

if TYPE_CHECKING:
    import torch

    from pipeline.training.train_head import TrainConfig, TrainedHead

# Torch (and train_head, which needs it) is imported where a head is trained or run, not at the top: the Ray
# Data tasks that read, join and split the rows import this module, and need none of it (~0.5 GB less each).

log = logging.getLogger(__name__)

# Columns of the labelled dataset.
JOIN = "join_key"  # what the row was matched to its label by (the key, the url's stem, ...)
SPLIT = "split"  # TRAIN / VALIDATION / TEST
SCORE = "score"  # the label (float64): a score, or 1/0 for keep/trash
VOTES = "votes"  # (10,) vote counts, where the labels have them
EMBEDDING = schema.EMBEDDING  # (D,) float32
PREDICTION = "prediction"

TRAIN_DATASET, VALIDATION_DATASET = "train", "val"
CHECKPOINT_FILE = "best.pt"
_SHUFFLE_BATCHES = 8  # the local shuffle buffer holds this many worker batches


# -- the labelled rows ---------------------------------------------------------------------------


def _label_arrays(labels: LabelTable) -> dict[str, Any]:
    return {"token": uuid.uuid4().hex, "keys": np.asarray(labels.keys, dtype=object),
            "scores": np.asarray(labels.scores, dtype=np.float64),
            "votes": None if labels.votes is None else np.asarray(labels.votes, dtype=np.float32)}


_label_index: dict[str, pd.Index] = {}  # per worker process: the label keys' index, built once per label table


def _index_of(labels: Mapping[str, Any]) -> pd.Index:
    index = _label_index.get(labels["token"])
    if index is None:
        _label_index.clear()
        index = _label_index[labels["token"]] = pd.Index(labels["keys"])
    return index


def _join_labels(table: pa.Table, *, labels: Mapping[str, Any], join_on: str, dim: int, val_fraction: float,
                 test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """One batch of scored rows -> its ``ok`` rows that have a label, with the label and the split."""
    if schema.STATUS in table.column_names:
        table = table.filter(pc.equal(table[schema.STATUS], schema.Status.OK.value))
    keys = join_keys(table, join_on)
    positions = _index_of(labels).get_indexer(pd.Index(keys)) if len(keys) else np.empty(0, dtype=np.int64)
    matched = np.flatnonzero(positions >= 0)
    rows = positions[matched]
    embeddings = embedding_matrix(table.take(pa.array(matched, type=pa.int64())))
    if embeddings.shape[1] != dim:
        raise ScoredDataError(f"embeddings of {embeddings.shape[1]} dimensions in a scored output of {dim}")
    batch = {
        JOIN: np.asarray(keys[matched], dtype=object),
        SPLIT: split_assignments(keys[matched], val_fraction, test_fraction, seed),
        SCORE: labels["scores"][rows],
        EMBEDDING: embeddings,
    }
    if labels["votes"] is not None:
        batch[VOTES] = labels["votes"][rows].reshape(-1, AVA_VOTE_BINS)
    return batch


def _only_splits(batch: dict[str, np.ndarray], *, splits: tuple[int, ...],
                 columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    keep = np.isin(batch[SPLIT], splits)
    return {name: batch[name][keep] for name in columns}


def _schemas(fs: Any, files: list[str]) -> list[pa.Schema]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        return list(pool.map(lambda path: pq.read_schema(path, filesystem=fs), files))


@dataclass(frozen=True, eq=False)
class LabelledRows:
    """The labelled rows of a scored output as a Ray Data dataset (lazy: nothing is read until it runs)."""

    dataset: Any  # ray.data.Dataset with JOIN, SPLIT, SCORE, EMBEDDING (and VOTES)
    embed_dim: int
    has_votes: bool
    files: int

    def rows_of(self, *splits: int, columns: tuple[str, ...]) -> Any:
        return self.dataset.map_batches(_only_splits, batch_format="numpy", batch_size=None,
                                        fn_kwargs={"splits": splits, "columns": columns})

    @property
    def training_columns(self) -> tuple[str, ...]:
        return (EMBEDDING, SCORE, VOTES) if self.has_votes else (EMBEDDING, SCORE)


def labelled_rows(scores: str, labels: LabelTable, config: TrainConfig, join_on: str = JOIN_KEY,
                  storage_options: Mapping[str, Any] | None = None) -> LabelledRows:
    """The scored output's ``ok`` rows that have a label, streamed from its Parquet files, split by key hash."""
    import ray
    from ray.data.context import ShuffleStrategy

    fs, files = data_files(scores, storage_options)
    if not files:
        raise ScoredDataError(f"{scores}: no Parquet files (no committed units, and no .parquet under it)")
    schemas = _schemas(fs, files)
    for name in (EMBEDDING, *join_columns(join_on)):
        lacking = [path for path, file_schema in zip(files, schemas) if name not in file_schema.names]
        if lacking:
            raise ScoredDataError(f"{scores}: {len(lacking)} of {len(files)} files have no column {name!r} "
                                  f"(e.g. {lacking[0]})" + ("; score with --write-embeddings to keep embeddings"
                                                            if name == EMBEDDING else ""))
    types = {file_schema.field(EMBEDDING).type for file_schema in schemas}
    if len(types) != 1 or not is_embedding_type(next(iter(types))):
        raise ScoredDataError(f"{scores}: embedding columns of type(s) {sorted(map(str, types))}, expected one "
                              "list of floats")
    kind = next(iter(types))
    # A stored list<float> does not carry its width in its type: the first row tells.
    dim = kind.list_size if pa.types.is_fixed_size_list(kind) else embedding_width(fs, files)
    columns = [EMBEDDING, *join_columns(join_on)]
    if all(schema.STATUS in file_schema.names for file_schema in schemas):
        columns.append(schema.STATUS)
    dataset = ray.data.read_parquet(files, filesystem=pyarrow_filesystem(fs), partitioning=None)
    # The only shuffle these rows see is the statistics' key-less aggregation: the sort-based strategy runs it
    # as map tasks and one reduce task, where the default one first starts aggregator actors (seconds, for an
    # accumulator of a few kilobytes). The dataset has its own copy of the context.
    dataset.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    dataset = dataset.select_columns(list(dict.fromkeys(columns)))
    dataset = dataset.map_batches(
        _join_labels, batch_format="pyarrow", batch_size=None,
        fn_kwargs=dict(labels=_label_arrays(labels), join_on=join_on, dim=dim, val_fraction=config.val_fraction,
                       test_fraction=config.test_fraction, seed=config.seed))
    return LabelledRows(dataset, dim, labels.votes is not None, len(files))


# -- conditioning: one aggregation pass ----------------------------------------------------------


def _moments(values: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(count, mean, sum of squared deviations) per column of (N, K) float64 values."""
    mean = values.mean(axis=0)
    return float(len(values)), mean, ((values - mean) ** 2).sum(axis=0)


def _merge_moments(a: tuple[float, np.ndarray, np.ndarray],
                   b: tuple[float, np.ndarray, np.ndarray]) -> tuple[float, np.ndarray, np.ndarray]:
    """Chan et al.'s parallel combination of two (count, mean, M2)."""
    (na, mean_a, m2_a), (nb, mean_b, m2_b) = a, b
    if na == 0:
        return b
    if nb == 0:
        return a
    n = na + nb
    delta = mean_b - mean_a
    return n, mean_a + delta * (nb / n), m2_a + m2_b + delta ** 2 * (na * nb / n)


@dataclass(frozen=True)
class TrainingStatistics:
    """What the conditioning needs, from one pass over the labelled rows."""

    rows: dict[str, int]  # per split name
    nonfinite: int  # rows whose embedding or label is not finite
    input_mean: np.ndarray  # (D,) over the training split
    input_std: np.ndarray  # (D,) sample std (ddof 1), as torch.std
    label_mean: float
    label_std: float
    vote_spread: float  # mean std of the training rows' vote distributions (where the EMD spread starts)


def _statistics_aggregation(dim: int, has_votes: bool) -> Any:
    """A Ray Data aggregation whose accumulator is one flat float64 vector:
    ``[train, val, test, nonfinite, spread_sum, n, mean(D + 1), m2(D + 1)]`` (the last column is the label)."""
    from ray.data.aggregate import AggregateFnV2
    from ray.data.block import BlockAccessor

    width = dim + 1
    head = 6  # train, val, test, nonfinite, spread_sum, n

    def unpack(accumulator: Any) -> tuple[np.ndarray, tuple[float, np.ndarray, np.ndarray]]:
        flat = np.asarray(accumulator, dtype=np.float64)
        return flat[:head], (float(flat[head - 1]), flat[head:head + width], flat[head + width:])

    def pack(counts: np.ndarray, moments: tuple[float, np.ndarray, np.ndarray]) -> np.ndarray:
        counts = counts.copy()
        counts[head - 1] = moments[0]
        return np.concatenate([counts, moments[1], moments[2]])

    class LabelledStatistics(AggregateFnV2):
        def __init__(self) -> None:
            super().__init__("labelled_statistics", zero_factory=lambda: None, on=None, ignore_nulls=True)

        def aggregate_block(self, block: Any) -> np.ndarray | None:
            accessor = BlockAccessor.for_block(block)
            if accessor.num_rows() == 0:
                return None
            columns = accessor.to_numpy([SPLIT, SCORE, EMBEDDING, *([VOTES] if has_votes else [])])
            split = np.asarray(columns[SPLIT])
            values = np.concatenate([np.asarray(columns[EMBEDDING], dtype=np.float64).reshape(len(split), dim),
                                     np.asarray(columns[SCORE], dtype=np.float64)[:, None]], axis=1)
            finite = np.isfinite(values).all(axis=1)
            train = (split == TRAIN) & finite
            counts = np.zeros(head)
            counts[:3] = [np.sum(split == code) for code in (TRAIN, VALIDATION, TEST)]
            counts[3] = np.sum(~finite)
            if has_votes and train.any():
                votes = np.asarray(columns[VOTES], dtype=np.float64).reshape(len(split), AVA_VOTE_BINS)[train]
                share = votes / votes.sum(axis=1, keepdims=True)
                bins = np.arange(1, AVA_VOTE_BINS + 1)
                centre = (share * bins).sum(axis=1, keepdims=True)
                counts[4] = np.sqrt((share * (bins - centre) ** 2).sum(axis=1)).sum()
            moments = _moments(values[train]) if train.any() else (0.0, np.zeros(width), np.zeros(width))
            return pack(counts, moments)

        def combine(self, current: Any, new: Any) -> np.ndarray:
            counts_a, moments_a = unpack(current)
            counts_b, moments_b = unpack(new)
            return pack(counts_a + counts_b, _merge_moments(moments_a, moments_b))

    return LabelledStatistics(), unpack


def training_statistics(rows: LabelledRows) -> TrainingStatistics:
    """Rows per split and the training split's input and label mean and std, by a Ray Data aggregation."""
    aggregation, unpack = _statistics_aggregation(rows.embed_dim, rows.has_votes)
    result = rows.dataset.aggregate(aggregation)
    accumulator = None if result is None else result[aggregation.name]
    if accumulator is None:
        return TrainingStatistics({name: 0 for name in SPLIT_NAMES.values()}, 0, np.zeros(rows.embed_dim),
                                  np.ones(rows.embed_dim), 0.0, 1.0, 1.0)
    counts, (n, mean, m2) = unpack(accumulator)
    std = np.sqrt(m2 / (n - 1)) if n > 1 else np.ones_like(m2)
    return TrainingStatistics(
        rows={SPLIT_NAMES[code]: int(counts[code]) for code in (TRAIN, VALIDATION, TEST)},
        nonfinite=int(counts[3]), input_mean=mean[:-1], input_std=std[:-1], label_mean=float(mean[-1]),
        label_std=float(std[-1]), vote_spread=float(counts[4] / n) if n else 1.0)


# -- the training loop (runs in each Ray Train worker) -------------------------------------------


def _tensors(batch: Mapping[str, torch.Tensor], has_votes: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                         torch.Tensor | None]:
    votes = None
    if has_votes:
        counts = batch[VOTES].float()
        votes = counts / counts.sum(dim=1, keepdim=True)
    return batch[EMBEDDING].float(), batch[SCORE].float(), votes


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


def train_worker(loop: Mapping[str, Any]) -> None:
    """One Ray Train worker: DDP over its shards, the validation loss all-reduced, early stopping, and a
    checkpoint of the best weights reported (by rank 0) whenever the validation loss improves and at the end."""
    import contextlib

    import ray.train
    import ray.train.torch
    import torch

    from pipeline.training.train_head import conditioned_head, improves

    config: TrainConfig = loop["config"]
    has_votes = config.loss == "emd"
    torch.manual_seed(config.seed)
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()

    module = conditioned_head(config, loop["dim"], torch.as_tensor(loop["input_mean"]),
                              torch.as_tensor(loop["input_scale"]), loop["output_mean"], loop["output_scale"],
                              loop["initial_sigma"])
    # DDP broadcasts rank 0's initial weights; the conditioning buffers are equal everywhere already.
    model = ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"broadcast_buffers": False})
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay)
    uneven = model.join if isinstance(model, torch.nn.parallel.DistributedDataParallel) else contextlib.nullcontext

    train_shard = ray.train.get_dataset_shard(TRAIN_DATASET)
    val_shard = ray.train.get_dataset_shard(VALIDATION_DATASET)
    batch_size = loop["worker_batch_size"]

    best_loss, best_epoch, stale_epochs, best_state = math.inf, 0, 0, {}
    history: list[dict[str, float]] = []
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # train loss, train rows, val loss, val rows
        with uneven():
            for batch in train_shard.iter_torch_batches(
                    batch_size=batch_size, local_shuffle_buffer_size=_SHUFFLE_BATCHES * batch_size,
                    local_shuffle_seed=config.seed + 1000 * epoch + rank, device=device):
                x, y, votes = _tensors(batch, has_votes)
                optimizer.zero_grad(set_to_none=True)
                loss = model(x, y, votes)
                loss.backward()
                optimizer.step()
                sums[0] += float(loss.detach()) * len(y)
                sums[1] += len(y)
        module.eval()  # the unwrapped module: validation needs no gradient sync, so shards may be uneven
        with torch.no_grad():
            for batch in val_shard.iter_torch_batches(batch_size=max(batch_size, 1024), device=device):
                x, y, votes = _tensors(batch, has_votes)
                sums[2] += float(module(x, y, votes)) * len(y)
                sums[3] += len(y)
        sums = _all_reduce(sums)
        train_loss, val_loss = float(sums[0] / sums[1]), float(sums[2] / sums[3])
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        improved = epoch == 1 or improves(val_loss, best_loss)
        if improved:
            best_loss, best_epoch, stale_epochs = val_loss, epoch, 0
            best_state = {"head": {key: value.detach().to("cpu", copy=True)
                                   for key, value in module.head.state_dict().items()},
                          "emd_sigma": float(module.objective.sigma.detach())}
        else:
            stale_epochs += 1
        stop = stale_epochs >= config.patience or epoch == config.max_epochs
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "best_epoch": best_epoch,
                   "best_val_loss": best_loss}
        # Ray Train keeps metrics only with checkpoints, so the last checkpoint (the best weights so far, and at
        # the end the whole history) is what the driver reads; every worker reports as often as rank 0.
        checkpoints.report(metrics, {**best_state, "best_epoch": best_epoch, "best_val_loss": best_loss,
                                     "epochs_run": epoch, "history": history}
                           if rank == 0 and (improved or stop) else None, CHECKPOINT_FILE)
        if stop:
            break


# -- the driver ----------------------------------------------------------------------------------


def _predict_rows(batch: dict[str, np.ndarray], *, head: TrainedHead) -> dict[str, np.ndarray]:
    return {SPLIT: batch[SPLIT], SCORE: batch[SCORE], PREDICTION: head.predict(batch[EMBEDDING])}


def evaluate_splits(rows: LabelledRows, trained: TrainedHead, splits: tuple[int, ...] = (VALIDATION, TEST)
                    ) -> dict[str, dict[str, float]]:
    """Metrics per split of the exported head's predictions, streamed: only predictions and labels (and the
    split) come back to the driver, in batches."""
    from pipeline.training.train_head import split_metrics

    predicted = rows.rows_of(*splits, columns=(SPLIT, SCORE, EMBEDDING)).map_batches(
        _predict_rows, batch_format="numpy", fn_kwargs={"head": trained})
    parts: dict[str, list[np.ndarray]] = {SPLIT: [], SCORE: [], PREDICTION: []}
    for batch in predicted.iter_batches(batch_format="numpy", batch_size=None):
        for name, values in parts.items():
            values.append(np.asarray(batch[name]))
    split, labels, predictions = (np.concatenate(parts[name]) if parts[name] else np.empty(0)
                                  for name in (SPLIT, SCORE, PREDICTION))
    metrics = {}
    for code in splits:
        mine = split == code
        if mine.any():
            metrics[SPLIT_NAMES[code]] = split_metrics(predictions[mine], labels[mine], trained.label_kind,
                                                       trained.config)
    return metrics


def _use_gpu(device: str) -> bool:
    if device == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) >= 1
    return device == "cuda"


def train_distributed(scores: str, labels: LabelTable, config: TrainConfig | None = None, *, workers: int,
                      join_on: str = JOIN_KEY, ray_address: str | None = None, cpus_per_worker: float = 1.0,
                      use_gpu: bool | None = None, cache: bool = False, storage_path: str | None = None,
                      storage_options: Mapping[str, Any] | None = None) -> TrainedHead:
    """Train one head data-parallel over ``workers`` Ray Train workers on the labelled rows of ``scores``
    (see the module docstring); returns it in file format, ready for :func:`~pipeline.training.train_head.
    save_head`.

    ``use_gpu`` defaults to ``config.device`` (``auto``: when the cluster has GPUs). With ``cache`` the labelled
    rows are materialised once in the cluster's object stores (spread over the nodes, spilled to disk when
    full) instead of being read from the Parquet files again every epoch. ``storage_path`` is where
    Ray Train keeps the checkpoint (default a temporary local folder, removed afterwards: give a shared path,
    e.g. ``s3://...``, on a multi-node cluster).
    """
    import torch
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_session import connect_ray
    from pipeline.training.train_head import (
        TrainConfig,
        TrainedHead,
        check_loss,
        check_split_rows,
        conditioned_head,
        floored_scale,
        output_conditioning,
        resolve_loss,
    )

    started = time.monotonic()
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if cpus_per_worker < 0:
        raise ConfigError(f"cpus_per_worker must be >= 0, got {cpus_per_worker}")
    config = resolve_loss(config or TrainConfig(), labels.kind)
    check_loss(config, labels.kind, labels.votes is not None)
    connect_ray(ray_address)

    rows = labelled_rows(scores, labels, config, join_on, storage_options)
    if cache:
        rows = dataclasses.replace(rows, dataset=rows.dataset.materialize())
    statistics = training_statistics(rows)
    log.info("labelled rows %s from %d files, conditioning statistics in %.1f s", statistics.rows, rows.files,
             time.monotonic() - started)
    if not sum(statistics.rows.values()):
        raise ConfigError(f"no scored ok row matches a label (joined on {join_on!r}); "
                          "try --join-on url_stem or check the keys")
    check_split_rows(statistics.rows)
    if statistics.nonfinite:
        raise ConfigError(f"training data has non-finite embeddings or labels ({statistics.nonfinite} rows)")
    if min(statistics.rows["train"], statistics.rows["val"]) < workers:
        raise ConfigError(f"too few labelled rows for {workers} workers: {statistics.rows} (each worker needs "
                          "at least one training and one validation row)")

    input_scale = floored_scale(torch.from_numpy(statistics.input_std)).numpy()
    output_mean, output_scale = output_conditioning(config.loss, statistics.label_mean, statistics.label_std)
    initial_sigma = statistics.vote_spread if config.loss == "emd" else 1.0
    loop = dict(config=config, dim=rows.embed_dim, input_mean=statistics.input_mean.astype(np.float32),
                input_scale=input_scale.astype(np.float32), output_mean=output_mean, output_scale=output_scale,
                initial_sigma=initial_sigma, worker_batch_size=max(1, math.ceil(config.batch_size / workers)))
    columns = rows.training_columns if config.loss == "emd" else (EMBEDDING, SCORE)
    use_gpu = _use_gpu(config.device) if use_gpu is None else use_gpu

    owned_storage = storage_path is None
    storage_path = storage_path or tempfile.mkdtemp(prefix="aesthetics-train-head-")
    try:
        trainer = TorchTrainer(
            train_worker, train_loop_config=loop,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(name=f"train-head-{uuid.uuid4().hex[:8]}", storage_path=storage_path,
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)),
            datasets={TRAIN_DATASET: rows.rows_of(TRAIN, columns=columns),
                      VALIDATION_DATASET: rows.rows_of(VALIDATION, columns=columns)})
        fit_started = time.monotonic()
        result = trainer.fit()
        log.info("Ray Train: %d workers in %.1f s", workers, time.monotonic() - fit_started)
        if result.checkpoint is None:
            raise RuntimeError("Ray Train finished without a checkpoint of the best weights")
        best = checkpoints.load(result.checkpoint, CHECKPOINT_FILE)
    finally:
        if owned_storage:
            shutil.rmtree(storage_path, ignore_errors=True)

    best_head = conditioned_head(config, rows.embed_dim, torch.from_numpy(loop["input_mean"]),
                                 torch.from_numpy(loop["input_scale"]), output_mean, output_scale)
    best_head.head.load_state_dict(best["head"])
    trained = TrainedHead(best_head.eval().export(), config, rows.embed_dim, labels.kind, np.empty(0, dtype=np.int8),
                          int(best["best_epoch"]), int(best["epochs_run"]), list(best["history"]), {},
                          emd_sigma=float(best["emd_sigma"]) if config.loss == "emd" else None,
                          extra={"distributed": {"workers": workers, "use_gpu": use_gpu, "files": rows.files}},
                          split_rows=statistics.rows)
    trained.metrics = evaluate_splits(rows, trained)
    trained.seconds = time.monotonic() - started
    log.info("trained %s/%s on %d workers: best epoch %d of %d, val %s", config.arch, config.loss, workers,
             trained.best_epoch, trained.epochs_run, trained.metrics.get("val"))
    return trained
