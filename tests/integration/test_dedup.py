"""`aesthetics dedup` on img2dataset shards with planted duplicates: the same bytes under two keys, the same
photo re-encoded, halved and cropped by 5%, among distinct photos. Every planted group is found whole, its
keeper is its best-scored row, nothing else is grouped, and `cutoffs --dedup` leaves the duplicates out."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema as S
from pipeline.dedup import dedup, read_dedup
from pipeline.io.delta import open_table
from pipeline.runner import run_score
from pipeline.sample_data import build_shards, serve_directory

pytestmark = pytest.mark.integration

THRESHOLD = 0.997  # the tiny random-weight model puts distinct photos up to about 0.995 apart


def _photo(name: str) -> np.ndarray:
    import skimage.data

    pixels = getattr(skimage.data, name)()
    return (np.stack([pixels] * 3, axis=-1) if pixels.ndim == 2 else pixels)[..., :3]


def _jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    sink = io.BytesIO()
    Image.fromarray(pixels).save(sink, "JPEG", quality=quality)
    return sink.getvalue()


def _planted() -> tuple[dict[str, bytes], list[set[str]]]:
    """File name -> JPEG bytes, and the groups a deduplication should find (by file name)."""
    files, groups = {}, []
    for name in ("astronaut", "coffee"):
        original = _photo(name)
        height, width = original.shape[:2]
        cut_h, cut_w = height * 5 // 200, width * 5 // 200
        copies = {
            f"{name}.jpg": _jpeg(original),
            f"{name}-copy.jpg": _jpeg(original),  # the same bytes under another key
            f"{name}-q40.jpg": _jpeg(original, 40),
            f"{name}-half.jpg": _jpeg(np.asarray(Image.fromarray(original).resize((width // 2, height // 2)))),
            f"{name}-crop.jpg": _jpeg(original[cut_h:height - cut_h, cut_w:width - cut_w]),
        }
        files.update(copies)
        groups.append(set(copies))
    for name in ("chelsea", "rocket", "camera"):
        files[f"{name}.jpg"] = _jpeg(_photo(name))
    return files, groups


@pytest.fixture(scope="module")
def planted_output(tmp_path_factory, scoring, ray_local):
    import pyarrow as pa

    root = tmp_path_factory.mktemp("planted")
    photos = root / "photos"
    photos.mkdir()
    files, groups = _planted()
    for name, data in files.items():
        (photos / name).write_bytes(data)
    with serve_directory(photos) as base_url:
        url_list = root / "urls.parquet"
        names = sorted(files)
        pq.write_table(pa.table({"url": [f"{base_url}/{n}" for n in names], "caption": [f"photo {n}" for n in names]}),
                       url_list)
        build_shards(url_list, str(root / "shards"), number_sample_per_shard=5)
    output = str(root / "scores")
    run_score(scoring.config(str(root / "shards"), output, write_embeddings=True))
    table = open_table(output).to_pyarrow_table(columns=[S.SHARD, S.KEY, S.URL, S.AESTHETIC_SCORE])
    name_of = {(s, k): u.rsplit("/", 1)[-1] for s, k, u in zip(table[S.SHARD].to_pylist(), table[S.KEY].to_pylist(),
                                                               table[S.URL].to_pylist())}
    score_of = {name_of[(s, k)]: v for s, k, v in zip(table[S.SHARD].to_pylist(), table[S.KEY].to_pylist(),
                                                       table[S.AESTHETIC_SCORE].to_pylist())}
    return output, groups, name_of, score_of


def test_planted_duplicates_are_grouped_whole_and_distinct_photos_are_not(planted_output):
    output, planted, name_of, score_of = planted_output
    result = dedup(output, threshold=THRESHOLD)
    found, info = read_dedup(output)

    groups: dict[int, set[str]] = {}
    for shard, key, group in zip(found[S.SHARD].to_pylist(), found[S.KEY].to_pylist(), found["group_id"].to_pylist()):
        groups.setdefault(group, set()).add(name_of[(shard, key)])
    planted_pairs = {frozenset(p) for g in planted for p in itertools.combinations(sorted(g), 2)}
    found_pairs = {frozenset(p) for g in groups.values() for p in itertools.combinations(sorted(g), 2)}
    precision = len(planted_pairs & found_pairs) / len(found_pairs)
    recall = len(planted_pairs & found_pairs) / len(planted_pairs)
    print(f"dedup on the planted set: precision {precision:.2f}, recall {recall:.2f} (pairs)")
    assert (precision, recall) == (1.0, 1.0), sorted(map(sorted, groups.values()))
    assert sorted(map(sorted, groups.values())) == sorted(map(sorted, planted))

    for group in planted:
        rows = [r for r in found.to_pylist() if name_of[(r[S.SHARD], r[S.KEY])] in group]
        (keeper,) = [r for r in rows if r["keeper"]]
        assert score_of[name_of[(keeper[S.SHARD], keeper[S.KEY])]] == max(score_of[n] for n in group)
        reasons = {name_of[(r[S.SHARD], r[S.KEY])]: r["reason"] for r in rows}
        stem = sorted(group)[0].split("-")[0].removesuffix(".jpg")
        if not reasons[f"{stem}.jpg"] == reasons[f"{stem}-copy.jpg"]:
            pytest.fail(f"the exact copy and its original must share the keeper's reason: {reasons}")
    assert (result.groups, result.duplicates, result.near_searched) == (2, 8, True)
    assert result.exact + result.near == 8 and info["threshold"] == THRESHOLD


def test_cutoffs_with_dedup_count_each_group_once(planted_output, capsys):
    from pipeline.cli import main

    output, planted, _, _ = planted_output
    assert main(["dedup", output, "--threshold", str(THRESHOLD)]) == 0
    assert "2 groups hold 8 duplicates" in capsys.readouterr().out
    assert main(["cutoffs", output]) == 0
    plain = capsys.readouterr().out
    assert main(["cutoffs", output, "--dedup"]) == 0
    deduped = capsys.readouterr().out
    assert "duplicate: 8" in deduped and "duplicate" not in plain
    assert "ok: 13" in plain and "ok: 5" in deduped


def test_select_with_dedup_picks_one_row_of_each_group(planted_output):
    from pipeline.analysis.select import SelectOptions, select_images

    output, planted, name_of, _ = planted_output
    dedup(output, threshold=THRESHOLD)
    everything = select_images(output, SelectOptions(query="a photo", top_k=20))
    keepers = select_images(output, SelectOptions(query="a photo", top_k=20, dedup=True))
    picked = [name_of[(s, k)] for s, k in zip(keepers.table[S.SHARD].to_pylist(), keepers.table[S.KEY].to_pylist())]
    assert everything.info["selected"] == 13 and keepers.info["selected"] == 5
    assert all(len(group & set(picked)) == 1 for group in planted)


def test_report_with_dedup_counts_and_shows_each_group_once(planted_output):
    from pipeline.analysis.report import build_report, merged_histogram
    from pipeline.io.units import read_units

    output, planted, name_of, _ = planted_output
    dedup(output, threshold=THRESHOLD)
    _, plain = build_report(output, per_position=5)
    text, deduped = build_report(output, per_position=5, dedup=True)
    shown = {name_of[(t.shard, t.key)] for t in deduped.thumbs}
    assert len(plain.thumbs) == 13 and len(shown) == len(deduped.thumbs) == 5
    assert all(len(group & shown) == 1 for group in planted)
    assert deduped.tables[0].counts_by_status["ok"] == 5 and deduped.tables[0].counts_by_status["duplicate"] == 8
    assert sum(deduped.bands.values()) == 5 and "duplicates counted once" in text
    # The histogram the page draws loses exactly the duplicates' scores, each from its own bin.
    from pipeline.cutoffs import without_duplicates
    from pipeline.dedup import duplicate_rows

    records = list(read_units(output).values())
    duplicates = duplicate_rows(output).select([S.UNIT, S.AESTHETIC_SCORE]).to_pylist()
    _, before, _, _ = merged_histogram(records)
    _, after, under, over = merged_histogram(without_duplicates({r["unit"]: r for r in records}, duplicates))
    edges = np.linspace(S.HIST_LOW, S.HIST_HIGH, S.HIST_BINS + 1)
    removed, _ = np.histogram(np.asarray([d[S.AESTHETIC_SCORE] for d in duplicates], np.float32), bins=edges)
    assert before.sum() == 13 and after.sum() + under + over == 5
    assert np.array_equal(before - after, removed)


def test_dedup_takes_the_index_cells_as_its_clusters_when_there_is_an_index(planted_output):
    from pipeline.index import build_index

    output, planted, name_of, _ = planted_output
    cells = build_index(output).manifest.nlist
    result = dedup(output, threshold=THRESHOLD)
    found, _ = read_dedup(output)
    assert result.clusters_from_index and result.clusters == cells
    groups: dict[int, set[str]] = {}
    for shard, key, group in zip(found[S.SHARD].to_pylist(), found[S.KEY].to_pylist(), found["group_id"].to_pylist()):
        groups.setdefault(group, set()).add(name_of[(shard, key)])
    assert sorted(map(sorted, groups.values())) == sorted(map(sorted, planted))
