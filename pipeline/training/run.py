"""The train-head job: labels + a scored output's embeddings -> the best head of a grid, its record, and
(optionally) the unlabelled images it is least sure about."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pipeline import schema
from pipeline.config import ConfigError
from pipeline.training.active import label_sheet, nearest_to_boundary, sheet_extras, sheet_keys, write_label_sheet
from pipeline.training.labels import LabelKind, LabelTable, read_labels
from pipeline.training.scored import JOIN_KEY, align, embedding_matrix, join_columns, join_keys, read_scored
from pipeline.training.train_head import (
    TrainConfig,
    TrainedHead,
    TrainingSet,
    config_grid,
    record_path_for,
    save_head,
    train_many,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class TrainReport:
    record: dict[str, Any]  # what was written beside the head (sha256, metrics, config)
    trials: list[TrainedHead]  # every trial, best first
    labelled_rows: int
    unmatched_labels: int
    uncertain_file: str | None = None


def decision_boundary(config: TrainConfig, label_kind: str, keep_threshold: float | None) -> float:
    """Where the trained head's scores separate keep from trash."""
    if config.loss == "bce":
        return 0.0  # a logit
    if label_kind == LabelKind.BINARY:
        return 0.5  # a regression on 0/1 labels
    return config.threshold if keep_threshold is None else keep_threshold


def prepare_labels(labels: LabelTable, keep_threshold: float | None, keep_percentile: float | None) -> LabelTable:
    if keep_threshold is None and keep_percentile is None:
        return labels
    if labels.kind == LabelKind.BINARY:
        raise ConfigError("the labels are keep/trash already; a keep threshold or percentile needs score labels")
    return labels.keep_trash(keep_threshold, keep_percentile)


def run_train_head(scores: str, labels_path: str, out: str, *, label_format: str = "auto",
                   join_on: str = JOIN_KEY, keep_threshold: float | None = None,
                   keep_percentile: float | None = None, config: TrainConfig = TrainConfig(),
                   grid: Mapping[str, Sequence[Any]] | None = None, use_ray: bool = False,
                   ray_address: str | None = None, cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0,
                   uncertain_count: int = 0, uncertain_out: str | None = None,
                   max_cosine: float | None = None, workers: int | None = None, train_storage: str | None = None,
                   storage_options: Mapping[str, Any] | None = None) -> TrainReport:
    """Train one head per grid point, save the best at ``out`` (+ ``.json``), and list uncertain images.

    With ``workers`` the one config trains data-parallel with Ray Train over that many workers, each asking for
    ``cpus_per_trial`` CPUs (and a GPU where ``config.device`` says so; ``auto``: when the cluster has GPUs), with
    its checkpoint under ``train_storage`` (default a temporary local folder; a shared path on a multi-node
    cluster), see :mod:`pipeline.training.distributed`: the embeddings are streamed to the workers, never
    gathered here, so there is no uncertain-image list (``select-uncertain --head`` makes one afterwards).
    """
    labels = prepare_labels(read_labels(labels_path, label_format, storage_options), keep_threshold, keep_percentile)
    if workers is not None:
        return _run_distributed(scores, labels_path, labels, out, join_on=join_on, keep_threshold=keep_threshold,
                                keep_percentile=keep_percentile, config=config, grid=grid, ray_address=ray_address,
                                uncertain_count=uncertain_count, workers=workers, cpus_per_worker=cpus_per_trial,
                                train_storage=train_storage, storage_options=storage_options)
    table = read_scored(scores, [schema.EMBEDDING, *join_columns(join_on)], storage_options, optional=[schema.URL])
    scored_keys = join_keys(table, join_on)
    matched = align(scored_keys, labels)
    if not len(matched.rows):
        raise ConfigError(f"no scored ok row matches a label (joined on {join_on!r}); "
                          "try --join-on url_stem or check the keys")
    embeddings = embedding_matrix(table)
    data = TrainingSet.from_labels(scored_keys[matched.rows], embeddings[matched.rows], labels, matched.labels)
    trials = train_many(data, config_grid(config, **(grid or {})), use_ray=use_ray, ray_address=ray_address,
                        cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial)
    best = trials[0]
    best.extra.update(labels=labels_path, scored=scores, join_on=join_on,
                      keep_threshold=keep_threshold, keep_percentile=keep_percentile,
                      trials=[{"config": dataclasses.asdict(t.config), "val": t.metrics["val"]} for t in trials])
    record = save_head(best, out, storage_options)

    uncertain_file = None
    if uncertain_count > 0:
        if not len(matched.unlabelled_rows):
            log.warning("every scored row is labelled: no uncertain images to list")
        else:
            uncertain_file = uncertain_out or record_path_for(out).removesuffix(".json") + "-uncertain.csv"
            rows = matched.unlabelled_rows
            unlabelled_scores = best.predict(embeddings[rows])
            boundary = decision_boundary(best.config, labels.kind, keep_threshold)
            picks = nearest_to_boundary(unlabelled_scores, boundary, uncertain_count, embeddings[rows], max_cosine)
            sheet = label_sheet(sheet_keys(table, join_on)[rows], unlabelled_scores, boundary, picks,
                                {name: values[rows] for name, values in sheet_extras(table, join_on).items()})
            write_label_sheet(sheet, uncertain_file, storage_options)
    return TrainReport(record, trials, len(matched.rows), matched.unmatched_labels, uncertain_file)


def _run_distributed(scores: str, labels_path: str, labels: LabelTable, out: str, *, join_on: str,
                     keep_threshold: float | None, keep_percentile: float | None, config: TrainConfig,
                     grid: Mapping[str, Sequence[Any]] | None, ray_address: str | None, uncertain_count: int,
                     workers: int, cpus_per_worker: float, train_storage: str | None,
                     storage_options: Mapping[str, Any] | None) -> TrainReport:
    from pipeline.training.distributed import train_distributed

    configs = config_grid(config, **(grid or {}))
    if len(configs) > 1:
        raise ConfigError(f"data-parallel training (workers={workers}) trains one config, but the grid has "
                          f"{len(configs)}: give one value per setting, or drop --workers to train the grid as "
                          "Ray tasks (--ray)")
    if uncertain_count > 0:
        raise ConfigError("data-parallel training does not list uncertain images (that needs the embeddings in "
                          "one process): run `aesthetics select-uncertain --head <the head file>` afterwards")
    trained = train_distributed(scores, labels, configs[0], workers=workers, join_on=join_on,
                                ray_address=ray_address, cpus_per_worker=cpus_per_worker, storage_path=train_storage,
                                storage_options=storage_options)
    trained.extra.update(labels=labels_path, scored=scores, join_on=join_on, keep_threshold=keep_threshold,
                         keep_percentile=keep_percentile,
                         trials=[{"config": dataclasses.asdict(trained.config), "val": trained.metrics["val"]}])
    record = save_head(trained, out, storage_options)
    labelled = sum(trained.rows_per_split.values())
    # Counted from rows, not keys: a key scored twice counts twice here, so this is a lower bound.
    return TrainReport(record, [trained], labelled, max(0, len(labels) - labelled), None)
