"""The ANN index: faiss IVF-PQ over the stored embeddings, re-ranked exactly, updated after nightly runs.

The first tests drive the faiss parts on fabricated clustered vectors (no Ray, no output). The rest build
the index over img2dataset shards scored on the shared local Ray and hold it against the brute-force
selection, which stays the oracle.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import schema as S
from pipeline.analysis.select import SelectionError, SelectOptions, embed_query, select_images
from pipeline.config import DecodeConfig, ModelConfig, ResourcesConfig, ScoreConfig
from pipeline.demo import v2_head_or_stand_in
from pipeline.errors import UsageError
from pipeline.index import AnnIndex, IndexOptions, Manifest, build_index, choose_parameters, fill, open_index, train
from pipeline.io.units import read_units
from tests.tolerances import dot_error_bound

QUERY = "a breathtaking travel photo of a scenic landscape"


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    points = centres[rng.integers(clusters, size=n)] + 0.35 * rng.normal(size=(n, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def in_memory_index(vectors: np.ndarray, scores: np.ndarray, nlist: int, nprobe: int) -> AnnIndex:
    import faiss

    n, dim = vectors.shape
    pq_m = 8
    trained = train(vectors[: n // 2], nlist, pq_m, 8)
    index = faiss.deserialize_index(np.frombuffer(fill(trained, vectors), dtype=np.uint8))
    manifest = Manifest(model="m", dim=dim, nlist=nlist, pq_m=pq_m, pq_bits=8, nprobe=nprobe, trained="t",
                        trained_rows=n // 2, data_version=0, parts=[{"name": "p", "rows": n, "units": {"u": 0}}])
    rows = pa.table({S.KEY: [f"{i:06d}" for i in range(n)], S.SHARD: ["s"] * n, S.UNIT: ["u"] * n,
                     S.AESTHETIC_SCORE: scores.astype(np.float32)})
    return AnnIndex(manifest, index, [vectors.astype(np.float16)], rows)


# The faiss parts ----------------------------------------------------------------------------------


def test_parameters_follow_the_row_count_and_never_outgrow_the_training_sample():
    assert choose_parameters(1_000_000, 768, IndexOptions(), 200_000) == (1024, 96, 8, 64)
    nlist, pq_m, pq_bits, nprobe = choose_parameters(30, 64, IndexOptions(), 30)
    assert (nlist, pq_m, nprobe) == (1, 8, 1) and 2 ** pq_bits <= 30
    with pytest.raises(UsageError, match="must divide the embedding width 768"):
        choose_parameters(1000, 768, IndexOptions(pq_m=100), 1000)


def test_reranked_index_search_finds_the_exact_top_k_of_clustered_vectors():
    vectors = clustered(20_000, 64, 50, seed=1)
    index = in_memory_index(vectors, np.zeros(len(vectors)), nlist=64, nprobe=16)
    queries = clustered(20, 64, 50, seed=2)
    recalls = []
    for query in queries:
        found, passing = index.search(query, limit=50, candidates=500)
        exact = np.argsort(-(vectors.astype(np.float16).astype(np.float32) @ query), kind="stable")[:50]
        recalls.append(len(set(found[S.KEY].to_pylist()) & {f"{i:06d}" for i in exact}) / 50)
        assert passing == len(vectors)
        assert np.all(np.diff(found["query_similarity"].to_numpy()) <= 0)
    assert np.mean(recalls) >= 0.95, recalls


def test_a_score_threshold_filters_inside_the_search_so_the_result_stays_full():
    vectors = clustered(5_000, 64, 20, seed=3)
    scores = np.random.default_rng(4).uniform(3, 8, size=len(vectors))
    index = in_memory_index(vectors, scores, nlist=32, nprobe=32)
    found, passing = index.search(vectors[0], limit=40, candidates=400, min_score=7.5)
    assert passing == int((scores >= 7.5).sum())
    assert found.num_rows == 40  # a post-filter of 400 candidates would keep about 40 * 0.1
    assert min(found[S.AESTHETIC_SCORE].to_pylist()) >= 7.5
    skipped, _ = index.search(vectors[0], limit=40, skip_units={"u"})
    assert skipped.num_rows == 0


def test_rows_left_out_by_dedup_never_come_back_from_a_search():
    vectors = clustered(3_000, 64, 10, seed=5)
    index = in_memory_index(vectors, np.zeros(len(vectors)), nlist=16, nprobe=16)
    nearest, _ = index.search(vectors[0], limit=10)
    left_out = frozenset(nearest[S.KEY].to_pylist()[:5])
    found, passing = index.search(vectors[0], limit=10, exclude={"s": left_out})
    assert passing == len(vectors) - 5 and found.num_rows == 10
    assert not left_out & set(found[S.KEY].to_pylist())
    assert found[S.KEY].to_pylist()[:5] == nearest[S.KEY].to_pylist()[5:]


# Over a scored output -----------------------------------------------------------------------------


def _score(input_dir: Path, output: str, heads, weights_dirs) -> None:
    from pipeline.runner import run_score

    config = ScoreConfig(
        input=(str(input_dir),), output=output, model=ModelConfig(name="tiny-random", precision="fp32"),
        heads=heads, weights_dirs=weights_dirs, shards_per_unit=1, write_embeddings=True,
        decode=DecodeConfig(batch_size=16), resources=ResourcesConfig(embed_batch_size=16))
    summary = run_score(config)
    assert summary.ok and summary.units_committed


@pytest.fixture(scope="module")
def arriving(sample_dataset, ray_local, tmp_path_factory):
    """(input folder, output, the shard that arrives later): the first two shards scored and indexed."""
    heads, weights_dirs = v2_head_or_stand_in(tmp_path_factory.mktemp("heads"))
    folder = tmp_path_factory.mktemp("arriving")
    for tar, sidecar in list(zip(sample_dataset.tar_paths, sample_dataset.sidecar_paths))[:2]:
        shutil.copy(tar, folder)
        shutil.copy(sidecar, folder)
    output = str(tmp_path_factory.mktemp("indexed") / "scores")
    _score(folder, output, heads, weights_dirs)
    late = (sample_dataset.tar_paths[2], sample_dataset.sidecar_paths[2])
    return folder, output, late, (heads, weights_dirs)


def _brute_and_indexed(output: str, query_model, **options) -> tuple:
    brute = select_images(output, SelectOptions(QUERY, use_index=False, **options), query_model=query_model)
    indexed = select_images(output, SelectOptions(QUERY, use_index=True, **options), query_model=query_model)
    return brute, indexed


def _assert_same_picks(brute, indexed, query: np.ndarray) -> None:
    """Same rows; their similarities are the same float32 dot products of the same stored values, summed
    maybe in another order, so within twice the bound of one, and the order differs only among rows that
    close."""
    assert indexed.table.num_rows == brute.table.num_rows
    assert set(indexed.keys) == set(brute.keys)
    embeddings = np.stack([np.asarray(e, np.float32) for e in brute.table[S.EMBEDDING].to_pylist()])
    bound = dict(zip(brute.keys, 2 * dot_error_bound(embeddings, query)))
    similarity = dict(zip(brute.keys, brute.table["query_similarity"].to_pylist()))
    score = dict(zip(brute.keys, brute.table[S.AESTHETIC_SCORE].to_pylist()))
    for rank, (key, found) in enumerate(zip(indexed.keys, indexed.table["query_similarity"].to_pylist())):
        assert abs(found - similarity[key]) <= bound[key]
        assert indexed.table[S.AESTHETIC_SCORE][rank].as_py() == score[key]
        expected = brute.keys[rank]
        assert key == expected or abs(similarity[key] - similarity[expected]) <= bound[key] + bound[expected]


def test_index_then_select_picks_what_brute_force_picks(arriving):
    _, output, _, _ = arriving
    result = build_index(output)
    assert result.trained and result.parts_added == 1 and result.units_added == 2
    ok_rows = sum(r["counts_by_status"].get("ok", 0) for r in read_units(output).values())
    assert result.rows == ok_rows > 0
    query_model = embed_query(QUERY, read_units(output))
    for options in ({"top_k": 5}, {"top_k": 8, "min_score": 0.0}, {"top_k": 4, "diverse": True, "pool_factor": 2}):
        brute, indexed = _brute_and_indexed(output, query_model, **options)
        assert indexed.info["index"] is not None and brute.info["index"] is None
        assert indexed.info["files_read"] == 0  # every unit answered by the index
        assert indexed.info["rows_passing"] == brute.info["rows_passing"]
        _assert_same_picks(brute, indexed, query_model.embedding)


def test_an_update_after_a_nightly_run_adds_the_new_unit_only(arriving):
    folder, output, late, (heads, weights_dirs) = arriving
    build_index(output)
    before = build_index(output)  # idempotent when nothing arrived
    assert before.parts_added == 0 and before.units_added == 0 and not before.trained
    old_parts = {p["name"] for p in before.manifest.parts}

    for path in late:
        shutil.copy(path, folder)
    _score(folder, output, heads, weights_dirs)  # the nightly run: only the new shard is pending
    query_model = embed_query(QUERY, read_units(output))
    # Before the update the new unit is read from its files, so nothing is missed.
    stale = select_images(output, SelectOptions(QUERY, top_k=50, use_index=True), query_model=query_model)
    assert stale.info["index"]["units_read_from_files"] == 1 and stale.info["files_read"] >= 1

    after = build_index(output)
    assert after.units_added == 1 and after.parts_added == 1 and after.parts_dropped == 0 and not after.trained
    assert old_parts < {p["name"] for p in after.manifest.parts}
    assert after.rows == sum(r["counts_by_status"].get("ok", 0) for r in read_units(output).values())
    brute, indexed = _brute_and_indexed(output, query_model, top_k=50)
    assert indexed.info["index"]["units_read_from_files"] == 0
    _assert_same_picks(brute, indexed, query_model.embedding)
    assert open_index(output).manifest.data_version == after.manifest.data_version


def test_select_says_so_when_asked_for_an_index_that_is_not_there(sample_dataset, arriving, tmp_path):
    _, output, _, _ = arriving
    copy = tmp_path / "scores"
    shutil.copytree(output, copy)
    shutil.rmtree(copy / "_index")
    query_model = embed_query(QUERY, read_units(str(copy)))
    with pytest.raises(SelectionError, match="has no index: run `aesthetics index"):
        select_images(str(copy), SelectOptions(QUERY, use_index=True), query_model=query_model)
    plain = select_images(str(copy), SelectOptions(QUERY), query_model=query_model)
    assert plain.info["index"] is None and plain.table.num_rows


def test_the_index_command_prints_one_line_and_refuses_bad_options(arriving):
    _, output, _, _ = arriving
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "index", output], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "brought up to date" in done.stdout and "IVF" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "index", output, "--nprobe", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--nprobe must be >= 1" in bad.stderr


def test_a_unit_scored_again_sends_its_part_back_and_its_old_files_go(arriving, tmp_path):
    from pipeline.config import HeadSpec, WeightsSpec
    from pipeline.demo import random_v2_head
    from pipeline.runner import run_score

    folder, output, _, _ = arriving
    before = build_index(output)
    old_names = {p["name"] for p in before.manifest.parts if p["name"]}
    path, digest = random_v2_head(tmp_path)  # another head: every unit is stale and scored again
    config = ScoreConfig(
        input=(str(folder),), output=output, model=ModelConfig(name="tiny-random", precision="fp32"),
        heads=(HeadSpec("another-head", WeightsSpec(path, digest)),), shards_per_unit=1, write_embeddings=True,
        rescore=True,
        decode=DecodeConfig(batch_size=16), resources=ResourcesConfig(embed_batch_size=16))
    assert run_score(config).ok
    after = build_index(output)
    assert after.parts_dropped == len(old_names) and after.units_added == len(read_units(output))
    parts = Path(output) / "_index" / "parts"
    left = {p.name.split(".")[0] for p in parts.iterdir()}
    assert left == {p["name"] for p in after.manifest.parts if p["name"]} and not left & old_names
    query_model = embed_query(QUERY, read_units(output))
    brute, indexed = _brute_and_indexed(output, query_model, top_k=10)
    _assert_same_picks(brute, indexed, query_model.embedding)


def test_an_index_on_s3_is_filled_by_ray_tasks_and_answers_as_brute_force(sample_shards_s3, s3_server, ray_local,
                                                                          tmp_path_factory):
    """Parts written by Ray tasks into the local S3 server, read back by a search in this process."""
    from pipeline.runner import run_score

    heads, weights_dirs = v2_head_or_stand_in(tmp_path_factory.mktemp("heads"))
    s3_server.client().create_bucket(Bucket="indexed")
    output = "s3://indexed/scores"
    config = ScoreConfig(
        input=(sample_shards_s3,), output=output, model=ModelConfig(name="tiny-random", precision="fp32"),
        heads=heads, weights_dirs=weights_dirs, shards_per_unit=1, write_embeddings=True,
        decode=DecodeConfig(batch_size=16), resources=ResourcesConfig(embed_batch_size=16))
    assert run_score(config).ok
    result = build_index(output, IndexOptions(rows_per_part=1), use_ray=True)  # a part, a task, per unit
    assert result.parts == result.parts_added == len(read_units(output)) > 1
    assert len(s3_server.filesystem().ls("indexed/scores/_index/parts")) == 3 * result.parts  # codes, vectors, rows
    query_model = embed_query(QUERY, read_units(output))
    brute, indexed = _brute_and_indexed(output, query_model, top_k=10, min_score=0.0)
    assert indexed.info["index"]["parts"] == result.parts
    _assert_same_picks(brute, indexed, query_model.embedding)
