"""The embed stage with the tiny CLIP on each device and in each precision, against the exact scores.

A run's scores must lie within the first-order rounding bound its arithmetic allows around the exact
(float64) scores of the fp32 model (tests/stages/embed_rounding.py derives it), so two runs lie within the
sum of their bounds of each other. The CPU tests check that derivation where any machine can: the float64
trace is the model, and CPU fp32 and bf16 runs stay inside their bounds. The GPU test holds CUDA fp32 and
bf16 runs to theirs, and to the CPU's scores.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import schema
from pipeline.models.clip import LoadedClip, load_clip
from pipeline.models.heads import HeadBank
from pipeline.stages.embed import EmbedScore
from tests.stages.embed_rounding import Arithmetic, Trace, head_score, score_bounds
from tests.stages.test_embed import HEAD_SPECS, TINY, _batch, _head_state_dicts
from tests.tolerances import assert_within

ROWS = 6
SCORE_COLUMNS = (schema.AESTHETIC_SCORE, schema.score_column("v1.like"), schema.score_column("relu+like"))
FLOAT64 = 2.0 ** -53


@pytest.fixture(scope="module")
def fp32_clip() -> LoadedClip:
    return load_clip(TINY)


@pytest.fixture(scope="module")
def bank() -> HeadBank:
    return HeadBank.from_state_dicts(_head_state_dicts().items())


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return _batch(ROWS, statuses=("ok",) * ROWS)[schema.PIXELS]


def _stage_scores(device: str, precision: str, bank: HeadBank, pixels: np.ndarray, **options) -> np.ndarray:
    """(N, H) scores of EmbedScore with the tiny model on ``device`` in ``precision`` (and ModelConfig ``options``)."""
    config = dataclasses.replace(TINY, device=device, precision=precision, **options)
    clip = load_clip(config)
    assert (clip.device.type, clip.precision) == (device, precision)
    batch = _batch(len(pixels), statuses=("ok",) * len(pixels))
    batch[schema.PIXELS] = pixels
    out = EmbedScore(config, HEAD_SPECS, loader=lambda: (clip, bank))(batch)
    assert list(out[schema.STATUS]) == ["ok"] * len(pixels)
    return np.stack([out[column] for column in SCORE_COLUMNS], axis=1)


def test_the_float64_trace_is_the_model(fp32_clip, bank, pixels) -> None:
    """The trace computes what the model computes: its exact scores and those of the model itself run in
    float64 are two float64 computations of the same scores, each within the float64 bound of them."""
    float64 = Arithmetic(stored=FLOAT64, accumulated=FLOAT64, stage=np.float64)
    exact, bound = score_bounds(fp32_clip, bank.heads, pixels, float64)
    model = copy.deepcopy(fp32_clip.model).double()
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).double()
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (fp32_clip.mean, fp32_clip.std))
    with torch.inference_mode():
        unit = F.normalize(model.encode_image((x / 255 - mean) / std), dim=-1)
    with torch.inference_mode():
        scores = torch.stack([head_score(Trace(float64), head, unit) for head in bank.heads], dim=1).numpy()
    assert_within(scores, exact, 2 * bound, "the float64 model's scores against the trace's")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_scores_are_within_their_rounding_bound(fp32_clip, bank, pixels, precision) -> None:
    exact, bound = score_bounds(fp32_clip, bank.heads, pixels, Arithmetic.of("cpu", precision))
    assert_within(_stage_scores("cpu", precision, bank, pixels), exact, bound, f"CPU {precision} scores")


def test_bf16_autocast_on_fp32_weights_is_within_its_rounding_bound(fp32_clip, bank, pixels) -> None:
    exact, bound = score_bounds(fp32_clip, bank.heads, pixels, Arithmetic.of("cpu", "amp_bf16"))
    assert_within(_stage_scores("cpu", "amp_bf16", bank, pixels), exact, bound, "CPU amp_bf16 scores")


def test_channels_last_changes_only_the_memory_order(fp32_clip, bank, pixels) -> None:
    exact, bound = score_bounds(fp32_clip, bank.heads, pixels, Arithmetic.of("cpu", "fp32"))
    assert_within(_stage_scores("cpu", "fp32", bank, pixels, channels_last=True), exact, bound,
                  "channels-last scores")


def test_a_compiled_tower_scores_padded_batches_within_the_fp32_bound(fp32_clip, bank, pixels) -> None:
    """torch.compile may fuse and reorder the tower's sums: the bound holds for any order. Batches of 5 and
    6 images both run padded to 8 (one compiled shape), and a row's score does not depend on its padding."""
    exact, bound = score_bounds(fp32_clip, bank.heads, pixels, Arithmetic.of("cpu", "fp32"))
    config = dataclasses.replace(TINY, compile=True)
    stage = EmbedScore(config, HEAD_SPECS, loader=lambda: (load_clip(config), bank))
    scores = []
    for rows in (slice(0, 5), slice(0, ROWS)):
        batch = _batch(ROWS, statuses=("ok",) * ROWS)
        batch = {key: value[rows] for key, value in batch.items()}
        batch[schema.PIXELS] = pixels[rows]
        out = stage(batch)
        scores.append(np.stack([out[column] for column in SCORE_COLUMNS], axis=1))
    assert_within(scores[1], exact, bound, "compiled fp32 scores")
    assert_within(scores[0], exact[:5], bound[:5], "compiled fp32 scores of a padded batch")


@pytest.mark.gpu
def test_cuda_scores_agree_with_the_cpu_within_their_rounding_bounds(fp32_clip, bank, pixels) -> None:
    """CUDA fp32 (TF32 where torch's flags allow it) and bf16 runs of the stage, each within its own bound of
    the exact scores, and within its bound plus the CPU fp32 run's of that run's scores."""
    exact, cpu_bound = score_bounds(fp32_clip, bank.heads, pixels, Arithmetic.of("cpu", "fp32"))
    cpu = _stage_scores("cpu", "fp32", bank, pixels)
    assert_within(cpu, exact, cpu_bound, "CPU fp32 scores")
    for precision in ("fp32", "bf16"):
        _, bound = score_bounds(fp32_clip, bank.heads, pixels, Arithmetic.of("cuda", precision))
        cuda = _stage_scores("cuda", precision, bank, pixels)
        assert_within(cuda, exact, bound, f"CUDA {precision} scores")
        assert_within(cuda, cpu, bound + cpu_bound, f"CUDA {precision} scores against CPU fp32 ones")
