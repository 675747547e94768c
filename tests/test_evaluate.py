"""Evaluation metrics against scipy on the same arrays, burst top-1/MRR by hand, and the evaluate command."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipeline.evaluate import (
    evaluate_columns,
    group_metrics,
    pearson,
    rank_average,
    run_evaluate,
    score_metrics,
    spearman,
)
from tests.tolerances import gamma
from tests.training import synthetic


def _correlation_tolerance(n: int) -> float:
    """How far two float64 implementations of Pearson's r on n points can be apart, whatever their order of
    summation. Each centres the data and divides a dot product of n terms by the norms (or takes the dot
    product of normalised vectors): the dot products are within gamma_n of sum |dx dy| and of the squared
    norms, and sum |dx dy| <= ||dx|| ||dy|| (Cauchy-Schwarz), so with a few roundings per element for the
    centring, scaling, square roots and divisions each r is within 2 gamma_{n+6} of exact (|r| <= 1; the
    mean's own error shifts dx by a constant, which changes r only in second order as sum dx = 0)."""
    return 2 * 2 * gamma(n + 6, np.float64)


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    labels = rng.normal(5, 1.5, 500)
    predictions = labels + rng.normal(0, 1.0, 500)
    return np.round(predictions, 1), np.round(labels, 1)  # rounding makes ties, which ranks must average


def test_correlations_match_scipy(arrays) -> None:
    predictions, labels = arrays
    np.testing.assert_allclose(rank_average(predictions), stats.rankdata(predictions))
    tolerance = _correlation_tolerance(len(labels))  # ranks are exact: Spearman's is Pearson's on them
    assert pearson(predictions, labels) == pytest.approx(stats.pearsonr(predictions, labels)[0], rel=0, abs=tolerance)
    assert spearman(predictions, labels) == pytest.approx(stats.spearmanr(predictions, labels)[0], rel=0,
                                                          abs=tolerance)
    assert np.isnan(pearson(np.ones(5), labels[:5])) and np.isnan(pearson([1.0], [2.0]))


def test_score_metrics(arrays) -> None:
    predictions, labels = arrays
    predictions = predictions.copy()
    predictions[3] = np.nan  # non-finite pairs are left out
    metrics = score_metrics(predictions, labels, threshold=5.0)
    keep = np.isfinite(predictions)
    p, y = predictions[keep], labels[keep]
    assert metrics["n"] == 499
    assert metrics["srcc"] == pytest.approx(stats.spearmanr(p, y)[0], rel=0, abs=_correlation_tolerance(len(y)))
    assert metrics["mse"] == pytest.approx(np.mean((p - y) ** 2))
    assert metrics["mae"] == pytest.approx(np.mean(np.abs(p - y)))
    assert metrics["accuracy"] == pytest.approx(np.mean((p >= 5) == (y >= 5)))
    # Scale-free: shifting and scaling the predictions changes neither SRCC nor rate-matched accuracy.
    shifted = score_metrics(predictions * 0.01 - 3, labels, threshold=5.0)
    assert shifted["srcc"] == pytest.approx(metrics["srcc"])
    assert shifted["accuracy_rate_matched"] == pytest.approx(metrics["accuracy_rate_matched"])
    assert score_metrics(np.array([]), np.array([]))["n"] == 0


def test_burst_top1_and_mrr_by_hand() -> None:
    groups = ["a", "a", "a", "b", "b", "c", "c", "c", "c", "solo"]
    labels = [1, 3, 2, 5, 4, 0, 0, 9, 1, 7]
    # a: best (label 3) ranked 2nd; b: best ranked 1st; c: best (label 9) ranked 3rd; solo is not a burst.
    scores = [0.9, 0.5, 0.1, 2.0, 1.0, 0.4, 0.3, 0.2, 0.1, 0.0]
    metrics = group_metrics(np.array(scores), np.array(labels, float), np.array(groups, dtype=object))
    assert metrics["groups"] == 3
    assert metrics["top1"] == pytest.approx(1 / 3)
    assert metrics["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)
    assert metrics["top1_random"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    tied_best = group_metrics(np.array([0.1, 0.9]), np.array([5.0, 5.0]), np.array(["g", "g"], dtype=object))
    assert tied_best["top1"] == 1.0  # either of two equally good shots is a right pick


def test_evaluate_columns_table() -> None:
    frame = pd.DataFrame({"label": [1.0, 2, 3, 4], "good": [0.1, 0.2, 0.3, 0.4], "bad": [4.0, 3, 2, 1],
                          "group": ["x", "x", "y", "y"]})
    table = evaluate_columns(frame, ["good", "bad"], threshold=2.5, group_column="group")
    assert list(table.index) == ["good", "bad"]
    assert table.loc["good", "srcc"] == pytest.approx(1.0) and table.loc["bad", "srcc"] == pytest.approx(-1.0)
    assert table.loc["good", "top1"] == 1.0 and table.loc["bad", "top1"] == 0.0


def test_evaluate_command_writes_table_and_plot(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    from pipeline.cli import main

    n = 300
    keys = synthetic.keys_for(n)
    embeddings = synthetic.unit_vectors(n, 8)
    truth = synthetic.planted_scores(embeddings)
    noise = np.random.default_rng(3).normal(0, 0.5, n)
    scored = synthetic.write_scored(tmp_path / "scored", keys, embeddings, extra={
        "score_good_head": (truth + noise).astype(np.float32),
        "score_prompt_aesthetic": ((truth - 5) * 0.01).astype(np.float32),
    })
    bursts = [f"burst{i // 3}" for i in range(n)]
    (tmp_path / "labels.csv").write_text("key,score,group\n" + "".join(
        f"{k},{t:.4f},{b}\n" for k, t, b in zip(keys, truth, bursts)))

    code = main(["evaluate", "--scores", str(scored), "--labels", str(tmp_path / "labels.csv"),
                 "--table", str(tmp_path / "eval.csv"), "--plot", str(tmp_path / "eval.png")])
    assert code == 0
    printed = capsys.readouterr().out
    assert re.search(r"^\| score_good_head +\|", printed, re.M) and "mrr" in printed
    table = pd.read_csv(tmp_path / "eval.csv", index_col="column")
    assert list(table.index) == ["aesthetic_score", "score_good_head", "score_prompt_aesthetic"]
    assert table.loc["score_prompt_aesthetic", "srcc"] == pytest.approx(1.0)
    assert table.loc["score_prompt_aesthetic", "top1"] == 1.0 and table.loc["score_good_head", "srcc"] > 0.8
    assert re.match(r"\| column +\|", (tmp_path / "eval.md").read_text())
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_evaluate_with_chosen_columns_and_url_stem_join(tmp_path) -> None:
    keys = synthetic.keys_for(20)
    scored = synthetic.write_scored(tmp_path / "scored", keys, synthetic.unit_vectors(20, 8),
                                    urls=[f"http://127.0.0.1/ava/{1000 + i}.jpg?x=1" for i in range(20)],
                                    extra={"score_h": np.arange(20, dtype=np.float32)})
    (tmp_path / "AVA.txt").write_text(synthetic.ava_text([str(1000 + i) for i in range(20)],
                                                         synthetic.ava_votes(np.linspace(3, 7, 20))))
    evaluation = run_evaluate(str(scored), str(tmp_path / "AVA.txt"), columns=["score_h"], join_on="url_stem")
    assert list(evaluation.metrics.index) == ["score_h"] and len(evaluation.frame) == 20
    assert evaluation.metrics.loc["score_h", "srcc"] > 0.9 and evaluation.threshold == 5.0
    assert json.loads(evaluation.metrics.to_json())["n"]["score_h"] == 20


def test_evaluate_compares_two_outputs_on_the_rows_both_scored(tmp_path, capsys) -> None:
    """A frozen-head output and a fine-tuned one, say: one table, the labelled rows both scored."""
    from pipeline.cli import main

    n = 200
    keys = synthetic.keys_for(n)
    embeddings = synthetic.unit_vectors(n, 8)
    truth = synthetic.planted_scores(embeddings)
    rng = np.random.default_rng(4)
    frozen = synthetic.write_scored(tmp_path / "frozen", keys, embeddings, extra={
        "score_h": (truth + rng.normal(0, 1.0, n)).astype(np.float32)})
    tuned = synthetic.write_scored(tmp_path / "tuned", keys[: n - 20], embeddings[: n - 20], extra={
        "score_h": (truth[: n - 20] + rng.normal(0, 0.1, n - 20)).astype(np.float32)})
    (tmp_path / "labels.csv").write_text("key,score\n" + "".join(f"{k},{t:.4f}\n" for k, t in zip(keys, truth)))

    code = main(["evaluate", "--scores", f"frozen={frozen}", "--scores", f"tuned={tuned}", "--column", "score_h",
                 "--labels", str(tmp_path / "labels.csv"), "--table", str(tmp_path / "eval.csv")])
    assert code == 0
    assert capsys.readouterr().out.startswith(f"{n - 20} labelled rows")  # the 20 the tuned output lacks drop out
    table = pd.read_csv(tmp_path / "eval.csv", index_col="column")
    assert list(table.index) == ["frozen:score_h", "tuned:score_h"]
    assert table.loc["tuned:score_h", "srcc"] > table.loc["frozen:score_h", "srcc"]
