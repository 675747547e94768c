"""Data-parallel head training with Ray Train (pipeline.training.distributed) on a scored output whose embeddings
carry a planted linear score: the split, the conditioning statistics, recovery of the score, the saved file,
and the losses. Each Ray Train run is kept small (D=32, a few epochs, 2 workers of half a CPU on the session's
2-CPU Ray)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config import ConfigError, HeadSpec, WeightsSpec
from pipeline.errors import ExitCode
from pipeline.models.heads import HeadFormat, load_head_bank
from pipeline.training import distributed
from pipeline.training.labels import LabelKind, LabelTable
from pipeline.training.train_head import SPLIT_NAMES, TEST, TRAIN, TrainConfig, split_assignments
from tests.tolerances import assert_within, head_reference
from tests.training import synthetic

ROWS, DIM, LABELLED = 1500, 32, 1400  # rows past LABELLED have no label; row 7 failed to decode
FAILED_ROW = 7
FAST = dict(lr=1e-2, batch_size=32, patience=5)  # small global batches: enough steps in few (costly) epochs
TWO_WORKERS = dict(workers=2)  # with half a CPU each (below): 1 of the session's 2 CPUs, the other for Ray Data


@pytest.fixture(autouse=True)
def prompt_ray_train(monkeypatch):
    """Ray Train's controller polls its workers every 2 s (each report waits for a poll); these epochs take
    a fraction of that. The driver passes RAY_TRAIN_* variables on to the controller it starts."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@pytest.fixture(scope="module")
def planted() -> dict[str, np.ndarray]:
    return synthetic.planted_set(ROWS, DIM)


@pytest.fixture(scope="module")
def scored(planted, tmp_path_factory) -> dict:
    """A scored output with embeddings (one row failed to decode) and AVA.txt labels for most of its rows."""
    folder = tmp_path_factory.mktemp("distributed")
    keys = list(planted["keys"])
    statuses = ["ok"] * ROWS
    statuses[FAILED_ROW] = "decode_error"
    synthetic.write_scored(folder / "scored", keys, planted["embeddings"], statuses)
    (folder / "AVA.txt").write_text(synthetic.ava_text(keys[:LABELLED], planted["votes"][:LABELLED]))
    trained_on = np.zeros(ROWS, dtype=bool)
    trained_on[:LABELLED] = True
    trained_on[FAILED_ROW] = False
    labels = LabelTable(planted["keys"][:LABELLED], planted["means"][:LABELLED], votes=planted["votes"][:LABELLED])
    return dict(folder=folder, scores=str(folder / "scored"), labels_path=str(folder / "AVA.txt"), labels=labels,
                rows=np.flatnonzero(trained_on))


def test_rows_are_split_by_the_same_key_hash_and_conditioned_by_an_aggregation(planted, scored, ray_local) -> None:
    config = TrainConfig(seed=3)
    rows = distributed.labelled_rows(scored["scores"], scored["labels"], config)
    frame = rows.dataset.select_columns([distributed.JOIN, distributed.SPLIT]).to_pandas()
    expected_keys = planted["keys"][scored["rows"]]
    assert sorted(frame[distributed.JOIN]) == sorted(expected_keys)  # ok rows with a label, each once
    np.testing.assert_array_equal(
        frame[distributed.SPLIT].to_numpy(),
        split_assignments(frame[distributed.JOIN].tolist(), config.val_fraction, config.test_fraction, config.seed))

    statistics = distributed.training_statistics(rows)
    split = split_assignments(expected_keys, config.val_fraction, config.test_fraction, config.seed)
    assert statistics.rows == {name: int((split == code).sum()) for code, name in SPLIT_NAMES.items()}
    assert statistics.nonfinite == 0
    train_rows = scored["rows"][split == TRAIN]
    stored = planted["stored"][train_rows].astype(np.float64)
    np.testing.assert_allclose(statistics.input_mean, stored.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(statistics.input_std, stored.std(axis=0, ddof=1), rtol=1e-9)
    assert statistics.label_mean == pytest.approx(planted["means"][train_rows].mean(), rel=1e-12)
    assert statistics.label_std == pytest.approx(planted["means"][train_rows].std(ddof=1), rel=1e-9)


def test_two_workers_recover_the_planted_score_and_save_a_laion_head(planted, scored, tmp_path, ray_local) -> None:
    """The train-head job with workers: embeddings streamed from the Parquet files to 2 Ray Train workers."""
    from pipeline.training.run import run_train_head

    out = str(tmp_path / "dp.pth")
    config = TrainConfig(loss="mse", max_epochs=3, **FAST)
    report = run_train_head(scored["scores"], scored["labels_path"], out, config=config, cpus_per_trial=0.5,
                            **TWO_WORKERS)
    trained = report.trials[0]
    assert trained.config.loss == "mse" and trained.head_format is HeadFormat.LINEAR and trained.emd_sigma is None
    assert report.labelled_rows == len(scored["rows"]) == LABELLED - 1 and report.unmatched_labels == 1

    # Held-out rows (by the same key hash as train_head's split) score in the planted order.
    split = split_assignments(planted["keys"][scored["rows"]], 0.1, 0.1, 0)
    held_out = scored["rows"][split == TEST]
    predictions = trained.predict(planted["stored"])
    synthetic.assert_recovers_planted_score(trained, predictions, planted["truth"], held_out, "2 workers, mse")
    assert trained.metrics["test"]["n"] == len(held_out)  # every test row's prediction came back
    # The all-reduced validation losses, one per epoch; the best one's weights kept; the stopping rule.
    val_losses = [epoch["val_loss"] for epoch in trained.history]
    assert [epoch["epoch"] for epoch in trained.history] == list(range(1, trained.epochs_run + 1))
    assert trained.best_epoch == 1 + int(np.argmin(val_losses))
    assert trained.epochs_run == min(config.max_epochs, trained.best_epoch + config.patience)

    record = report.record
    assert record["rows"] == {name: int((split == code).sum()) for code, name in SPLIT_NAMES.items()}
    assert record["distributed"]["workers"] == 2 and record["labels"] == scored["labels_path"]
    assert json.loads((tmp_path / "dp.json").read_text())["sha256"] == record["sha256"]
    # The file loads through the scoring job's loader, pinned, like a LAION head, and scores what predict says.
    bank = load_head_bank([HeadSpec("dp", WeightsSpec(out, record["sha256"]))])
    scores = bank.score(torch.from_numpy(planted["stored"]))["dp"]
    # Both score with a HeadBank of these parameters: each within its float32 bound of the exact score.
    expected, bound = head_reference(bank.heads[0], planted["stored"])
    assert_within(scores, expected, bound, "scored from the file")
    assert_within(predictions, expected, bound, "predict")


def test_keep_trash_labels_train_a_logit_head_with_bce(planted, scored, ray_local) -> None:
    """bce through the same loop, from rows materialised once in the object store."""
    labels = scored["labels"].keep_trash(percentile=50)
    trained = distributed.train_distributed(scored["scores"], labels, TrainConfig(max_epochs=3, **FAST),
                                            cpus_per_worker=0.5, cache=True, **TWO_WORKERS)
    assert trained.config.loss == "bce" and trained.label_kind == LabelKind.BINARY  # auto: bce for keep/trash
    test = trained.metrics["test"]
    print(f"\n2 workers, bce: test {test} (best epoch {trained.best_epoch}/{trained.epochs_run})")
    assert test["accuracy"] > 0.85  # logit >= 0 against keep
    held_out = scored["rows"][split_assignments(planted["keys"][scored["rows"]], 0.1, 0.1, 0) == TEST]
    logits = trained.predict(planted["stored"][held_out])
    keep = labels.scores[held_out] == 1  # label row i is scored row i
    # The metrics scored these rows in Ray Data batches: each float32 logit within the bank's bound of exact,
    # so only a logit within twice that of 0 may have fallen on the other side there.
    _, bound = head_reference(trained.as_head(), planted["stored"][held_out])
    undecided = int((np.abs(logits) <= 2 * bound).sum())
    right = int(((logits >= 0) == keep).sum())
    assert abs(right - round(test["accuracy"] * len(keep))) <= undecided, (right, test, undecided)
    assert "logit" in trained.record("0" * 64, "keep.pth")["output"]


def test_misfit_settings_fail_before_any_training(scored, tmp_path, capsys) -> None:
    from pipeline.training.run import run_train_head

    code = main(["train-head", "--scores", scored["scores"], "--labels", scored["labels_path"],
                 "--out", str(tmp_path / "x.pth"), "--workers", "2", "--lr", "1e-2", "--lr", "1e-3"])
    assert code == ExitCode.USAGE and "trains one config, but the grid has 2" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="select-uncertain --head"):
        run_train_head(scored["scores"], scored["labels_path"], str(tmp_path / "x.pth"), workers=2,
                       uncertain_count=5)
    scores_only = dataclasses.replace(scored["labels"], votes=None)
    with pytest.raises(ConfigError, match="emd loss needs vote counts"):
        distributed.train_distributed(scored["scores"], scores_only, TrainConfig(loss="emd"), workers=2)
    with pytest.raises(ConfigError, match="bce loss needs keep/trash"):
        distributed.train_distributed(scored["scores"], scored["labels"], TrainConfig(loss="bce"), workers=2)
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        distributed.train_distributed(scored["scores"], scored["labels"], workers=0)
