"""Label parsers: AVA.txt's published line format, CSV scores, keep/trash CSVs, and the keep/trash cut."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.training.labels import (
    LabelFormatError,
    LabelKind,
    detect_format,
    parse_ava,
    parse_keep_trash_csv,
    parse_score_csv,
    read_labels,
)

# The first lines of AVA.txt as published: index, image id, votes for 1..10, two semantic tags, challenge id.
AVA_LINES = """\
1 953619 0 1 5 17 38 36 15 6 5 1 1 22 1396
2 953958 10 7 15 26 26 21 10 8 1 2 1 21 1396
3 954184 0 0 4 8 41 56 10 3 4 0 0 0 1396
"""


def test_ava_lines_give_the_mean_vote_and_the_counts() -> None:
    labels = parse_ava(AVA_LINES)
    assert list(labels.keys) == ["953619", "953958", "954184"]
    assert labels.kind == LabelKind.SCORE
    np.testing.assert_array_equal(labels.votes[0], [0, 1, 5, 17, 38, 36, 15, 6, 5, 1])
    assert labels.scores[0] == pytest.approx(699 / 124)  # sum(i * c_i) / sum(c_i)
    counts = np.array([10, 7, 15, 26, 26, 21, 10, 8, 1, 2])
    assert labels.scores[1] == pytest.approx((np.arange(1, 11) * counts).sum() / counts.sum())
    np.testing.assert_allclose(labels.vote_distribution.sum(axis=1), 1.0)


def test_ava_skips_unvoted_images_and_reports_bad_lines() -> None:
    labels = parse_ava(AVA_LINES + "4 1 0 0 0 0 0 0 0 0 0 0 0 0 1396\n\n")
    assert len(labels) == 3
    with pytest.raises(LabelFormatError, match=r"AVA.txt:2: expected 15 fields"):
        parse_ava("1 953619 0 1 5 17 38 36 15 6 5 1 1 22 1396\n2 953958 10 7\n")
    with pytest.raises(LabelFormatError, match=r":1: vote counts must be integers"):
        parse_ava("1 953619 0 1 5 x 38 36 15 6 5 1 1 22 1396\n")


def test_score_csv_with_groups() -> None:
    labels = parse_score_csv("key,score,group\na,5.5,burst1\nb, 3,burst1\nc,7,burst2\n")
    assert list(labels.keys) == ["a", "b", "c"]
    np.testing.assert_array_equal(labels.scores, [5.5, 3.0, 7.0])
    assert list(labels.groups) == ["burst1", "burst1", "burst2"]
    assert parse_score_csv("id,mos\na,1\n", key_column="id", score_column="mos").scores[0] == 1.0


def test_score_csv_errors_name_the_line_or_column() -> None:
    with pytest.raises(LabelFormatError, match=r"missing column\(s\) \['score'\]"):
        parse_score_csv("key,value\na,1\n")
    with pytest.raises(LabelFormatError, match="line 3: score='n/a' is not a number"):
        parse_score_csv("key,score\na,1\nb,n/a\n")
    with pytest.raises(LabelFormatError, match="more than once"):
        parse_score_csv("key,score\na,1\na,2\n")


def test_keep_trash_csv_accepts_words_and_skips_unlabelled_rows() -> None:
    labels = parse_keep_trash_csv("key,label,url\na,keep,u\nb,Trash,u\nc,,u\nd,1,u\ne,no,u\n")
    assert labels.kind == LabelKind.BINARY
    assert list(labels.keys) == ["a", "b", "d", "e"]
    np.testing.assert_array_equal(labels.scores, [1, 0, 1, 0])
    with pytest.raises(LabelFormatError, match="line 2: label='maybe'"):
        parse_keep_trash_csv("key,label\na,maybe\n")


def test_scores_become_keep_trash_by_threshold_or_percentile() -> None:
    labels = parse_ava(AVA_LINES)  # means 5.64, 4.11, 5.67
    by_threshold = labels.keep_trash(threshold=5.65)
    assert by_threshold.kind == LabelKind.BINARY and by_threshold.votes is None
    np.testing.assert_array_equal(by_threshold.scores, [0, 0, 1])
    np.testing.assert_array_equal(labels.keep_trash(percentile=50).scores, [1, 0, 1])
    with pytest.raises(ConfigError, match="exactly one"):
        labels.keep_trash(threshold=5, percentile=50)
    with pytest.raises(ConfigError, match="percentile"):
        labels.keep_trash(percentile=100)


def test_formats_are_detected_from_the_first_line(tmp_path) -> None:
    assert detect_format(AVA_LINES) == "ava"
    assert detect_format("key,label\na,keep\n") == "keep-trash"
    assert detect_format("key,score\na,5\n") == "csv"
    (tmp_path / "AVA.txt").write_text(AVA_LINES)
    (tmp_path / "keep.csv").write_text("key,label\na,keep\n")
    assert read_labels(str(tmp_path / "AVA.txt")).votes is not None
    assert read_labels(str(tmp_path / "keep.csv")).kind == LabelKind.BINARY
    with pytest.raises(LabelFormatError, match="cannot read labels"):
        read_labels(str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="label format"):
        read_labels(str(tmp_path / "AVA.txt"), "xml")
