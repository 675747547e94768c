"""Training heads on synthetic embeddings with a planted score: recovery, losses, the saved file formats,
and the train-head job end to end."""

from __future__ import annotations

import copy
import hashlib
import json
import math

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, HeadSpec, WeightsSpec
from pipeline.evaluate import spearman
from pipeline.models.heads import Head, HeadBank, HeadFormat, detect_head_format, load_head_bank
from pipeline.training.labels import LabelKind
from pipeline.training.train_head import (
    TEST,
    VALIDATION,
    TrainConfig,
    TrainingSet,
    build_head_module,
    config_grid,
    emd_loss,
    export_state_dict,
    record_path_for,
    save_head,
    split_assignments,
    train_head,
    train_many,
)
from tests.tolerances import assert_within, folded_error_bound, head_reference, linear_layers, mlp_error_bound
from tests.training import synthetic

ROWS, DIM = 1500, 32
FAST = dict(lr=1e-2, batch_size=128, patience=5)
SMALL_MLP = (32, 16, 8, 4)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny matmuls: a second thread only adds contention on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def planted() -> dict[str, np.ndarray]:
    return synthetic.planted_set(ROWS, DIM)


def _data(planted, binary: bool = False) -> TrainingSet:
    if binary:
        return TrainingSet(planted["keys"], planted["embeddings"], (planted["truth"] >= 5).astype(np.float64),
                           LabelKind.BINARY)
    return TrainingSet(planted["keys"], planted["embeddings"], planted["means"], votes=planted["votes"])


@pytest.mark.parametrize("loss", ["mse", "emd", "l1"])
def test_a_linear_head_recovers_the_planted_score(planted, loss) -> None:
    trained = train_head(_data(planted), TrainConfig(loss=loss, **FAST))
    held_out = trained.split == TEST
    synthetic.assert_recovers_planted_score(trained, trained.predict(planted["embeddings"]), planted["truth"],
                                            held_out, loss)
    assert trained.head_format is HeadFormat.LINEAR
    if loss == "emd":
        # The learned spread of the predicted vote distribution finds the one the votes were drawn with.
        assert trained.emd_sigma == pytest.approx(synthetic.VOTE_SPREAD, abs=0.2)
    else:
        assert trained.metrics["test"]["mse"] < 0.1 and trained.emd_sigma is None


@pytest.mark.parametrize("arch, head_format", [("mlp", HeadFormat.LINEAR_MLP), ("relu-mlp", HeadFormat.RELU_MLP)])
def test_mlp_heads_save_in_the_laion_layouts_and_load_like_them(planted, tmp_path, arch, head_format) -> None:
    trained = train_head(_data(planted), TrainConfig(arch=arch, hidden=SMALL_MLP, max_epochs=40, **FAST))
    assert detect_head_format(trained.state_dict) is head_format
    record = save_head(trained, str(tmp_path / f"{arch}.pth"))

    file_bytes = (tmp_path / f"{arch}.pth").read_bytes()
    assert record["sha256"] == hashlib.sha256(file_bytes).hexdigest()
    assert json.loads((tmp_path / f"{arch}.json").read_text())["sha256"] == record["sha256"]
    # The scoring job's loader, with the pin it would be given.
    bank = load_head_bank([HeadSpec(arch, WeightsSpec(str(tmp_path / f"{arch}.pth"), record["sha256"]))])
    assert bank.identities == (f"{arch}@{record['sha256'][:12]}",)
    scored = bank.score(torch.from_numpy(planted["embeddings"]))[arch]
    # The loaded file and predict both score with a HeadBank of these parameters: each is within the bank's
    # float32 bound of the exact score.
    expected, bound = head_reference(bank.heads[0], planted["embeddings"])
    assert_within(scored, expected, bound, "scored from the file")
    assert_within(trained.predict(planted["embeddings"]), expected, bound, "predict")
    held_out = trained.split == TEST
    assert spearman(scored[held_out], planted["truth"][held_out]) > 0.9


@pytest.mark.parametrize("arch", ["linear", "mlp", "relu-mlp"])
def test_export_folds_the_standardisation_into_the_file_exactly(arch) -> None:
    """The file computes what the training module computed, from raw unit embeddings."""
    generator = torch.Generator().manual_seed(0)
    module = build_head_module(TrainConfig(arch=arch, hidden=SMALL_MLP), DIM).eval()
    mean, scale = torch.randn(DIM, generator=generator) * 0.1, torch.rand(DIM, generator=generator) + 0.05
    embeddings = torch.nn.functional.normalize(torch.randn(50, DIM, generator=generator), dim=1)
    with torch.no_grad():  # in float64: the exact value, to ~2**-29 of the float32 bound below
        reference = copy.deepcopy(module).double()
        expected = reference((embeddings.double() - mean.double()) / scale.double())[:, 0] * 1.7 + 5.3
    state_dict = export_state_dict(module, mean, scale, 5.3, 1.7)
    head = Head.from_state_dict("folded", state_dict)
    # The file's first and last layers are rescaled in float64 and rounded to float32 (one rounding each,
    # carried through the other layers); the bank then folds the layers and takes one float32 dot product,
    # or runs the ReLU MLP in float32.
    layers = linear_layers(state_dict)
    rescaled = {0, len(layers) - 1}
    if head.foldable:
        bound = (folded_error_bound(layers, embeddings)
                 + mlp_error_bound(layers, embeddings, rounded=rescaled, evaluated=False)[:, 0])
    else:
        bound = mlp_error_bound(layers, embeddings, relu=True, rounded=rescaled)[:, 0]
    assert_within(HeadBank([head]).score(embeddings)["folded"], expected.numpy(), bound, arch)


def test_keep_trash_labels_train_a_logit_head(planted) -> None:
    trained = train_head(_data(planted, binary=True), TrainConfig(loss="bce", max_epochs=40, **FAST))
    test = trained.metrics["test"]
    assert test["accuracy"] > 0.9  # logit >= 0 against keep
    record = trained.record("0" * 64, "keep.pth")
    assert record["label_kind"] == LabelKind.BINARY and "logit" in record["output"]


def test_emd_loss_is_zero_for_equal_distributions_and_grows_with_distance() -> None:
    one_hot = torch.eye(10)
    assert float(emd_loss(one_hot, one_hot)) == 0
    near, far = float(emd_loss(one_hot[[4]], one_hot[[5]])), float(emd_loss(one_hot[[4]], one_hot[[9]]))
    assert near == pytest.approx(math.sqrt(1 / 10)) and far == pytest.approx(math.sqrt(5 / 10))


def test_splits_are_stable_as_labels_are_added() -> None:
    keys = [f"k{i}" for i in range(2000)]
    first = split_assignments(keys, 0.1, 0.1, seed=0)
    grown = split_assignments(keys + [f"new{i}" for i in range(500)], 0.1, 0.1, seed=0)
    np.testing.assert_array_equal(first, grown[:2000])
    assert abs((first == VALIDATION).mean() - 0.1) < 0.03 and abs((first == TEST).mean() - 0.1) < 0.03
    assert not np.array_equal(first, split_assignments(keys, 0.1, 0.1, seed=1))


def test_misfit_settings_are_clear_errors(planted) -> None:
    scores_only = TrainingSet(planted["keys"], planted["embeddings"], planted["means"])
    with pytest.raises(ConfigError, match="emd loss needs vote counts"):
        train_head(scores_only, TrainConfig(loss="emd"))
    with pytest.raises(ConfigError, match="bce loss needs keep/trash"):
        train_head(scores_only, TrainConfig(loss="bce"))
    with pytest.raises(ConfigError, match="too few labelled rows"):
        train_head(TrainingSet(planted["keys"][:3], planted["embeddings"][:3], planted["means"][:3]))
    with pytest.raises(ConfigError, match="arch must be one of"):
        TrainConfig(arch="transformer")
    with pytest.raises(ConfigError, match="val_fraction"):
        TrainConfig(val_fraction=0.6, test_fraction=0.5)


def test_a_grid_trains_every_combination_best_first(planted) -> None:
    configs = config_grid(TrainConfig(max_epochs=15, **FAST), lr=[1e-2, 1e-5], arch=["linear"])
    assert [c.lr for c in configs] == [1e-2, 1e-5]
    trials = train_many(_data(planted), configs)
    assert [t.config.lr for t in trials] == [1e-2, 1e-5]  # the tiny learning rate barely moves in 15 epochs
    assert trials[0].selection_score >= trials[1].selection_score


def test_a_grid_runs_as_ray_tasks(planted, ray_local) -> None:
    configs = config_grid(TrainConfig(max_epochs=15, **FAST), lr=[1e-2, 1e-5])
    trials = train_many(_data(planted), configs, use_ray=True)
    assert [t.config.lr for t in trials] == [1e-2, 1e-5] and trials[0].metrics["test"]["srcc"] > 0.95


def test_record_paths() -> None:
    assert record_path_for("/heads/ava.pth") == "/heads/ava.json"
    assert record_path_for("s3://b/v1.2/head") == "s3://b/v1.2/head.json"


def test_train_head_job_end_to_end(planted, tmp_path, capsys) -> None:
    """Scored output + AVA.txt -> the CLI writes the head, its record and the list of images to label next."""
    from pipeline.cli import main

    keys = list(planted["keys"])
    statuses = ["ok"] * ROWS
    statuses[7] = "decode_error"
    scored = synthetic.write_scored(tmp_path / "scored", keys, planted["embeddings"], statuses)
    labelled = 1200  # the rest are candidates for labelling
    (tmp_path / "AVA.txt").write_text(synthetic.ava_text(keys[:labelled], planted["votes"][:labelled]))

    code = main(["train-head", "--scores", str(scored), "--labels", str(tmp_path / "AVA.txt"),
                 "--out", str(tmp_path / "head.pth"), "--lr", "1e-2", "--batch-size", "128", "--patience", "5",
                 "--uncertain", "20"])
    assert code == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "head.json").read_text())
    assert f"sha256: {record['sha256']}" in printed
    assert "labelled rows: 1199 (1 labels had no scored ok row)" in printed  # row 7 failed to decode
    assert record["rows"]["train"] + record["rows"]["val"] + record["rows"]["test"] == 1199
    assert record["metrics"]["test"]["srcc"] > 0.95 and record["labels"].endswith("AVA.txt")

    import pandas as pd

    sheet = pd.read_csv(tmp_path / "head-uncertain.csv", dtype={"key": str}, keep_default_na=False)
    assert len(sheet) == 20 and set(sheet["key"]).isdisjoint(keys[:labelled])
    assert (sheet["margin"].diff().dropna() >= 0).all() and (sheet["label"] == "").all()
    assert list(sheet.columns[:4]) == ["key", "score", "margin", "label"]


def test_keep_trash_mode_from_scores(planted, tmp_path) -> None:
    from pipeline.training.run import run_train_head

    keys = list(planted["keys"])
    scored = synthetic.write_scored(tmp_path / "scored", keys, planted["embeddings"])
    (tmp_path / "AVA.txt").write_text(synthetic.ava_text(keys, planted["votes"]))
    report = run_train_head(str(scored), str(tmp_path / "AVA.txt"), str(tmp_path / "keep.pth"),
                            keep_percentile=50, config=TrainConfig(max_epochs=40, **FAST))
    assert report.trials[0].config.loss == "bce" and report.record["keep_percentile"] == 50
    assert report.record["metrics"]["test"]["accuracy"] > 0.85


def test_labels_that_match_no_scored_row_are_a_clear_error(planted, tmp_path) -> None:
    from pipeline.training.run import run_train_head

    scored = synthetic.write_scored(tmp_path / "scored", list(planted["keys"][:50]), planted["embeddings"][:50])
    (tmp_path / "other.csv").write_text("key,score\nnot-a-key,5\n")
    with pytest.raises(ConfigError, match="no scored ok row matches a label"):
        run_train_head(str(scored), str(tmp_path / "other.csv"), str(tmp_path / "x.pth"))
