"""Label tables: AVA.txt vote counts, CSV key,score, and keep/trash labels, read into one shape.

- AVA.txt (the AVA dataset's published list): one image per line, whitespace-separated integers
  ``index image_id c1 ... c10 sem1 sem2 challenge_id``, where ``ci`` is how many people voted ``i`` (1..10).
  Its score is the mean vote ``sum(i * ci) / sum(ci)``; the counts are kept for the EMD loss.
- CSV of scores: a header with a key column and a score column (``key,score`` by default), optionally a
  group column (bursts of near-identical shots, for top-1 / MRR evaluation).
- CSV of keep/trash: a key column and a label column holding keep/trash (or 1/0, true/false, yes/no).

Any score table becomes keep/trash labels with :meth:`LabelTable.keep_trash` (a threshold, or a
percentile: the top ``100 - p`` percent are kept).
"""

from __future__ import annotations

import io
import pathlib
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np
import pandas as pd

from pipeline.config import ConfigError

AVA_VOTE_BINS = 10
AVA_FIELDS = 2 + AVA_VOTE_BINS + 3  # index, image_id, c1..c10, sem1, sem2, challenge_id
AVA_BINARY_THRESHOLD = 5.0  # the usual AVA good/bad split: mean vote >= 5 is "good"

KEEP_WORDS = frozenset({"keep", "1", "true", "yes", "good"})
TRASH_WORDS = frozenset({"trash", "0", "false", "no", "bad"})
FORMATS = ("auto", "ava", "csv", "keep-trash")


class LabelFormatError(ConfigError):
    """A label file that is not in the format asked for; the message names the file and line or column."""


class LabelKind:
    SCORE = "score"  # a real-valued opinion score (AVA mean vote, 1..10)
    BINARY = "binary"  # 1.0 keep, 0.0 trash


@dataclass(frozen=True, eq=False)
class LabelTable:
    """Labels keyed by image: ``keys`` (N,) str, ``scores`` (N,) float64, optional vote counts and groups."""

    keys: np.ndarray
    scores: np.ndarray
    kind: str = LabelKind.SCORE
    votes: np.ndarray | None = None  # (N, 10) counts of votes 1..10 (AVA)
    groups: np.ndarray | None = None  # (N,) str group id (bursts)
    source: str = ""

    def __post_init__(self) -> None:
        n = len(self.keys)
        if len(self.scores) != n or (self.votes is not None and len(self.votes) != n) or (
                self.groups is not None and len(self.groups) != n):
            raise ValueError("label columns must have one entry per key")
        unique, counts = np.unique(self.keys, return_counts=True)
        if len(unique) != n:
            raise LabelFormatError(f"{self.source}: keys appear more than once: {list(unique[counts > 1][:5])}")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def vote_distribution(self) -> np.ndarray | None:
        """(N, 10) float64 share of votes per score, or None without vote counts."""
        if self.votes is None:
            return None
        return self.votes / self.votes.sum(axis=1, keepdims=True)

    def keep_trash(self, threshold: float | None = None, percentile: float | None = None) -> "LabelTable":
        """Binary labels: keep where ``score >= threshold``, or where the score is at or above the
        ``percentile``-th percentile of these scores (50: the better half is kept)."""
        if (threshold is None) == (percentile is None):
            raise ConfigError("keep/trash needs exactly one of a threshold or a percentile")
        if percentile is not None:
            if not 0 < percentile < 100:
                raise ConfigError(f"keep/trash percentile must be in (0, 100), got {percentile}")
            threshold = float(np.percentile(self.scores, percentile))
        keep = (self.scores >= threshold).astype(np.float64)
        return replace(self, scores=keep, kind=LabelKind.BINARY, votes=None)

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame({"key": self.keys, "label": self.scores})
        if self.groups is not None:
            frame["group"] = self.groups
        return frame


def _read_text(path: str, storage_options: Mapping[str, Any] | None) -> str:
    try:
        if "://" in path and not path.startswith("file://"):
            from pipeline.io.storage import filesystem

            fs, inner = filesystem(path, storage_options)
            with fs.open(inner, "rb") as handle:
                return handle.read().decode("utf-8")
        return pathlib.Path(path.removeprefix("file://")).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise LabelFormatError(f"cannot read labels {path}: {error}") from None


def parse_ava(text: str, source: str = "AVA.txt") -> LabelTable:
    """AVA.txt lines -> mean-vote scores with their vote counts; keys are the image ids."""
    keys, votes = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != AVA_FIELDS:
            raise LabelFormatError(
                f"{source}:{number}: expected {AVA_FIELDS} fields (index image_id c1..c10 sem1 sem2 "
                f"challenge_id), got {len(fields)}: {line.strip()[:80]!r}")
        try:
            counts = [int(field) for field in fields[2:2 + AVA_VOTE_BINS]]
        except ValueError:
            raise LabelFormatError(f"{source}:{number}: vote counts must be integers: {line.strip()[:80]!r}") from None
        if min(counts) < 0:
            raise LabelFormatError(f"{source}:{number}: negative vote count")
        if sum(counts) == 0:
            continue  # nobody voted: no score to learn from
        keys.append(fields[1])
        votes.append(counts)
    if not keys:
        raise LabelFormatError(f"{source}: no AVA lines with votes")
    vote_counts = np.asarray(votes, dtype=np.float64)
    scores = vote_counts @ np.arange(1, AVA_VOTE_BINS + 1) / vote_counts.sum(axis=1)
    return LabelTable(np.asarray(keys, dtype=object), scores, LabelKind.SCORE, votes=vote_counts, source=source)


def _csv(text: str, source: str) -> pd.DataFrame:
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise LabelFormatError(f"{source}: not a readable CSV: {error}") from None


def _require_columns(frame: pd.DataFrame, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise LabelFormatError(f"{source}: missing column(s) {missing}; the header has {list(frame.columns)}")


def _groups(frame: pd.DataFrame, group_column: str | None) -> np.ndarray | None:
    if group_column and group_column in frame.columns:
        return frame[group_column].to_numpy(dtype=object)
    return None


def parse_score_csv(text: str, source: str = "labels.csv", key_column: str = "key", score_column: str = "score",
                    group_column: str | None = "group") -> LabelTable:
    frame = _csv(text, source)
    _require_columns(frame, [key_column, score_column], source)
    scores = pd.to_numeric(frame[score_column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        row = int(bad[0])
        raise LabelFormatError(f"{source}: line {row + 2}: {score_column}={frame[score_column].iloc[row]!r} "
                               f"is not a number ({bad.size} such rows)")
    return LabelTable(frame[key_column].to_numpy(dtype=object), scores, LabelKind.SCORE,
                      groups=_groups(frame, group_column), source=source)


def parse_keep_trash_csv(text: str, source: str = "labels.csv", key_column: str = "key",
                         label_column: str = "label", group_column: str | None = "group") -> LabelTable:
    frame = _csv(text, source)
    _require_columns(frame, [key_column, label_column], source)
    words = frame[label_column].str.strip().str.lower()
    labelled = words != ""  # an empty label is an image not yet labelled (the active-learning list)
    unknown = ~(words.isin(KEEP_WORDS) | words.isin(TRASH_WORDS)) & labelled
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise LabelFormatError(f"{source}: line {row + 2}: {label_column}={frame[label_column].iloc[row]!r} is "
                               f"neither keep ({sorted(KEEP_WORDS)}) nor trash ({sorted(TRASH_WORDS)})")
    frame, words = frame[labelled], words[labelled]
    if frame.empty:
        raise LabelFormatError(f"{source}: no labelled rows")
    return LabelTable(frame[key_column].to_numpy(dtype=object), words.isin(KEEP_WORDS).to_numpy(dtype=np.float64),
                      LabelKind.BINARY, groups=_groups(frame, group_column), source=source)


def detect_format(text: str, key_column: str = "key", label_column: str = "label") -> str:
    """ava when the first line is AVA_FIELDS integers; keep-trash when the CSV header has the label column;
    else csv."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    fields = first.split()
    if len(fields) == AVA_FIELDS and all(field.lstrip("-").isdigit() for field in fields):
        return "ava"
    header = [name.strip() for name in first.split(",")]
    return "keep-trash" if label_column in header and key_column in header else "csv"


def read_labels(path: str, label_format: str = "auto", storage_options: Mapping[str, Any] | None = None,
                key_column: str = "key", score_column: str = "score", label_column: str = "label",
                group_column: str | None = "group") -> LabelTable:
    """A label file in any of the formats above (``auto`` tells them apart by their first line)."""
    if label_format not in FORMATS:
        raise ConfigError(f"label format must be one of {FORMATS}, got {label_format!r}")
    text = _read_text(path, storage_options)
    if label_format == "auto":
        label_format = detect_format(text, key_column, label_column)
    if label_format == "ava":
        return parse_ava(text, path)
    if label_format == "keep-trash":
        return parse_keep_trash_csv(text, path, key_column, label_column, group_column)
    return parse_score_csv(text, path, key_column, score_column, group_column)
