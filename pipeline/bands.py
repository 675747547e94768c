"""The score-band partitioning of the output: the one rule every writer and reader asks.

Bands follow LAION-Aesthetics' published cut-offs but are coarse on purpose: a unit writes one file per
band, so a high band is not a dust of tiny files; inside a file rows are sorted by score, so row-group
statistics prune finer thresholds (>= 6.25) without a band of their own. A band holds scores in
[low, high); ``unscored`` holds rows without a finite score.
"""

from __future__ import annotations

import math

import numpy as np

COLUMN = "score_band"  # the Hive partition column
EDGES = (4.5, 5.0, 6.0, 6.5)
LABELS = ("lt4.5", "4.5-5", "5-6", "6-6.5", "ge6.5")
UNSCORED = "unscored"
ALL = LABELS + (UNSCORED,)

_BOUNDS = (float("-inf"),) + EDGES + (float("inf"),)
RANGES: dict[str, tuple[float, float]] = {label: (low, high) for label, low, high in zip(LABELS, _BOUNDS, _BOUNDS[1:])}


def band_of(score: float | None) -> str:
    """The band of one score."""
    if score is None or not math.isfinite(score):
        return UNSCORED
    return LABELS[int(np.searchsorted(EDGES, score, side="right"))]


def bands_of(scores: np.ndarray) -> np.ndarray:
    """The band of each score, as an object array (the writer's vectorised :func:`band_of`)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.full(scores.shape, UNSCORED, dtype=object)
    finite = np.isfinite(scores)
    labels[finite] = np.asarray(LABELS, dtype=object)[np.searchsorted(EDGES, scores[finite], side="right")]
    return labels


def bands_at_least(min_score: float) -> list[str]:
    """The bands that can hold a score >= ``min_score`` (for partition pruning)."""
    return [band for band, (_, high) in RANGES.items() if high > min_score]


def bands_below(max_score: float) -> list[str]:
    """The bands that can hold a score < ``max_score``."""
    return [band for band, (low, _) in RANGES.items() if low < max_score]
