"""Selection and reading helpers on hand-made data: no Ray, no model, no shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline import schema as S
from pipeline.analysis.reading import bands_at_least, score_filter
from pipeline.analysis.select import (
    SelectionError,
    SelectOptions,
    centred_unit,
    mean_pairwise_distance,
    mmr,
    model_config_from_key,
    model_config_of,
    same_model,
)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_mmr_spreads_picks_over_clusters_that_plain_top_k_leaves_out():
    rng = np.random.default_rng(0)
    # Three clusters of near-duplicates; A is the closest to the query, then B, then C.
    centres = _unit(rng.normal(size=(3, 32)))
    clusters = np.repeat(np.arange(3), 6)
    embeddings = _unit(centres[clusters] + 0.02 * rng.normal(size=(18, 32)))
    relevance = np.array([1.0, 0.9, 0.8])[clusters] - 0.01 * rng.random(18)
    plain = np.argsort(-relevance)[:3]
    assert set(clusters[plain]) == {0}
    picked, scores = mmr(centred_unit(embeddings), (relevance - relevance.min()) / np.ptp(relevance), 3, 0.5)
    assert picked[0] == plain[0]  # the most relevant row always comes first
    assert set(clusters[picked]) == {0, 1, 2}
    assert len(set(picked.tolist())) == 3 and np.isfinite(scores).all()
    assert mean_pairwise_distance(embeddings[picked]) > mean_pairwise_distance(embeddings[plain])


def test_mmr_with_lambda_one_is_plain_top_k():
    rng = np.random.default_rng(1)
    embeddings = _unit(rng.normal(size=(30, 16)))
    relevance = rng.random(30)
    picked, _ = mmr(embeddings, relevance, 7, lam=1.0)
    assert picked.tolist() == np.argsort(-relevance)[:7].tolist()


def test_mmr_asks_for_more_than_there_is():
    picked, _ = mmr(_unit(np.eye(3)), np.array([0.2, 1.0, 0.5]), 10)
    assert sorted(picked.tolist()) == [0, 1, 2] and picked[0] == 1


def test_mean_pairwise_distance():
    assert mean_pairwise_distance(np.eye(3)) == pytest.approx(1.0)
    assert mean_pairwise_distance(np.ones((4, 3))) == pytest.approx(0.0)
    assert np.isnan(mean_pairwise_distance(np.ones((1, 3))))


def test_model_identity_is_read_from_the_manifests_clip_record_pinned():
    manifest = {"model_key": "ViT-B-32@0123456789abcdef/fp16|h@x",
                "clip": {"name": "ViT-B-32", "pretrained": "s3://b/w.safetensors", "sha256": "c" * 64, "seed": None}}
    config = model_config_of(manifest)
    assert (config.name, config.pretrained, config.pretrained_sha256) == ("ViT-B-32", "s3://b/w.safetensors", "c" * 64)
    tiny = model_config_of({"model_key": "tiny-random(seed=3)/fp32|h@x",
                            "clip": {"name": "tiny-random", "pretrained": None, "sha256": None, "seed": 3}})
    assert tiny.is_tiny_random and tiny.seed == 3


def test_model_identity_of_older_manifests_is_read_from_the_model_key():
    tiny = model_config_from_key("tiny-random/seed=3|sac+logos+ava1-l14-linearMSE@21dd590f3ccd")
    assert tiny.is_tiny_random and tiny.seed == 3
    real = model_config_from_key("ViT-L-14-quickgelu/openai|sac+logos+ava1-l14-linearMSE@21dd590f3ccd")
    assert (real.name, real.pretrained) == ("ViT-L-14-quickgelu", "openai")
    pinned = model_config_from_key("ViT-L-14-quickgelu/s3://b/w/open_clip_model.safetensors@0123456789ab|h@x")
    assert pinned.pretrained == "s3://b/w/open_clip_model.safetensors"
    with pytest.raises(SelectionError):
        model_config_from_key("garbage")


def test_same_model_compares_architecture_and_weights_digest_not_labels():
    assert same_model("ViT-L-14-quickgelu/openai@0123456789ab", "ViT-L-14-quickgelu/model.safetensors@0123456789ab")
    assert not same_model("ViT-L-14-quickgelu/openai@0123456789ab", "ViT-L-14-quickgelu/openai@ffffffffffff")
    assert not same_model("ViT-B-32/openai@0123456789ab", "ViT-L-14-quickgelu/openai@0123456789ab")
    assert same_model("tiny-random(seed=0)", "tiny-random(seed=0)")
    assert not same_model("tiny-random(seed=0)", "tiny-random(seed=1)")


def test_select_options_are_validated():
    with pytest.raises(SelectionError):
        SelectOptions(query=" ")
    with pytest.raises(SelectionError):
        SelectOptions(query="x", top_k=0)
    with pytest.raises(SelectionError):
        SelectOptions(query="x", mmr_lambda=1.5)
    assert SelectOptions(query="x", top_k=10, diverse=True, pool_factor=4).pool == 40
    assert SelectOptions(query="x", top_k=10).pool == 10


def test_bands_and_score_filter_prune_partitions():
    assert bands_at_least(6.0) == ["6-6.5", "ge6.5"]
    assert bands_at_least(6.25) == ["6-6.5", "ge6.5"]
    assert bands_at_least(0.0)[0] == "lt4.5"
    table = pa.table({S.STATUS: ["ok", "ok", "ok", "decode_error"],
                      S.AESTHETIC_SCORE: [4.0, 6.1, 6.7, float("nan")],
                      S.SCORE_BAND: ["lt4.5", "6-6.5", "ge6.5", "unscored"]})
    kept = pads.dataset(table).to_table(filter=score_filter(6.25))
    assert kept[S.AESTHETIC_SCORE].to_pylist() == pytest.approx([6.7])
    kept = pads.dataset(table).to_table(filter=score_filter(5.0, 6.5))
    assert kept[S.AESTHETIC_SCORE].to_pylist() == pytest.approx([6.1])
