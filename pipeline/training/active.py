"""Active learning: list the unlabelled images a head is least sure about, to label them next.

Uncertainty is the distance of an image's score from the decision boundary (``|score - boundary|``): 5 for
AVA-style scores, the keep threshold for a keep/trash cut, 0 for a head trained with the bce loss (its score is
the logit of keep, so ``sigmoid(score)`` is near 0.5 there). Near-duplicate images (LAION has many) would
waste labels, so with embeddings a candidate whose cosine similarity to one already picked exceeds
``max_cosine`` is skipped.

The list is written as a keep/trash CSV with an empty ``label`` column: fill in keep or trash and pass it back
to ``train-head`` as labels (unfilled rows are ignored).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from pipeline import schema
from pipeline.config import ConfigError, WeightsSpec
from pipeline.io.storage import filesystem, write_bytes_atomic
from pipeline.models.heads import Head, HeadBank, load_head_state_dict
from pipeline.models.weights import resolve_weights
from pipeline.training.scored import JOIN_KEY, embedding_matrix, join_columns, join_keys, read_scored

CANDIDATE_POOL_FACTOR = 10  # candidates examined per pick when skipping near-duplicates
IMAGE_KEY = "image_key"  # the scored key, in sheets keyed by another join value


def nearest_to_boundary(scores: np.ndarray, boundary: float, count: int,
                        embeddings: np.ndarray | None = None, max_cosine: float | None = None) -> np.ndarray:
    """Indices of up to ``count`` finite scores closest to ``boundary``, closest first; with embeddings and
    ``max_cosine``, skipping any too similar to one already picked."""
    if count < 1:
        raise ConfigError(f"count must be >= 1, got {count}")
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(scores))
    order = finite[np.argsort(np.abs(scores[finite] - boundary), kind="mergesort")]
    if embeddings is None or max_cosine is None:
        return order[:count]
    pool = order[:count * CANDIDATE_POOL_FACTOR]
    vectors = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings[pool], dtype=np.float32)), dim=1)
    picked: list[int] = []
    for position in range(len(pool)):
        if picked and float((vectors[picked] @ vectors[position]).max()) > max_cosine:
            continue
        picked.append(position)
        if len(picked) == count:
            break
    return pool[picked]


def label_sheet(keys: np.ndarray, scores: np.ndarray, boundary: float, picks: np.ndarray,
                extra: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """The picked rows as a keep/trash CSV to fill in: key, score, margin, label (empty), then ``extra``."""
    frame = pd.DataFrame({
        "key": np.asarray(keys, dtype=object)[picks],
        "score": np.asarray(scores, dtype=np.float64)[picks],
        "margin": np.abs(np.asarray(scores, dtype=np.float64)[picks] - boundary),
        "label": "",
    })
    for name, values in (extra or {}).items():
        frame[name] = np.asarray(values, dtype=object)[picks]
    return frame


def head_scores(embeddings: np.ndarray, head: Head, chunk_rows: int = 65536) -> np.ndarray:
    """A head's scores of (N, D) embeddings, in chunks so a large table never needs a second (N, D) copy."""
    bank = HeadBank([head])
    parts = [bank.score(torch.from_numpy(np.ascontiguousarray(embeddings[start:start + chunk_rows])))[head.name]
             for start in range(0, len(embeddings), chunk_rows)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.float32)


def select_uncertain(source: str, boundary: float, count: int, *, column: str | None = None,
                     head_path: str | None = None, labelled_keys: Sequence[str] = (), join_on: str = JOIN_KEY,
                     max_cosine: float | None = None,
                     storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The label sheet for a scored output: scores from ``column``, or from the head file at ``head_path``
    applied to the stored embeddings; rows whose join key is in ``labelled_keys`` are left out."""
    if (column is None) == (head_path is None):
        raise ConfigError("give exactly one of a score column or a head file")
    needs_embeddings = head_path is not None or max_cosine is not None
    columns = [*join_columns(join_on), *([column] if column else []),
               *([schema.EMBEDDING] if needs_embeddings else [])]
    table = read_scored(source, columns, storage_options, optional=[schema.URL])
    embeddings = embedding_matrix(table) if needs_embeddings else None
    if head_path is not None:
        head = Head.from_state_dict("candidate", load_head_state_dict(_local_copy(head_path, storage_options)))
        scores = head_scores(embeddings, head)
    else:
        scores = table[column].to_numpy(zero_copy_only=False).astype(np.float64)
    keys = sheet_keys(table, join_on)
    unlabelled = ~pd.Series(keys).isin(set(labelled_keys)).to_numpy()
    candidates = np.flatnonzero(unlabelled)
    picks = candidates[nearest_to_boundary(scores[candidates], boundary, count,
                                           embeddings[candidates] if embeddings is not None else None, max_cosine)]
    return label_sheet(keys, scores, boundary, picks, sheet_extras(table, join_on))


def sheet_keys(table: Any, join_on: str) -> np.ndarray:
    """The sheet's ``key``: what labels are joined on, so a filled-in sheet joins back the same way."""
    return join_keys(table, join_on)


def sheet_extras(table: Any, join_on: str) -> dict[str, np.ndarray]:
    """Columns that help a person label: the url, and the image's own key when the sheet's key is another."""
    extra = {}
    if join_on != JOIN_KEY:
        extra[IMAGE_KEY] = table[schema.KEY].to_numpy(zero_copy_only=False)
    if schema.URL in table.column_names:
        extra[schema.URL] = table[schema.URL].to_numpy(zero_copy_only=False)
    return extra


def write_label_sheet(frame: pd.DataFrame, path: str, storage_options: Mapping[str, Any] | None = None) -> None:
    fs, inner = filesystem(path, storage_options)
    write_bytes_atomic(fs, inner, frame.to_csv(index=False).encode())


def _local_copy(path: str, storage_options: Mapping[str, Any] | None) -> str:
    """A head file as a local path (torch.load wants one): local files in place, remote ones via the cache."""
    return str(resolve_weights(WeightsSpec(path), storage_options=storage_options))
