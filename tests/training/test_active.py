"""Picking the images to label next: nearest the decision boundary, near-duplicates skipped, labelled left out."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.training.active import label_sheet, nearest_to_boundary, select_uncertain, write_label_sheet
from pipeline.training.labels import parse_keep_trash_csv
from tests.tolerances import assert_within, dot_error_bound
from tests.training import synthetic


def test_nearest_to_the_boundary_first_and_non_finite_scores_never() -> None:
    scores = np.array([7.0, 5.1, np.nan, 4.8, 5.0, 2.0, 5.6])
    np.testing.assert_array_equal(nearest_to_boundary(scores, 5.0, 3), [4, 1, 3])
    np.testing.assert_array_equal(nearest_to_boundary(scores, 5.0, 100), [4, 1, 3, 6, 0, 5])
    np.testing.assert_array_equal(nearest_to_boundary(np.array([-0.2, 3.0, 0.1]), 0.0, 1), [2])  # a logit head
    with pytest.raises(ConfigError, match="count"):
        nearest_to_boundary(scores, 5.0, 0)


def test_near_duplicates_are_skipped() -> None:
    embeddings = synthetic.unit_vectors(4, 8)
    embeddings[1] = embeddings[0] + 1e-3  # a near-copy of image 0, as close to the boundary
    scores = np.array([5.0, 5.01, 5.02, 9.0])
    np.testing.assert_array_equal(nearest_to_boundary(scores, 5.0, 2), [0, 1])
    np.testing.assert_array_equal(nearest_to_boundary(scores, 5.0, 2, embeddings, max_cosine=0.95), [0, 2])


def test_the_sheet_round_trips_as_keep_trash_labels(tmp_path) -> None:
    sheet = label_sheet(np.array(["a", "b", "c"], dtype=object), np.array([4.9, 5.3, 8.0]), 5.0, np.array([0, 1]),
                        {"url": np.array(["u1", "u2", "u3"], dtype=object)})
    assert list(sheet.columns) == ["key", "score", "margin", "label", "url"]
    np.testing.assert_allclose(sheet["margin"], [0.1, 0.3])
    write_label_sheet(sheet, str(tmp_path / "sheet.csv"))
    filled = pd.read_csv(tmp_path / "sheet.csv", dtype=str, keep_default_na=False)
    filled.loc[0, "label"] = "keep"  # a person labels the first image and not yet the second
    labels = parse_keep_trash_csv(filled.to_csv(index=False))
    assert list(labels.keys) == ["a"] and labels.scores[0] == 1.0  # the unfilled row is not a label yet


@pytest.fixture
def scored(tmp_path):
    keys = synthetic.keys_for(200)
    embeddings = synthetic.unit_vectors(200, 16)
    truth = synthetic.planted_scores(embeddings)
    statuses = ["ok"] * 200
    statuses[0] = "decode_error"
    folder = synthetic.write_scored(tmp_path / "scored", keys, embeddings, statuses,
                                    extra={"score_trained": truth.astype(np.float32)})
    return folder, keys, embeddings, truth


def test_select_from_a_score_column_leaves_out_labelled_and_failed_rows(scored) -> None:
    folder, keys, _, truth = scored
    labelled = keys[:100]
    sheet = select_uncertain(str(folder), 5.0, 10, column="score_trained", labelled_keys=labelled)
    assert len(sheet) == 10 and set(sheet["key"]).isdisjoint(labelled)
    candidates = np.abs(truth[100:] - 5.0)
    assert sheet["margin"].max() <= np.sort(candidates)[9] + 1e-5
    assert sheet["url"].str.endswith(".jpg").all()


def test_select_with_a_head_file_scores_the_stored_embeddings(scored, tmp_path) -> None:
    folder, keys, embeddings, truth = scored
    weight = torch.from_numpy(np.linalg.lstsq(embeddings.astype(np.float64), truth, rcond=None)[0]).float()
    torch.save({"weight": weight[None, :], "bias": torch.zeros(1)}, tmp_path / "head.pth")
    sheet = select_uncertain(str(folder), 5.0, 5, head_path=str(tmp_path / "head.pth"))
    assert keys[0] not in set(sheet["key"])  # decode_error rows are never candidates
    stored = embeddings.astype(np.float16).astype(np.float32)
    rows = [keys.index(k) for k in sheet["key"]]
    # The stored (fp16) embeddings through the head, exactly, and the bank's float32 bound (bias included).
    assert_within(sheet["score"], stored[rows].astype(np.float64) @ weight.double().numpy(),
                  dot_error_bound(stored[rows], weight, bias=np.zeros(1)), "scores from the head file")
    with pytest.raises(ConfigError, match="exactly one"):
        select_uncertain(str(folder), 5.0, 5)


def test_select_uncertain_command(scored, tmp_path, capsys) -> None:
    from pipeline.cli import main

    folder, keys, _, _ = scored
    (tmp_path / "done.csv").write_text("key,label\n" + "".join(f"{k},keep\n" for k in keys[1:150]))
    code = main(["select-uncertain", "--scores", str(folder), "--column", "score_trained", "--boundary", "5",
                 "--count", "7", "--labels", str(tmp_path / "done.csv"), "--out", str(tmp_path / "next.csv")])
    assert code == 0 and "7 images nearest 5" in capsys.readouterr().out
    sheet = pd.read_csv(tmp_path / "next.csv", dtype={"key": str})
    assert len(sheet) == 7 and set(sheet["key"]) <= set(keys[150:])
