"""The score-band rule: one band per score, the same from every caller, as the README lists it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipeline import bands

README = Path(__file__).resolve().parents[1] / "README.md"


def test_each_score_falls_in_the_band_whose_range_holds_it():
    scores = np.array([-1.0, 4.4999, 4.5, 4.99, 5.0, 5.99, 6.0, 6.49, 6.5, 12.0, np.nan, np.inf])
    labels = bands.bands_of(scores)
    assert list(labels) == [bands.band_of(float(s)) for s in scores]
    for score, label in zip(scores, labels):
        if label == bands.UNSCORED:
            assert not np.isfinite(score)
        else:
            low, high = bands.RANGES[label]
            assert low <= score < high
    assert bands.band_of(None) == bands.UNSCORED


def test_pruning_keeps_every_band_that_can_hold_a_matching_score():
    assert bands.bands_at_least(6.25) == ["6-6.5", "ge6.5"]
    assert bands.bands_at_least(6.0) == ["6-6.5", "ge6.5"]
    assert bands.bands_below(4.5) == ["lt4.5"]
    assert bands.bands_below(4.75) == ["lt4.5", "4.5-5"]


def test_the_readme_lists_the_bands_there_are():
    paragraph = README.read_text().split("**Partitioning.**", 1)[1].split("\n\n", 1)[0]
    assert tuple(re.findall(r"`([^`]+)`", paragraph)[1:1 + len(bands.ALL)]) == bands.ALL
