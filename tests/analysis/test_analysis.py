"""Analysis end to end: img2dataset shards scored once on a local Ray, then read, reported, selected
(and the prompt and quality columns the same job writes).

One scored output (tiny-random CLIP, embeddings written) is shared by every test in this module.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from pipeline.analysis import duckdb_relation, fetch_image, open_scores, score_filter
from pipeline.analysis.select import (
    MissingEmbeddings,
    SelectOptions,
    embed_query,
    mean_pairwise_distance,
    read_selection,
    select_images,
)
from pipeline.config import DecodeConfig, HeadSpec, ModelConfig, ResourcesConfig, ScoreConfig, WeightsSpec
from pipeline.demo import v2_head_or_stand_in
from pipeline.io.units import read_units
from tests.tolerances import assert_within, dot_error_bound

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
QUERY = "a breathtaking travel photo of a scenic landscape"

# The README's DuckDB example, read from the README itself (the python block after the "tested:" marker) and run
# by test_readme_duckdb_example with its path replaced by the scored output: the README cannot drift from it.
README_DUCKDB_MARKER = "<!-- tested: tests/analysis/test_analysis.py::test_readme_duckdb_example -->"
README_DUCKDB_PATH = '"demo-output/scores"'


def readme_duckdb_example() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme.count(README_DUCKDB_MARKER) == 1, "the README lost its tested DuckDB example"
    after = readme.split(README_DUCKDB_MARKER, 1)[1]
    match = re.match(r"\s*```python\n(.*?)\n```", after, re.S)
    assert match, "the README's tested DuckDB example must be the ```python block right after its marker"
    code = match.group(1)
    assert code.count(README_DUCKDB_PATH) == 1 and "duckdb_relation(" in code
    return code.replace(README_DUCKDB_PATH, "OUTPUT")


@pytest.fixture(scope="module")
def scored(sample_dataset, ray_local, tmp_path_factory) -> str:
    """The sample dataset scored once, embeddings written; returns the output prefix."""
    from pipeline.runner import run_score

    heads, weights_dirs = v2_head_or_stand_in(tmp_path_factory.mktemp("heads"))
    output = str(tmp_path_factory.mktemp("analysis") / "scores")
    config = ScoreConfig(
        input=(sample_dataset.shards_dir,), output=output, model=ModelConfig(name="tiny-random", precision="fp32"),
        heads=heads, weights_dirs=weights_dirs, shards_per_unit=2, write_embeddings=True,
        decode=DecodeConfig(batch_size=16), resources=ResourcesConfig(embed_batch_size=16))
    summary = run_score(config)
    assert summary.ok and summary.units_committed
    return output


@pytest.fixture(scope="module")
def table(scored) -> pa.Table:
    return open_scores(scored).to_table()


@pytest.fixture(scope="module")
def query_model(scored):
    """The query embedded once (loading CLIP costs seconds); reused by the selection tests."""
    return embed_query(QUERY, read_units(scored))


def _ok(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table[S.STATUS], "ok"))


# Reading ------------------------------------------------------------------------------------------


def test_open_scores_reads_committed_units_only(scored, sample_dataset, tmp_path):
    copy = tmp_path / "scores"
    shutil.copytree(scored, copy)
    manifests = read_units(str(copy))
    committed_rows = sum(m["rows"] for m in manifests.values())
    # A unit that never committed (no manifest) and a stray copy inside a committed band folder.
    first = next(iter(manifests.values()))["files"][0]["path"]
    shutil.copy(copy / first, copy / first.replace(".parquet", "-uncommitted.parquet"))
    (copy / "score_band=ge6.5").mkdir(exist_ok=True)
    shutil.copy(copy / first, copy / "score_band=ge6.5" / "orphan-unit.parquet")

    dataset = open_scores(str(copy))
    assert dataset.count_rows() == committed_rows
    keys = dataset.to_table(columns=[S.KEY])[S.KEY].to_pylist()
    assert sorted(keys) == sample_dataset.all_keys
    assert S.SCORE_BAND in dataset.schema.names and S.EMBEDDING in dataset.schema.names

    con = __import__("duckdb").connect()
    relation = duckdb_relation(str(copy), con=con)
    assert relation.aggregate("count(*)").fetchall()[0][0] == committed_rows
    assert con.sql("SELECT count(DISTINCT key) FROM scores").fetchall()[0][0] == len(sample_dataset.all_keys)


def test_score_filter_prunes_bands_and_keeps_exactly_the_rows_at_or_above(scored, table):
    ok = _ok(table)
    scores = np.sort(ok[S.AESTHETIC_SCORE].to_numpy())
    threshold = float(scores[len(scores) // 2])
    dataset = open_scores(scored)
    kept = dataset.to_table(filter=score_filter(threshold))
    assert kept.num_rows == int((scores >= threshold).sum())
    assert min(kept[S.AESTHETIC_SCORE].to_pylist()) >= threshold
    # Partition pruning: score >= 6.5 opens only files of the ge6.5 band (the unscored band is always there).
    pruned = list(dataset.get_fragments(filter=score_filter(6.5)))
    assert all(f"{S.SCORE_BAND}=ge6.5/" in fragment.path for fragment in pruned)
    assert len(pruned) < len(list(dataset.get_fragments()))


def test_readme_duckdb_example(scored, table):
    namespace = {"OUTPUT": scored}
    exec(readme_duckdb_example(), namespace)  # noqa: S102 - the README snippet, verbatim
    by_band, best = namespace["by_band"], namespace["best"]
    ok = _ok(table)
    assert int(by_band["images"].sum()) == ok.num_rows
    expected = ok.filter(pc.greater_equal(ok[S.AESTHETIC_SCORE], 5.0))
    assert len(best) == min(10, expected.num_rows)
    if len(best):
        assert best["aesthetic_score"].iloc[0] == pytest.approx(max(ok[S.AESTHETIC_SCORE].to_pylist()))


def test_reading_from_object_storage(scored, s3_server, tmp_path):
    """The same API over s3:// (moto on 127.0.0.1): pyarrow through fsspec, DuckDB through the registered
    fsspec filesystem (no DuckDB credentials or endpoint of its own)."""
    from pipeline.sample_data import upload_directory

    s3_server.client().create_bucket(Bucket="analysis-read")
    uri = "s3://analysis-read/scores"
    upload_directory(scored, uri, s3_server.storage_options)
    committed = sum(m["rows"] for m in read_units(scored).values())
    dataset = open_scores(uri, s3_server.storage_options)
    assert dataset.count_rows() == committed
    con = __import__("duckdb").connect()
    duckdb_relation(uri, con=con, storage_options=s3_server.storage_options)
    assert con.sql("SELECT count(*) FROM scores").fetchall()[0][0] == committed
    best = con.sql("SELECT max(aesthetic_score) FROM scores WHERE status = 'ok'").fetchall()[0][0]
    assert best == pytest.approx(max(dataset.to_table(filter=score_filter())[S.AESTHETIC_SCORE].to_pylist()))


class _CountingFS:
    """Wraps a filesystem: counts ranged reads, refuses whole-file reads."""

    def __init__(self, fs):
        self.fs, self.calls = fs, []

    def _strip_protocol(self, path):
        return self.fs._strip_protocol(path)

    def cat_file(self, path, start=None, end=None):
        self.calls.append((path, start, end))
        return self.fs.cat_file(path, start=start, end=end)

    def open(self, *args, **kwargs):  # pragma: no cover - the point is that it is never called
        raise AssertionError("fetch_image must not open the tar")


def test_fetch_image_is_one_ranged_read_of_the_recorded_member(table):
    from fsspec.implementations.local import LocalFileSystem

    row = _ok(table).slice(0, 1).to_pylist()[0]
    spy = _CountingFS(LocalFileSystem())
    data = fetch_image(row, fs=spy)
    assert spy.calls == [(row[S.SHARD], row[S.OFFSET], row[S.OFFSET] + row[S.SIZE])]
    with tarfile.open(row[S.SHARD]) as archive:
        assert data == archive.extractfile(row[S.MEMBER]).read()
    assert fetch_image((row[S.SHARD], row[S.OFFSET], row[S.SIZE])) == data


# Selection ------------------------------------------------------------------------------------------


def _similarities(table: pa.Table, query: np.ndarray) -> dict[str, tuple[float, float]]:
    """Key -> (exact similarity to the query, in float64; the bound on a float32 dot product's distance from it)."""
    embeddings = np.asarray(table[S.EMBEDDING].to_pylist(), dtype=np.float32)
    exact = embeddings.astype(np.float64) @ query.astype(np.float64)
    return dict(zip(table[S.KEY].to_pylist(), zip(exact.tolist(), dot_error_bound(embeddings, query).tolist())))


def test_selection_honours_threshold_and_k(scored, table, query_model):
    ok = _ok(table)
    scores = np.sort(ok[S.AESTHETIC_SCORE].to_numpy())
    min_score = float(scores[len(scores) // 3])  # two thirds of the rows pass
    passing = ok.filter(pc.greater_equal(ok[S.AESTHETIC_SCORE], min_score))
    k = 5
    selection = select_images(scored, SelectOptions(QUERY, min_score=min_score, top_k=k, use_ray=False),
                              query_model=query_model)
    picks = selection.table
    assert picks.num_rows == k and selection.info["rows_passing"] == passing.num_rows
    assert min(picks[S.AESTHETIC_SCORE].to_pylist()) >= min_score
    # The picks are the k most similar rows, most similar first, up to the float32 rounding of the similarities
    # (rows within that of each other may come in either order, depending on the CPU's summation order).
    sims = _similarities(passing, query_model.embedding)
    picked = picks[S.KEY].to_pylist()
    similarity, bound = (np.array([sims[key][i] for key in picked]) for i in (0, 1))
    assert_within(picks["query_similarity"].to_numpy(), similarity, bound, "query similarity")
    assert (similarity[:-1] + bound[:-1] >= similarity[1:] - bound[1:]).all(), "picks out of order"
    left_out = [sims[key] for key in sims if key not in set(picked)]
    assert min(similarity + bound) >= max((s - b for s, b in left_out), default=-np.inf), "a better row left out"
    assert picks["rank"].to_pylist() == list(range(1, k + 1))
    assert all(reason.startswith("query similarity") for reason in picks["reason"].to_pylist())
    # K larger than what passes: everything that passes, nothing else.
    many = select_images(scored, SelectOptions(QUERY, min_score=min_score, top_k=1000, use_ray=False),
                         query_model=query_model)
    assert sorted(many.keys) == sorted(passing[S.KEY].to_pylist())


def test_diverse_raises_mean_pairwise_distance_over_plain_top_k(scored, query_model):
    k = 6
    plain = select_images(scored, SelectOptions(QUERY, top_k=k, use_ray=False), query_model=query_model)
    diverse = select_images(scored, SelectOptions(QUERY, top_k=k, diverse=True, use_ray=False),
                            query_model=query_model)
    assert diverse.table.num_rows == plain.table.num_rows == k
    assert diverse.keys[0] == plain.keys[0]  # MMR's first pick is the most query-similar row

    def spread(selection):
        return mean_pairwise_distance(np.asarray(selection.table[S.EMBEDDING].to_pylist(), dtype=np.float32))

    print(f"mean pairwise cosine distance: plain top-{k} {spread(plain):.4f}, diverse {spread(diverse):.4f}")
    assert spread(diverse) > spread(plain)
    assert diverse.info["mean_pairwise_distance"] == pytest.approx(spread(diverse))
    assert diverse.info["mean_pairwise_distance_plain_top_k"] == pytest.approx(spread(plain))
    assert diverse.table["mmr_rank"].to_pylist() == list(range(1, k + 1))


def test_ray_path_gives_the_same_selection(scored, query_model):
    options = dict(query=QUERY, top_k=4, diverse=True, pool_factor=3)
    local = select_images(scored, SelectOptions(**options, use_ray=False), query_model=query_model)
    on_ray = select_images(scored, SelectOptions(**options, use_ray=True), query_model=query_model)
    assert on_ray.info["used_ray"] and not local.info["used_ray"]
    assert on_ray.keys == local.keys
    assert on_ray.info["rows_passing"] == local.info["rows_passing"]
    # Past the row threshold the Ray path is taken on its own.
    auto = select_images(scored, SelectOptions(**options, ray_min_rows=1), query_model=query_model)
    assert auto.info["used_ray"] and auto.keys == local.keys


def test_cli_select_writes_parquet_and_a_webdataset_of_the_picks(scored, table, tmp_path):
    from pipeline import cli

    out = tmp_path / "travel"
    ok_scores = np.sort(_ok(table)[S.AESTHETIC_SCORE].to_numpy())
    min_score = float(ok_scores[len(ok_scores) // 2])
    code = cli.main(["select", scored, "--query", QUERY, "--min-score", str(min_score), "--top-k", "4", "--diverse",
                     "--out", str(out), "--webdataset", "--no-ray"])
    assert code == 0
    picks = read_selection(str(out))
    assert picks.num_rows == 4 and min(picks[S.AESTHETIC_SCORE].to_pylist()) >= min_score
    for column in ("query_similarity", "aesthetic_score", "mmr_rank", "reason", S.SHARD, S.OFFSET, S.SIZE):
        assert column in picks.column_names
    with tarfile.open(out / "selection-000000.tar") as archive:
        names = archive.getnames()
        for row in picks.drop_columns([S.EMBEDDING]).to_pylist():
            image = archive.extractfile(f"{row[S.KEY]}.{row[S.IMAGE_FORMAT]}").read()
            with tarfile.open(row[S.SHARD]) as source:
                assert image == source.extractfile(row[S.MEMBER]).read()
            assert archive.extractfile(f"{row[S.KEY]}.txt").read().decode() == row[S.CAPTION]
            assert f"{row[S.KEY]}.json" in names
    import webdataset

    samples = list(webdataset.WebDataset(str(out / "selection-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == picks[S.KEY].to_pylist()  # webdataset reads it back, in rank order
    assert (out / "selection.json").exists()


def test_selection_without_embeddings_says_how_to_get_them(scored, tmp_path, query_model, capsys):
    copy = tmp_path / "scores"
    shutil.copytree(scored, copy)
    for path in copy.glob("score_band=*/*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns([S.EMBEDDING]), path)
    with pytest.raises(MissingEmbeddings, match="--write-embeddings"):
        select_images(str(copy), SelectOptions(QUERY, top_k=3), query_model=query_model)
    from pipeline import cli

    assert cli.main(["select", str(copy), "--query", QUERY, "--out", str(tmp_path / "x")]) == 2
    assert "--write-embeddings" in capsys.readouterr().err


def test_selection_reads_the_snapshot_after_compaction_and_vacuum(scored, tmp_path, query_model):
    """Optimize rewrites units' files into shared ones and vacuum deletes the originals: selection reads the
    table's current files, so it picks the same rows, from the compacted files."""
    from pipeline.housekeeping import optimize, vacuum

    copy = tmp_path / "scores"
    shutil.copytree(scored, copy)
    options = dict(query=QUERY, top_k=6, use_index=False)
    before = select_images(str(copy), SelectOptions(**options, use_ray=False), query_model=query_model)
    optimize(str(copy))
    vacuum(str(copy), retention_hours=0)
    for use_ray in (False, True):
        after = select_images(str(copy), SelectOptions(**options, use_ray=use_ray), query_model=query_model)
        assert after.keys == before.keys
        assert after.info["rows_passing"] == before.info["rows_passing"]
        assert after.info["files_read"] < before.info["files_read"]



# Prompt and quality columns through the real job -----------------------------------------------------


def test_prompt_scores_and_quality_metrics_are_written_by_the_job(sample_dataset, ray_local, tmp_path):
    """`score --prompts default --quality-metrics` on a local Ray: one float32 column per default prompt set and
    per quality metric lands in the committed Parquet, finite on every ok row, and the prompt scores are what
    the shipped prompt sets give on the stored embeddings (the stage tests check the arithmetic itself)."""
    from pipeline.demo import random_v2_head
    from pipeline.models.clip import load_clip
    from pipeline.models.prompts import PromptBank, load_prompt_sets
    from pipeline.quality import QUALITY_COLUMNS
    from pipeline.runner import run_score

    path, digest = random_v2_head(tmp_path / "heads")
    output = str(tmp_path / "scores")
    config = ScoreConfig(
        input=(sample_dataset.shards_dir,), output=output, model=ModelConfig(name="tiny-random", precision="fp32"),
        heads=(HeadSpec("random-v2", WeightsSpec(path, digest)),), shards_per_unit=2, write_embeddings=True,
        decode=DecodeConfig(batch_size=16, quality_metrics=True), resources=ResourcesConfig(embed_batch_size=16),
        prompts="default")
    assert run_score(config).ok
    table = open_scores(output).to_table()
    ok = _ok(table)
    prompt_sets = load_prompt_sets("default")
    assert len(prompt_sets.columns) >= 10 and ok.num_rows > 0
    for column in (*prompt_sets.columns, *QUALITY_COLUMNS):
        assert table.schema.field(column).type == pa.float32(), column
        assert np.isfinite(ok[column].to_numpy(zero_copy_only=False)).all(), column
    assert float(np.std(ok["quality_sharpness"].to_numpy())) > 0  # measured per image, not a constant
    import torch

    clip = load_clip(ModelConfig(name="tiny-random", precision="fp32"), device="cpu")
    stored = torch.from_numpy(np.asarray(ok[S.EMBEDDING].to_pylist(), dtype=np.float32))
    expected = PromptBank.build(clip, prompt_sets).score(torch.nn.functional.normalize(stored, dim=1))
    best_class = {s.column for s in prompt_sets.sets if s.combine == "best_class"}
    for column, values in expected.items():
        close = np.abs(ok[column].to_numpy() - values) <= 2e-4  # scores are ~1e-2; fp16 storage costs ~1e-5
        # best_class: fp16 rounding may flip the choice between two near-equal classes on a rare row.
        assert close.mean() >= 0.95 if column in best_class else close.all(), column


# Report and notebooks -----------------------------------------------------------------------------------


def _browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    return playwright_api


def test_report_shows_the_best_images_and_the_browser_loads_them(scored, table, tmp_path):
    from pipeline import cli

    html_path = tmp_path / "report.html"
    assert cli.main(["report", scored, "--out", str(html_path), "--per-bucket", "2"]) == 0
    ok = _ok(table)
    scores = ok[S.AESTHETIC_SCORE].to_pylist()
    keys = ok[S.KEY].to_pylist()
    top_key = keys[int(np.argmax(scores))]
    bottom_key = keys[int(np.argmin(scores))]

    playwright_api = _browser()
    requests = []
    with playwright_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda request: requests.append(request.url))
            page.goto(html_path.as_uri(), wait_until="load")
            images = page.evaluate("""() => Array.from(document.images).map(img => ({
                loaded: img.complete && img.naturalWidth > 0, width: img.naturalWidth,
                src: img.src.slice(0, 22), key: img.closest('figure') ? img.closest('figure').dataset.key : null}))""")
            figures = page.evaluate("""() => Array.from(document.querySelectorAll('figure.thumb')).map(f => ({
                key: f.dataset.key, position: f.dataset.position, band: f.dataset.band,
                score: parseFloat(f.dataset.score), text: f.innerText}))""")
            best_visible = page.locator("figure.thumb").first.is_visible()
            similarity_shown = page.locator("img#similarity").is_visible()
            table_text = page.locator("table.cutoffs").inner_text()
            shot = page.screenshot(full_page=True)
        finally:
            browser.close()

    assert images and all(image["loaded"] for image in images), images
    assert all(image["src"].startswith("data:image/") for image in images)
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []  # self-contained
    thumbs = [image for image in images if image["key"]]
    assert len(thumbs) == len(figures) >= 3
    assert figures[0]["key"] == top_key and figures[0]["position"] == "best" and best_visible
    assert figures[-1]["key"] == bottom_key and figures[-1]["position"] == "worst"
    by_key = dict(zip(keys, scores))
    for figure in figures:
        assert figure["score"] == pytest.approx(by_key[figure["key"]], abs=1e-5)
        assert f"{by_key[figure['key']]:.3f}" in figure["text"]
    captions = dict(zip(keys, ok[S.CAPTION].to_pylist()))
    assert captions[top_key][:40] in figures[0]["text"]
    assert "LAION" in table_text and "6.5" in table_text
    assert similarity_shown, "the caption-similarity histogram, from the unit records"
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000


def test_report_reads_each_thumbnail_with_one_ranged_read(scored, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.analysis import report

    calls, inside = [], []
    original = LocalFileSystem.cat_file

    def counting(self, path, start=None, end=None, **kwargs):
        calls.append((path, start, end))
        inside.append(True)
        try:
            return original(self, path, start=start, end=end, **kwargs)
        finally:
            inside.pop()

    def no_open(self, path, mode="rb", *args, **kwargs):
        assert inside or not str(path).endswith(".tar"), f"the report read a tar outside a ranged read: {path}"
        return original_open(self, path, mode, *args, **kwargs)

    original_open = LocalFileSystem.open
    monkeypatch.setattr(LocalFileSystem, "cat_file", counting)
    monkeypatch.setattr(LocalFileSystem, "open", no_open)
    _, info = report.build_report(scored, per_position=1)
    thumbs = [t for t in info.thumbs if t.jpeg is not None]
    assert thumbs and len(thumbs) == len(info.thumbs)
    tar_reads = [c for c in calls if c[0].endswith(".tar")]
    assert len(tar_reads) == len(info.thumbs)
    assert all(start is not None and end is not None and end > start for _, start, end in tar_reads)


NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(scored, notebook, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("AESTHETICS_OUTPUT", scored)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel must use its inline backend
    nb = nbformat.read(notebook, as_version=4)
    assert any("parameters" in cell.metadata.get("tags", []) for cell in nb.cells)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(notebook.parent)}})
    client.execute()
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
    pictures = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
                if "image/png" in o.get("data", {})]
    assert pictures, "the notebook drew nothing"
    if notebook.name == "01_scores_overview.ipynb":
        printed = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
        assert "images with a caption" in printed, "the caption-similarity histogram, from the unit records"
