"""Compare score columns with human labels: correlation, error, binary accuracy, and burst selection.

Per score column (a head, a prompt set, a quality metric, ...):

- ``plcc`` Pearson and ``srcc`` Spearman correlation with the label (Spearman = Pearson of average ranks,
  ties averaged, as ``scipy.stats.spearmanr``);
- ``mse``, ``mae`` in label units (meaningful only for columns on the label's scale, e.g. a head trained on
  AVA against AVA means);
- ``accuracy``: label >= ``threshold`` (5 for AVA) against score >= ``prediction_threshold`` (the same
  threshold unless given), and ``accuracy_rate_matched``: the score cut where as many images are predicted
  good as are labelled good, a fair comparison for columns on any scale;
- for grouped data (bursts of near-identical shots, one group id per image), over groups of 2 or more:
  ``top1`` the share of groups whose highest-scoring image is one of the best-labelled ones, ``mrr`` the mean
  reciprocal rank of the first best-labelled image in score order, and ``top1_random`` what picking at
  random would get.

:func:`run_evaluate` reads a scored output and a label file, and writes the table (CSV and Markdown) and a
plot (PNG).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline import schema
from pipeline.config import ConfigError
from pipeline.io.storage import filesystem, write_bytes_atomic
from pipeline.training.labels import AVA_BINARY_THRESHOLD, LabelKind, LabelTable, read_labels
from pipeline.training.scored import JOIN_KEY, align, column_names, join_columns, join_keys, read_scored

MIN_GROUP_SIZE = 2
COUNT_METRICS = ("n", "groups")
MAX_SCATTER_PANELS = 8
HEXBIN_ABOVE = 5000  # points: beyond this a scatter is a blot, a density plot shows more


def rank_average(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (``scipy.stats.rankdata(method="average")``)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Runs of equal values share the mean of the ranks they span.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_ranks = (starts + ends + 1) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_ranks, ends - starts)
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; NaN with fewer than 2 points or a constant input."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy / denominator) if denominator > 0 else math.nan


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(rank_average(x), rank_average(y))


def score_metrics(predictions: np.ndarray, labels: np.ndarray, threshold: float = AVA_BINARY_THRESHOLD,
                  prediction_threshold: float | None = None) -> dict[str, float]:
    """Correlation, error and binary accuracy of ``predictions`` against ``labels`` (finite pairs only)."""
    predictions = np.asarray(predictions, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    finite = np.isfinite(predictions) & np.isfinite(labels)
    predictions, labels = predictions[finite], labels[finite]
    n = len(labels)
    if n == 0:
        return dict(n=0, plcc=math.nan, srcc=math.nan, mse=math.nan, mae=math.nan, accuracy=math.nan,
                    accuracy_rate_matched=math.nan)
    truth = labels >= threshold
    cut = threshold if prediction_threshold is None else prediction_threshold
    # Rate-matched cut: the score above which as many images fall as are labelled good.
    good_share = truth.mean()
    matched_cut = np.quantile(predictions, 1.0 - good_share) if 0 < good_share < 1 else cut
    errors = predictions - labels
    return dict(
        n=n,
        plcc=pearson(predictions, labels),
        srcc=spearman(predictions, labels),
        mse=float(np.mean(errors ** 2)),
        mae=float(np.mean(np.abs(errors))),
        accuracy=float(np.mean((predictions >= cut) == truth)),
        accuracy_rate_matched=float(np.mean((predictions >= matched_cut) == truth)),
    )


def group_metrics(predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy and MRR of picking each group's best-labelled image by score (groups of 2 or more)."""
    frame = pd.DataFrame({"group": np.asarray(groups, dtype=object), "score": np.asarray(predictions, np.float64),
                          "label": np.asarray(labels, np.float64)})
    frame = frame[np.isfinite(frame["score"]) & np.isfinite(frame["label"]) & frame["group"].notna()]
    size = frame.groupby("group")["label"].transform("size")
    frame = frame[size >= MIN_GROUP_SIZE]
    if frame.empty:
        return dict(groups=0, top1=math.nan, mrr=math.nan, top1_random=math.nan)
    frame = frame.assign(best=frame["label"] == frame.groupby("group")["label"].transform("max"))
    # Highest score first; a tie in score keeps file order (mergesort is stable).
    frame = frame.sort_values(["group", "score"], ascending=[True, False], kind="mergesort")
    frame["position"] = frame.groupby("group").cumcount()
    first_best = frame[frame["best"]].groupby("group")["position"].min() + 1
    by_group = frame.groupby("group")
    return dict(
        groups=int(len(first_best)),
        top1=float((first_best == 1).mean()),
        mrr=float((1.0 / first_best).mean()),
        top1_random=float((by_group["best"].sum() / by_group.size()).mean()),
    )


def evaluate_columns(frame: pd.DataFrame, score_columns: Sequence[str], label_column: str = "label",
                     threshold: float = AVA_BINARY_THRESHOLD, prediction_threshold: float | None = None,
                     group_column: str | None = None) -> pd.DataFrame:
    """One metrics row per score column of ``frame`` (which also holds the label and optional group)."""
    rows = []
    for column in score_columns:
        metrics = {"column": column, **score_metrics(frame[column].to_numpy(), frame[label_column].to_numpy(),
                                                     threshold, prediction_threshold)}
        if group_column is not None:
            metrics.update(group_metrics(frame[column].to_numpy(), frame[label_column].to_numpy(),
                                         frame[group_column].to_numpy()))
        rows.append(metrics)
    return pd.DataFrame(rows).set_index("column")


def to_markdown(metrics: pd.DataFrame) -> str:
    """The metrics table as Markdown: counts as integers, the rest to four decimals."""
    from tabulate import tabulate

    rows = [[str(name)] + [str(int(value)) if metric in COUNT_METRICS and math.isfinite(value) else f"{value:.4f}"
                           for metric, value in row.items()] for name, row in metrics.iterrows()]
    return tabulate(rows, headers=["column", *metrics.columns], tablefmt="pipe", disable_numparse=True)


def plot_evaluation(frame: pd.DataFrame, metrics: pd.DataFrame, label_column: str = "label",
                    title: str = "") -> bytes:
    """A PNG: SRCC and PLCC per column, then label-vs-score panels for the first columns."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes or CI
    import matplotlib.pyplot as plt

    columns = list(metrics.index)[:MAX_SCATTER_PANELS]
    panels = 1 + len(columns)
    across = min(3, panels)
    down = math.ceil(panels / across)
    figure, axes = plt.subplots(down, across, figsize=(4.2 * across, 3.6 * down), squeeze=False)
    flat = axes.ravel()

    bars = flat[0]
    positions = np.arange(len(metrics))
    bars.barh(positions - 0.2, metrics["srcc"].fillna(0), height=0.4, label="SRCC")
    bars.barh(positions + 0.2, metrics["plcc"].fillna(0), height=0.4, label="PLCC")
    bars.set_yticks(positions, [str(c) for c in metrics.index], fontsize=7)
    bars.invert_yaxis()
    bars.axvline(0, color="black", linewidth=0.5)
    lowest = float(np.nanmin(metrics[["srcc", "plcc"]].to_numpy(dtype=np.float64), initial=0.0))
    bars.set_xlim(min(0.0, lowest) - 0.05, 1.0)  # correlations: a fixed right edge compares plots by eye
    bars.set_xlabel("correlation with label")
    bars.legend(fontsize=7)

    labels = frame[label_column].to_numpy(dtype=np.float64)
    for axis, column in zip(flat[1:], columns):
        scores = frame[column].to_numpy(dtype=np.float64)
        finite = np.isfinite(scores) & np.isfinite(labels)
        if finite.sum() > HEXBIN_ABOVE:
            axis.hexbin(labels[finite], scores[finite], gridsize=40, mincnt=1, bins="log", cmap="viridis")
        else:
            axis.scatter(labels[finite], scores[finite], s=6, alpha=0.5)
        row = metrics.loc[column]
        axis.set_title(f"{column}\nSRCC {row['srcc']:.3f}  PLCC {row['plcc']:.3f}  n={int(row['n'])}", fontsize=8)
        axis.set_xlabel("label", fontsize=8)
        axis.set_ylabel("score", fontsize=8)
    for axis in flat[panels:]:
        axis.set_visible(False)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


@dataclass(frozen=True, eq=False)
class Evaluation:
    metrics: pd.DataFrame  # one row per score column
    frame: pd.DataFrame  # the matched rows: key, label, [group], score columns
    unmatched_labels: int
    threshold: float

    def to_markdown(self) -> str:
        return to_markdown(self.metrics)


def default_score_columns(available: Sequence[str]) -> list[str]:
    """Every score column: the primary score, then ``score_*`` (heads, prompt sets) in file order."""
    return [c for c in available if c == schema.AESTHETIC_SCORE or c.startswith(schema.SCORE_PREFIX)]


def evaluate_scored(source: str, labels: LabelTable, columns: Sequence[str] | None = None, join_on: str = JOIN_KEY,
                    threshold: float | None = None, prediction_threshold: float | None = None,
                    group_column: str | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> Evaluation:
    """Match a scored output's ok rows to ``labels`` and compute :func:`evaluate_columns`.

    Groups come from the labels (a ``group`` column) or, failing that, from ``group_column`` of the scored data.
    """
    if columns is None:
        columns = default_score_columns(column_names(source, storage_options))
    if not columns:
        raise ConfigError(f"{source}: no score columns to evaluate")
    scored_group = group_column if labels.groups is None and group_column else None
    needed = [*columns, *join_columns(join_on), *([scored_group] if scored_group else [])]
    table = read_scored(source, needed, storage_options)
    matched = align(join_keys(table, join_on), labels)
    if not len(matched.rows):
        raise ConfigError(f"no scored ok row matches a label (joined on {join_on!r}); "
                          f"try --join-on url_stem or check the keys")
    frame = pd.DataFrame({"key": table[schema.KEY].to_numpy(zero_copy_only=False)[matched.rows],
                          "label": labels.scores[matched.labels]})
    group_name = None
    if labels.groups is not None:
        frame["group"], group_name = labels.groups[matched.labels], "group"
    elif scored_group:
        frame["group"], group_name = table[scored_group].to_numpy(zero_copy_only=False)[matched.rows], "group"
    for column in columns:
        frame[column] = table[column].to_numpy(zero_copy_only=False)[matched.rows].astype(np.float64)
    if threshold is None:
        threshold = 0.5 if labels.kind == LabelKind.BINARY else AVA_BINARY_THRESHOLD
    metrics = evaluate_columns(frame, columns, "label", threshold, prediction_threshold, group_name)
    return Evaluation(metrics, frame, matched.unmatched_labels, threshold)


def evaluate_outputs(sources: Mapping[str, str], labels: LabelTable, columns: Sequence[str] | None = None,
                     join_on: str = JOIN_KEY, threshold: float | None = None, prediction_threshold: float | None = None,
                     group_column: str | None = None,
                     storage_options: Mapping[str, Any] | None = None) -> Evaluation:
    """:func:`evaluate_scored` over several scored outputs at once (name -> output; e.g. the frozen-CLIP head's
    output beside a fine-tuned model's), on the labelled rows every output scored, each output's columns
    named ``<name>:<column>``: one table, the same rows, so the columns compare like for like."""
    if len(sources) == 1:
        (source,) = sources.values()
        return evaluate_scored(source, labels, columns, join_on, threshold, prediction_threshold, group_column,
                               storage_options)
    merged, unmatched, used, names = None, 0, None, []
    for name, source in sources.items():
        one = evaluate_scored(source, labels, columns, join_on, threshold, prediction_threshold, group_column,
                              storage_options)
        scores = [c for c in one.frame.columns if c not in ("key", "label", "group")]
        frame = one.frame.rename(columns={c: f"{name}:{c}" for c in scores})
        names += [f"{name}:{c}" for c in scores]
        merged = frame if merged is None else merged.merge(frame, on=[c for c in ("key", "label", "group")
                                                                       if c in frame.columns], how="inner")
        unmatched, used = max(unmatched, one.unmatched_labels), one.threshold
    if not len(merged):
        raise ConfigError(f"no labelled row was scored by every one of {sorted(sources)}")
    group_name = "group" if "group" in merged.columns else None
    metrics = evaluate_columns(merged, names, "label", used, prediction_threshold, group_name)
    return Evaluation(metrics, merged, unmatched, used)


def run_evaluate(source: str | Mapping[str, str], labels_path: str, *, label_format: str = "auto",
                 columns: Sequence[str] | None = None,
                 join_on: str = JOIN_KEY, threshold: float | None = None, prediction_threshold: float | None = None,
                 group_column: str | None = None, table_path: str | None = None, plot_path: str | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> Evaluation:
    """Read, evaluate, and write the table (``.csv`` beside a ``.md``) and plot where asked. ``source`` is one
    scored output, or several by name (:func:`evaluate_outputs`)."""
    labels = read_labels(labels_path, label_format, storage_options)
    sources = {"scores": source} if isinstance(source, str) else dict(source)
    evaluation = evaluate_outputs(sources, labels, columns, join_on, threshold, prediction_threshold, group_column,
                                  storage_options)
    source = ", ".join(sources.values())
    if table_path:
        _write(table_path, evaluation.metrics.to_csv().encode(), storage_options)
        markdown_path = table_path.rsplit(".", 1)[0] + ".md" if table_path.endswith(".csv") else table_path + ".md"
        _write(markdown_path, (evaluation.to_markdown() + "\n").encode(), storage_options)
    if plot_path:
        title = f"{source} vs {labels_path} (n={len(evaluation.frame)})"
        _write(plot_path, plot_evaluation(evaluation.frame, evaluation.metrics, title=title), storage_options)
    return evaluation


def _write(path: str, data: bytes, storage_options: Mapping[str, Any] | None) -> None:
    fs, inner = filesystem(path, storage_options)
    write_bytes_atomic(fs, inner, data)
