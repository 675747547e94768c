"""Fine-tuning CLIP on Ray Train (pipeline.training.finetune) with the tiny architecture, on real photographs
whose label is a planted rule of their pixels (blur and darkness, tests/training/finetune_data.py).

The Ray Train runs share the session's 2-CPU Ray: one worker of half a CPU (two for the data-parallel check),
the labelled images decoded once into the object store (``cache``), a few epochs each."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config import ModelConfig
from pipeline.errors import ExitCode
from pipeline.training import finetune as ft
from pipeline.training.labels import LabelTable, read_labels
from pipeline.training.losses import Objective, mixed_loss
from pipeline.training.schedule import DEFAULT_SCHEDULE, ScheduleError, load_schedule, parse_schedule
from pipeline.training.splits import TRAIN, split_assignments
from tests.drivers import REPO, kill_when
from tests.training import finetune_data

IMAGES, PER_SHARD = 240, 60
FRACTIONS = dict(val_fraction=0.2, test_fraction=0.2)  # ~50 validation and ~45 test images
TINY = ModelConfig(name="tiny-random", device="cpu")


@pytest.fixture(autouse=True)
def prompt_ray_train(monkeypatch):
    """Ray Train's controller polls its workers every 2 s; these epochs take under one."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> finetune_data.PlantedShards:
    return finetune_data.build(tmp_path_factory.mktemp("planted"), IMAGES, PER_SHARD, darkness_weight=0.5)


# -- losses and schedules (no Ray) ---------------------------------------------------------------


def test_mixed_loss_is_the_mean_of_the_l1_l2_l3_errors() -> None:
    error = torch.tensor([0.5, -2.0])
    expected = ((0.5 + 0.25 + 0.125) + (2 + 4 + 8)) / 3 / 2
    assert float(mixed_loss(error)) == pytest.approx(expected, rel=1e-6)
    objective = Objective(label_scale=2.0)
    # The error is divided by the label std first: predictions 1 and 4 against 2 and 0 are errors -0.5 and 2.
    got = objective("mixed", torch.tensor([1.0, 4.0]), torch.tensor([2.0, 0.0])).detach()
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_emd_from_a_mean_spreads_it_as_the_prediction_is_spread() -> None:
    objective = Objective(label_scale=1.0, initial_sigma=1.0)  # EMD_TARGET_SIGMA is 1.0 too
    scores = torch.tensor([3.0, 7.5])
    objective.requires_grad_(False)
    assert float(objective("emd", scores, scores)) == pytest.approx(0.0, abs=1e-7)  # same centre, same spread
    assert float(objective("emd", scores + 1, scores)) > 0.05
    votes = torch.zeros(1, 10)
    votes[0, 6] = 10  # everyone voted 7: a point mass, which a spread prediction centred on 7 does not reach
    assert 0 < float(objective("emd", torch.tensor([7.0]), torch.tensor([7.0]), votes)) \
        < float(objective("emd", torch.tensor([3.0]), torch.tensor([7.0]), votes))


def test_the_default_schedule_is_seed_001s_recipe() -> None:
    schedule = load_schedule()
    assert schedule.source == str(DEFAULT_SCHEDULE)
    assert [(s.optimizer, s.lr, s.epochs) for s in schedule.stages] == [
        ("adamw", 1e-4, 6), ("adam", 1e-5, 4), ("sgd", 1e-6, 2)]
    assert [schedule.at(epoch)[2] for epoch in range(1, 13)] == [
        "mse", "mse", "l1", "l1", "mixed", "mixed", "mixed", "mixed", "mixed", "mixed", "emd", "emd"]
    assert schedule.stage_start(2) == 11


@pytest.mark.parametrize("text, words", [
    ("stages: []", "non-empty list"),
    ("stages:\n  - {optimizer: lion, lr: 1e-4, epochs: 1, loss: mse}", "optimizer must be one of"),
    ("stages:\n  - {optimizer: adam, lr: 0, epochs: 1, loss: mse}", "lr must be > 0"),
    ("stages:\n  - {optimizer: adam, lr: 1e-4, epochs: 1, loss: [mse, huber]}", "loss must be one of"),
    ("stages:\n  - {optimizer: adam, lr: 1e-4, epochs: 1}", "missing ['loss']"),
    ("stages:\n  - {optimizer: adam, lr: 1e-4, epochs: 1, loss: mse, momentum: 0.9}", "momentum is for sgd"),
    ("stages: [", "is not YAML"),
])
def test_a_bad_schedule_file_is_one_line_naming_the_field(tmp_path, text, words) -> None:
    path = tmp_path / "schedule.yaml"
    path.write_text(text)
    with pytest.raises(ScheduleError, match=None) as raised:
        load_schedule(str(path))
    message = str(raised.value)
    assert words in message and str(path) in message and "\n" not in message


def test_cli_refuses_a_bad_schedule_and_labels_no_image_has(planted, tmp_path, capsys, ray_local) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - {optimizer: adam, lr: 1e-4, epochs: two, loss: mse}\n")
    base = ["finetune", "--input", planted.shards_dir, "--model", "tiny-random", "--out", str(tmp_path / "out")]
    assert main([*base, "--labels", planted.csv_path, "--schedule", str(bad)]) == ExitCode.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epochs must be an integer" in err[0]

    strangers = tmp_path / "strangers.csv"
    strangers.write_text("key,score\nnot-a-key,5\nnor-this,6\n")
    assert main([*base, "--labels", str(strangers)]) == ExitCode.INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matches a label" in err[0]
    assert not (tmp_path / "out").exists()


# -- fine-tuning on Ray Train --------------------------------------------------------------------
# Two runs of the same three-stage schedule (every optimizer and the mse, l1, mixed and emd losses) in
# full-batch steps: one worker, and two workers of which one is killed in epoch 2. With full batches the DDP
# average of two equal halves' mean losses is the one-worker mean loss, so both take the same steps up to float
# rounding; no augmentation and a linear head (no dropout) keep them deterministic.
FULL_BATCH = ft.FinetuneConfig(model=TINY, batch_size=4096, head_lr_scale=10, **FRACTIONS)
THREE_STAGES = parse_schedule({"stages": [
    {"optimizer": "adamw", "lr": 3e-4, "epochs": 3, "loss": ["mse", "l1", "mixed"]},
    {"optimizer": "adam", "lr": 1e-4, "epochs": 1, "loss": "mixed", "warmup_steps": 2},
    {"optimizer": "sgd", "lr": 1e-2, "epochs": 1, "loss": "emd", "momentum": 0.9}], "grad_clip": 5.0},
    "test schedule")


def _even_training_split(labels: LabelTable, config: ft.FinetuneConfig) -> LabelTable:
    """Drop one training label when there is an odd number: two workers then each get exactly half."""
    split = split_assignments(labels.keys, config.val_fraction, config.test_fraction, config.seed)
    keep = np.ones(len(labels), dtype=bool)
    if (split == TRAIN).sum() % 2:
        keep[np.flatnonzero(split == TRAIN)[0]] = False
    return LabelTable(labels.keys[keep], labels.scores[keep], labels.kind,
                      None if labels.votes is None else labels.votes[keep])


@pytest.fixture(scope="module")
def runs(planted, tmp_path_factory, ray_local) -> dict:
    import os

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"  # read when the controller starts
    folder = tmp_path_factory.mktemp("finetune")
    labels = _even_training_split(read_labels(planted.ava_path), FULL_BATCH)
    one = ft.finetune([planted.shards_dir], labels, str(folder / "one"), FULL_BATCH, THREE_STAGES, workers=1,
                      cpus_per_worker=0.5, cache=True)
    marker = folder / "killed"
    two = ft.finetune([planted.shards_dir], labels, str(folder / "two"), FULL_BATCH, THREE_STAGES, workers=2,
                      cpus_per_worker=0.5, cache=True, storage_path=str(folder / "runs"), max_failures=1,
                      fault_injection={"epoch": 2, "step": 0, "rank": 1, "marker": str(marker)})
    return dict(one=one, two=two, marker=marker, folder=folder)


def test_the_three_stages_run_every_loss_and_the_record_pins_both_files(runs) -> None:
    record = runs["one"].record
    assert [row["loss"] for row in record["history"]] == ["mse", "l1", "mixed", "mixed", "emd"]
    assert [row["stage"] for row in record["history"]] == [0, 0, 0, 1, 2]
    assert all(math.isfinite(row["train_loss"]) and row["images_per_s_per_worker"] > 0 for row in record["history"])
    assert record["history"][-1]["emd_sigma"] != record["history"][0]["emd_sigma"]  # the EMD stage trained it
    from pipeline.models.weights import sha256_of

    assert sha256_of(record["clip_file"]) == record["clip_sha256"]
    assert sha256_of(record["head_file"]) == record["head_sha256"]
    assert record["metrics"]["val"]["n"] == record["rows"]["val"]
    assert record["metrics"]["test"]["n"] == record["rows"]["test"]
    assert record["best_epoch"] == max(record["history"], key=lambda row: row["val_srcc"])["epoch"]
    print(f"\nfull-batch, 5 epochs: held-out SRCC val {record['metrics']['val']['srcc']:.3f}, "
          f"test {record['metrics']['test']['srcc']:.3f}")
    # The fine-tuned tower learned from the pixels: held-out SRCC against the planted rule is well above the
    # ~0.15 standard deviation of an uncorrelated ranking of this many images.
    assert record["metrics"]["test"]["srcc"] > 0.3, record["metrics"]


def test_two_workers_with_one_killed_mid_epoch_resume_and_match_one_worker(runs) -> None:
    one, two = runs["one"], runs["two"]
    assert runs["marker"].exists()  # rank 1 died in epoch 2
    assert two.record["resumed_after_epochs"] == [1]  # the new group started from epoch 1's checkpoint
    assert [row["epoch"] for row in two.record["history"]] == [1, 2, 3, 4, 5]
    assert one.record["rows"]["train"] % 2 == 0
    first, second = one.predictions["val"], two.predictions["val"]
    np.testing.assert_array_equal(first["keys"], second["keys"])
    difference = np.abs(first["predictions"] - second["predictions"]).max()
    print(f"\none vs two workers (one killed and resumed): max |prediction difference| {difference:.2e}")
    # Only the order of float32 sums differs (the all-reduce, each worker's mean): gradients agree to ~1e-7
    # relative, and the five smooth optimizer steps (Adam's g / (sqrt(v) + eps) included) carry that into scores
    # below 16, whose float32 spacing is 9.5e-7, at a few units of it: 1e-5 allows ten.
    assert difference < 1e-5
    assert two.record["metrics"]["val"]["srcc"] == pytest.approx(one.record["metrics"]["val"]["srcc"], abs=0.02)


def test_the_checkpoint_scores_through_the_scoring_job_as_the_trainer_predicted(runs, planted, capsys) -> None:
    from safetensors.torch import load_file

    from pipeline.analysis.reading import open_scores

    result = runs["one"]
    record = result.record
    output = runs["folder"] / "scores"
    code = main(["score", "--input", planted.shards_dir, "--output", str(output), "--model", record["clip_arch"],
                 "--precision", "fp32", "--pretrained", record["clip_file"],
                 "--pretrained-sha256", record["clip_sha256"],
                 "--head", f"{record['head_file']},sha256={record['head_sha256']}"])
    assert code == ExitCode.OK, capsys.readouterr().err
    scored = open_scores(str(output)).to_table(columns=["key", "aesthetic_score"]).to_pydict()
    by_key = dict(zip(scored["key"], scored["aesthetic_score"]))
    folded = load_file(record["head_file"])["weight"].double().abs().sum().item()
    for split in ("val", "test"):
        predicted = result.predictions[split]
        ours = np.asarray([by_key[key] for key in predicted["keys"]], dtype=np.float64)
        # The same fp32 ops on the same pixels; only the batch differs, which changes the rounding of each unit
        # embedding component (|u| < 0.2, float32 spacing <= 1.5e-8) by a few spacings: under 1e-7. The linear
        # head turns that into at most sum|w| * 1e-7, plus the float32 rounding of the stored score (< 1e-6).
        bound = folded * 1e-7 + 1e-6
        np.testing.assert_allclose(ours, predicted["predictions"], rtol=0, atol=bound)
        print(f"\n{split}: scoring job vs trainer, max |difference| {np.abs(ours - predicted['predictions']).max():.2e}"
              f" (bound {bound:.2e})")


def test_the_config_is_checked_at_the_edge() -> None:
    with pytest.raises(Exception, match="crop_scale"):
        ft.FinetuneConfig(crop_scale=0.1)
    with pytest.raises(Exception, match="arch"):
        dataclasses.replace(ft.FinetuneConfig(), arch="transformer")


# -- fine-tuning against a head on the frozen embeddings -----------------------------------------------------------
# Blur and darkness (above) are visible to the random tower's frozen features too, and a head on them ranks those
# images as well as fine-tuning does. This rule is not: a faint grey texture in the null space of the frozen
# tower's patch projection (finetune_data.null_texture), so its strength barely moves the frozen embedding, while
# fine-tuning turns a patch filter towards it. Minibatches of 32, mse, one AdamW stage at 1e-3 (head too).
TEXTURE_IMAGES = 240
COMPARE = ft.FinetuneConfig(model=TINY, batch_size=32, head_lr_scale=1, **FRACTIONS)
COMPARE_SCHEDULE = parse_schedule({"stages": [{"optimizer": "adamw", "lr": 1e-3, "epochs": 12, "loss": "mse"}]},
                                  "compare schedule")
MARGIN = 0.3


def test_finetuning_beats_the_frozen_embeddings_head_on_a_rule_beyond_them(tmp_path_factory, ray_local) -> None:
    result = finetune_data.compare_on_texture(tmp_path_factory.mktemp("textured"), TEXTURE_IMAGES, PER_SHARD,
                                              COMPARE, COMPARE_SCHEDULE)
    print(f"\ntexture rule, {result.line()}")
    assert result.difference == pytest.approx(result.tuned["metrics"]["test"]["srcc"] - result.frozen["test"],
                                              abs=1e-6)
    # The margin, and the whole 95% bootstrap interval of it over the test images, clear of zero.
    assert result.difference > MARGIN and result.low > 0.1, result.line()


def test_checkpoints_and_the_result_go_to_s3_and_a_rerun_resumes_from_there(planted, s3_server, s3_bucket,
                                                                          ray_local) -> None:
    labels = read_labels(planted.csv_path)
    schedule = parse_schedule({"stages": [{"optimizer": "adamw", "lr": 1e-3, "epochs": 2, "loss": "mse"}]}, "s3")
    out, runs = f"s3://{s3_bucket}/finetuned", f"s3://{s3_bucket}/train-runs"
    options = s3_server.storage_options
    first = ft.finetune([planted.shards_dir], labels, out, COMPARE, schedule, cpus_per_worker=0.5, cache=True,
                        storage_path=runs, storage_options=options)
    fs = s3_server.filesystem()
    assert fs.glob(f"{s3_bucket}/train-runs/*/checkpoint_*")  # Ray Train's checkpoints, on the S3 server
    for name in (ft.CLIP_FILE, ft.HEAD_FILE, ft.RECORD_FILE):
        assert fs.exists(f"{s3_bucket}/finetuned/{name}")
    import hashlib

    assert hashlib.sha256(fs.cat(f"{s3_bucket}/finetuned/{ft.HEAD_FILE}")).hexdigest() == first.record["head_sha256"]
    # The same command again: the finished run is found in the S3 storage and nothing is trained again.
    again = ft.finetune([planted.shards_dir], labels, out, COMPARE, schedule, cpus_per_worker=0.5, cache=True,
                        storage_path=runs, storage_options=options)
    assert again.record["head_sha256"] == first.record["head_sha256"]
    # The epochs' records come from the stored checkpoint: each epoch's measured wall seconds, which a run
    # trained again could not repeat.
    assert again.record["history"] == first.record["history"]


# -- a killed driver -----------------------------------------------------------------------------

def _registered_checkpoint(storage) -> bool:
    """Whether Ray Train's controller has registered a checkpoint (its snapshot lists one). A checkpoint's folder
    is there before that: a driver killed in between resumes from the checkpoint before it, here none."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("checkpoint_results"):
                return True
        except (OSError, ValueError):  # being written
            pass
    return False


def test_a_driver_killed_mid_run_is_resumed_by_the_rerun_from_its_last_checkpoint(planted, tmp_path) -> None:
    storage, out = tmp_path / "train-storage", tmp_path / "out"
    schedule = tmp_path / "schedule.yaml"
    schedule.write_text("stages:\n  - {optimizer: adamw, lr: 3e-4, epochs: 8, loss: mse}\n")
    command = [sys.executable, "-m", "pipeline.cli", "finetune", "--input", planted.shards_dir, "--labels",
               planted.csv_path, "--model", "tiny-random", "--out", str(out), "--schedule", str(schedule),
               "--train-storage", str(storage), "--cache", "--val-fraction", "0.2", "--test-fraction", "0.2"]
    kill_when(command, tmp_path / "first.log", lambda: _registered_checkpoint(storage),
              env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"})
    assert not (out / "finetune.json").exists()

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    record = json.loads((out / "finetune.json").read_text())
    print(f"\nkilled the driver; the rerun resumed after epochs {record['resumed_after_epochs']}")
    (resumed_after,) = record["resumed_after_epochs"]
    assert 1 <= resumed_after < 8
    assert [row["epoch"] for row in record["history"]] == list(range(1, 9))  # each epoch once, none lost
