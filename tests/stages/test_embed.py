"""The embed + score stage on hand-built batches, with the tiny random CLIP and injected heads (no Ray)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline import schema
from pipeline.config import HeadSpec, ModelConfig, WeightsSpec
from pipeline.models.clip import LoadedClip, load_clip
from pipeline.models.heads import EmbeddingDimMismatch, Head, HeadBank
from pipeline.schema import Status
from pipeline.stages.embed import EmbedScore
from tests.tolerances import (
    as_float64,
    assert_within,
    dot_error_bound,
    gamma,
    head_reference,
    normalize_error_bound,
    unit_mean,
    unit_roundoff,
)

TINY = ModelConfig(name="tiny-random", device="cpu", precision="fp32", seed=0)
STATUSES = ("ok", "decode_error", "ok", "no_image", "ok", "ok")


def _head_state_dicts(dim: int = 768) -> dict[str, dict[str, torch.Tensor]]:
    """A V2-shaped linear MLP (primary), a V1 linear head and a ReLU MLP, seeded."""
    generator = torch.Generator().manual_seed(0)

    def layers(indices, widths):
        state_dict, width = {}, dim
        for index, out_width in zip(indices, widths):
            prefix = "" if index is None else f"layers.{index}."
            state_dict[prefix + "weight"] = torch.randn(out_width, width, generator=generator) / width ** 0.5
            state_dict[prefix + "bias"] = torch.randn(out_width, generator=generator)
            width = out_width
        return state_dict

    return {
        "v2-like": layers((0, 2, 4, 6, 7), (64, 32, 16, 8, 1)),
        "v1.like": layers((None,), (1,)),
        "relu+like": layers((0, 3, 6, 9, 11), (64, 32, 16, 8, 1)),
    }


HEAD_SPECS = tuple(HeadSpec(name, WeightsSpec(f"/unused/{name}.pth")) for name in _head_state_dicts())


@pytest.fixture(scope="module")
def tiny_clip() -> LoadedClip:
    return load_clip(TINY)


@pytest.fixture(scope="module")
def head_bank() -> HeadBank:
    return HeadBank.from_state_dicts(_head_state_dicts().items())


class _Recording:
    """Stands in for the CLIP model: runs it and keeps what each of its towers was given and gave back."""

    def __init__(self, model) -> None:
        self.model = model
        self.images, self.image_features, self.tokens, self.text_features = [], [], [], []

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image(images)
        self.images.append(images.clone())
        self.image_features.append(features.clone())
        return features

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_text(tokens)
        self.tokens.append(tokens.clone())
        self.text_features.append(features.clone())
        return features


def _check_model_input(clip: LoadedClip, pixels: np.ndarray, model_input: torch.Tensor) -> None:
    """What the model was given is (x / 255 - mean) / std of the uint8 NHWC pixels, as NCHW, to within
    float32 rounding. The stage computes x * (1 / (255 std)) - mean / std: the scale rounds twice and the
    product once (gamma_3 of |x| / (255 std)), the shift once, the difference once: gamma_4 of the magnitudes."""
    x = as_float64(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    mean, std = (as_float64(torch.tensor(v)).reshape(1, 3, 1, 1) for v in (clip.mean, clip.std))
    assert model_input.dtype == torch.float32 and model_input.shape == x.shape
    assert_within(model_input, (x / 255 - mean) / std, gamma(4) * (x / 255 + np.abs(mean)) / std, "model input")


def _stage(clip: LoadedClip, bank: HeadBank, **kwargs) -> EmbedScore:
    return EmbedScore(TINY, HEAD_SPECS, loader=lambda: (clip, bank), **kwargs)


def _batch(n: int = len(STATUSES), statuses=STATUSES, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        schema.KEY: np.array([f"{i:09d}" for i in range(n)], dtype=object),
        schema.PIXELS: rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8),
        schema.STATUS: np.array(statuses, dtype=object),
        schema.ERROR: np.array([None if s == "ok" else f"why {s}" for s in statuses], dtype=object),
        schema.WIDTH: np.arange(n, dtype=np.int32),
    }


def test_scores_ok_rows_and_passes_the_others_through(tiny_clip, head_bank) -> None:
    batch = _batch()
    out = _stage(tiny_clip, head_bank, write_embeddings=True)(batch)
    ok = np.array([s == "ok" for s in STATUSES])

    assert schema.PIXELS not in out
    np.testing.assert_array_equal(out[schema.KEY], batch[schema.KEY])
    np.testing.assert_array_equal(out[schema.WIDTH], batch[schema.WIDTH])
    assert list(out[schema.STATUS]) == list(STATUSES)
    assert list(out[schema.ERROR]) == list(batch[schema.ERROR])

    score_columns = (schema.AESTHETIC_SCORE, schema.score_column("v1.like"), schema.score_column("relu+like"))
    for column in score_columns:
        assert out[column].dtype == np.float32 and out[column].shape == (6,)
        assert np.isfinite(out[column][ok]).all() and np.isnan(out[column][~ok]).all()

    embeddings = out[schema.EMBEDDING]
    assert embeddings.dtype == np.float16 and embeddings.shape == (6, 768)
    # Unit length up to fp16 storage: each component rounded by at most u (2**-11) relative, or 2**-25 below
    # fp16's normal range; the stage's float32 normalisation and this norm add gamma_{D/2+2} each.
    dim = embeddings.shape[1]
    bound = unit_roundoff(np.float16) + np.sqrt(dim) * 2.0 ** -25 + 2 * gamma(dim // 2 + 2)
    assert_within(np.linalg.norm(embeddings[ok].astype(np.float32), axis=1), 1.0, bound, "stored embedding norms")
    assert not embeddings[~ok].any()

    assert set(out[schema.MODEL]) == {"tiny-random(seed=0)"}
    assert set(out[schema.HEAD]) == {head_bank.identities[0]}


def test_scores_match_the_heads_on_the_model_embedding(tiny_clip, head_bank) -> None:
    """The stage's normalisation, then the heads on the model's unit embedding, each to within its float32
    rounding bound. (The tiny model itself runs as it runs: its float32 output is taken as it came out.)"""
    batch = _batch(statuses=("ok",) * 6)
    recording = _Recording(tiny_clip.model)
    out = _stage(dataclasses.replace(tiny_clip, model=recording), head_bank)(batch)
    (model_input,), (features,) = recording.images, recording.image_features
    _check_model_input(tiny_clip, batch[schema.PIXELS], model_input)
    unit = as_float64(features) / np.linalg.norm(as_float64(features), axis=1, keepdims=True)
    for head, column in zip(head_bank.heads, (schema.AESTHETIC_SCORE, schema.score_column("v1.like"),
                                              schema.score_column("relu+like"))):
        # Within the bank's float32 bound of the head's exact score, given that the unit embedding was
        # itself normalised in float32.
        expected, bound = head_reference(head, unit, input_error=normalize_error_bound(features))
        assert_within(out[column], expected, bound, column)


def test_results_are_deterministic_for_a_seed(head_bank) -> None:
    first = _stage(load_clip(TINY), head_bank)(_batch())
    second = _stage(load_clip(TINY), head_bank)(_batch())
    other_seed = _stage(load_clip(dataclasses.replace(TINY, seed=1)), head_bank)(_batch())
    np.testing.assert_array_equal(first[schema.AESTHETIC_SCORE], second[schema.AESTHETIC_SCORE])
    ok = first[schema.STATUS] == "ok"
    assert not np.array_equal(first[schema.AESTHETIC_SCORE][ok], other_seed[schema.AESTHETIC_SCORE][ok])


def test_embeddings_are_left_out_unless_asked(tiny_clip, head_bank) -> None:
    assert schema.EMBEDDING not in _stage(tiny_clip, head_bank)(_batch())


def test_batches_without_ok_rows_and_empty_batches(tiny_clip, head_bank) -> None:
    stage = _stage(tiny_clip, head_bank, write_embeddings=True)
    out = stage(_batch(3, statuses=("decode_error", "no_image", "empty_image")))
    assert np.isnan(out[schema.AESTHETIC_SCORE]).all()
    assert list(out[schema.STATUS]) == ["decode_error", "no_image", "empty_image"]
    empty = stage(_batch(0, statuses=()))
    assert empty[schema.AESTHETIC_SCORE].shape == (0,) and empty[schema.EMBEDDING].shape == (0, 768)
    assert empty[schema.MODEL].shape == (0,)


class _NaNForBrightCorner(torch.nn.Module):
    """A stand-in image tower: a constant embedding, NaN for images whose top-left pixel is bright."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        features = torch.ones(images.shape[0], 768, dtype=torch.float32)
        features[images[:, 0, 0, 0] > 0] = float("nan")
        return features


def test_a_non_finite_score_marks_only_that_row(tiny_clip, head_bank) -> None:
    stub = dataclasses.replace(tiny_clip, model=_NaNForBrightCorner(), identity="stub")
    batch = _batch(statuses=("ok",) * 6)
    batch[schema.PIXELS][:, 0, 0, :] = 0
    batch[schema.PIXELS][2, 0, 0, :] = 255
    out = _stage(stub, head_bank, write_embeddings=True)(batch)
    assert list(out[schema.STATUS]) == ["ok", "ok", Status.SCORE_ERROR.value, "ok", "ok", "ok"]
    assert "non-finite" in out[schema.ERROR][2] and out[schema.ERROR][0] is None
    assert np.isnan(out[schema.AESTHETIC_SCORE][2]) and not out[schema.EMBEDDING][2].any()
    assert np.isfinite(np.delete(out[schema.AESTHETIC_SCORE], 2)).all()


def test_ragged_pixels_flag_only_the_malformed_row(tiny_clip, head_bank) -> None:
    batch = _batch(3, statuses=("ok", "ok", "ok"))
    ragged = np.empty(3, dtype=object)
    ragged[:] = [batch[schema.PIXELS][0], np.zeros((10, 10, 3), np.uint8), batch[schema.PIXELS][2]]
    batch[schema.PIXELS] = ragged
    out = _stage(tiny_clip, head_bank)(batch)
    assert list(out[schema.STATUS]) == ["ok", Status.SCORE_ERROR.value, "ok"]
    assert "shape" in out[schema.ERROR][1]
    assert np.isfinite(out[schema.AESTHETIC_SCORE][[0, 2]]).all() and np.isnan(out[schema.AESTHETIC_SCORE][1])


def test_wrongly_sized_batch_is_a_wiring_error(tiny_clip, head_bank) -> None:
    batch = _batch(2, statuses=("ok", "ok"))
    batch[schema.PIXELS] = np.zeros((2, 256, 256, 3), np.uint8)
    with pytest.raises(ValueError, match="224"):
        _stage(tiny_clip, head_bank)(batch)


@pytest.mark.parametrize("threads", [3, lambda: 3])
def test_torch_threads_are_set_before_the_model_loads(tiny_clip, head_bank, threads) -> None:
    before = torch.get_num_threads()
    seen_at_load = []

    def loader():
        seen_at_load.append(torch.get_num_threads())
        return tiny_clip, head_bank

    try:
        EmbedScore(TINY, HEAD_SPECS, loader=loader, torch_threads=threads)
        assert seen_at_load == [3] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_heads_for_another_embedding_size_fail_at_start(tiny_clip) -> None:
    b32_like = HeadBank([Head.from_state_dict("b32", {"weight": torch.randn(1, 512), "bias": torch.zeros(1)})])
    spec = (HeadSpec("b32", WeightsSpec("/unused/b32.pth")),)
    with pytest.raises(EmbeddingDimMismatch, match="512"):
        EmbedScore(TINY, spec, loader=lambda: (tiny_clip, b32_like))


# -- zero-shot prompt columns ---------------------------------------------------------------------------

PROMPT_YAML = """\
version: 1
sets:
  aesthetic: {positive: an outstanding picture, negative: a horrible picture}
  lighting:
    positive: ["a photo with beautiful lighting", "a well-lit photo"]
    negative: ["a photo with poor lighting", "a badly lit photo"]
"""


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text(PROMPT_YAML)
    return str(path)


def test_prompts_add_one_column_per_set(tiny_clip, head_bank, prompt_file) -> None:
    batch = _batch()
    recording = _Recording(tiny_clip.model)
    stage = _stage(dataclasses.replace(tiny_clip, model=recording), head_bank, prompts=prompt_file)
    out = stage(batch)
    ok = np.array([s == "ok" for s in STATUSES])
    columns = ("score_prompt_aesthetic", "score_prompt_lighting")
    assert stage.score_columns[-2:] == columns
    assert stage.prompt_identity.startswith("prompts:prompts.yaml@")

    # Each set, by hand, from what the towers gave: the ok rows' unit image embeddings against the unit
    # mean of each side's prompt embeddings (as the text tower produced them, in whatever batch).
    (model_input,), (features,) = recording.images, recording.image_features
    _check_model_input(tiny_clip, batch[schema.PIXELS][ok], model_input)
    tokens, text_features = torch.cat(recording.tokens), torch.cat(recording.text_features)

    def side(*texts: str) -> tuple[np.ndarray, float]:
        rows = [int(torch.nonzero((tokens == tiny_clip.tokenizer([text])[0]).all(dim=1))[0, 0]) for text in texts]
        return unit_mean(text_features[rows])

    sets = {"score_prompt_aesthetic": (side("an outstanding picture"), side("a horrible picture")),
            "score_prompt_lighting": (side("a photo with beautiful lighting", "a well-lit photo"),
                                      side("a photo with poor lighting", "a badly lit photo"))}
    unit = as_float64(features) / np.linalg.norm(as_float64(features), axis=1, keepdims=True)
    unit_error = normalize_error_bound(features)
    for column in columns:
        assert out[column].dtype == np.float32 and out[column].shape == (6,)
        assert np.isnan(out[column][~ok]).all()
        # Per side: the dot product and the subtraction (gamma_{D+1} |x| . |d|), the direction's float32
        # error (||x|| eps, Cauchy-Schwarz) and the image embedding's normalisation error (e . |d|).
        expected, bound = 0.0, 0.0
        for sign, (direction, error) in zip((1, -1), sets[column]):
            expected = expected + sign * unit @ direction
            bound = bound + (gamma(unit.shape[1] + 1) * (np.abs(unit) + unit_error) @ np.abs(direction)
                             + np.linalg.norm(unit, axis=1) * error + unit_error @ np.abs(direction))
        assert_within(out[column][ok], expected, bound, column)
    # The heads are unchanged by the prompts riding along.
    without = _stage(tiny_clip, head_bank)(batch)
    np.testing.assert_array_equal(out[schema.AESTHETIC_SCORE], without[schema.AESTHETIC_SCORE])


def test_default_prompts_and_parsed_sets_are_accepted(tiny_clip, head_bank, prompt_file) -> None:
    from pipeline.models.prompts import load_prompt_sets

    default = _stage(tiny_clip, head_bank, prompts="default")
    assert default.prompt_bank.columns == load_prompt_sets("default").columns
    parsed = _stage(tiny_clip, head_bank, prompts=load_prompt_sets(prompt_file))
    out = parsed(_batch(2, statuses=("ok", "ok")))
    assert np.isfinite(out["score_prompt_lighting"]).all()
    assert _stage(tiny_clip, head_bank).prompt_bank is None


def test_a_bad_prompt_file_fails_at_start(tiny_clip, head_bank, tmp_path) -> None:
    from pipeline.models.prompts import PromptConfigError

    (tmp_path / "bad.yaml").write_text("version: 1\nsets: {a: {negative: x}}\n")
    with pytest.raises(PromptConfigError, match="'positive' is required"):
        _stage(tiny_clip, head_bank, prompts=str(tmp_path / "bad.yaml"))


def test_a_prompt_set_clashing_with_a_head_column_fails_at_start(tiny_clip, tmp_path) -> None:
    bank = HeadBank([Head.from_state_dict("main", _head_state_dicts()["v1.like"]),
                     Head.from_state_dict("prompt_aesthetic", _head_state_dicts()["v1.like"])])
    specs = tuple(HeadSpec(name, WeightsSpec(f"/unused/{name}.pth")) for name in ("main", "prompt_aesthetic"))
    (tmp_path / "p.yaml").write_text(PROMPT_YAML)
    with pytest.raises(ValueError, match="clashing"):
        EmbedScore(TINY, specs, loader=lambda: (tiny_clip, bank), prompts=str(tmp_path / "p.yaml"))


def test_a_non_finite_prompt_score_is_reported_by_set_name(tiny_clip, head_bank, prompt_file) -> None:
    stub = dataclasses.replace(tiny_clip, model=_NaNForBrightCorner(), identity="stub")
    stage = _stage(tiny_clip, head_bank, prompts=prompt_file)
    stage.clip = stub  # the text vectors came from the real tower; the images now come out NaN
    batch = _batch(2, statuses=("ok", "ok"))
    batch[schema.PIXELS][:, 0, 0, :] = 255
    out = stage(batch)
    assert list(out[schema.STATUS]) == [Status.SCORE_ERROR.value] * 2
    assert "prompt aesthetic=nan" in out[schema.ERROR][0]
    assert np.isnan(out["score_prompt_aesthetic"]).all()


def test_two_threads_sharing_a_stage_get_what_one_thread_gets(tiny_clip, head_bank) -> None:
    """Ray Data may call one actor's stage from two threads at once: each batch's scores are its own."""
    from concurrent.futures import ThreadPoolExecutor

    stage = _stage(tiny_clip, head_bank, write_embeddings=True)
    batches = [_batch(seed=seed) for seed in range(6)]
    alone = [stage(batch) for batch in batches]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(stage, batches))
    for one, other in zip(alone, together):
        np.testing.assert_array_equal(one[schema.AESTHETIC_SCORE], other[schema.AESTHETIC_SCORE])
        np.testing.assert_array_equal(one[schema.EMBEDDING], other[schema.EMBEDDING])


def test_clip_similarity_is_the_cosine_of_each_image_with_its_own_caption(tiny_clip, head_bank) -> None:
    """The stage tokenises captions with open_clip's own tokenizer (its 77-token truncation), embeds them
    with the same model's text tower, and takes each image's cosine with its own caption, to within the
    float32 rounding of the two normalisations and the product. No caption, no similarity (NaN)."""
    statuses = ("ok", "ok", "decode_error", "ok", "ok", "ok")
    long_caption = "a photo of a mountain lake at dawn, " * 20
    captions = ["a red bicycle", long_caption, "a cat", "", None, "two dogs on a beach"]
    batch = _batch(statuses=statuses)
    batch[schema.CAPTION] = np.array(captions, dtype=object)
    recording = _Recording(tiny_clip.model)
    out = _stage(dataclasses.replace(tiny_clip, model=recording), head_bank, caption_similarity=True)(batch)

    similarity = out[schema.CLIP_SIMILARITY]
    assert similarity.dtype == np.float32
    assert np.isnan(similarity[[2, 3, 4]]).all(), "a failed row, an empty and a missing caption have none"
    with_caption = [0, 1, 5]
    (tokens,) = recording.tokens
    assert torch.equal(tokens, tiny_clip.tokenizer([captions[i] for i in with_caption]))
    (image_features,) = recording.image_features  # the ok rows 0, 1, 3, 4, 5, in order
    image_features = image_features[[0, 1, 4]]
    (text_features,) = recording.text_features
    image_unit = as_float64(image_features) / np.linalg.norm(as_float64(image_features), axis=1, keepdims=True)
    text_unit = as_float64(text_features) / np.linalg.norm(as_float64(text_features), axis=1, keepdims=True)
    expected = (image_unit * text_unit).sum(axis=1)
    image_error, text_error = normalize_error_bound(image_features), normalize_error_bound(text_features)
    # The product of two computed unit vectors: its own rounding with the image side's error carried
    # through, plus the text side's error against the image vector.
    bound = np.array([dot_error_bound(image_unit[i], text_unit[i], input_error=image_error[i]) for i in range(3)])
    bound = bound + (np.abs(image_unit) * text_error).sum(axis=1)
    assert_within(similarity[with_caption], expected, bound, "clip_similarity")
    assert (np.abs(expected) > bound).all(), "the bound is tighter than the values it checks"
