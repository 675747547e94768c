"""One self-contained HTML page about a scored output prefix (``aesthetics report OUTPUT --out report.html``).

What it shows, and where each part comes from:

- the cutoff table beside LAION-Aesthetics' published counts, and rows by status: from the records only
  (:func:`pipeline.cutoffs.build_tables`), never a rescan;
- the score histogram (the records' fixed 0.25-wide bins, summed) with LAION's thresholds marked, as an
  inline PNG;
- per score band, highest first: the best, median and worst images with their caption, key and score. The
  rows come from DuckDB over the committed files; each image is read from its shard with ONE ranged read
  (``tar_offset``/``tar_size``), shrunk to a JPEG thumbnail and inlined as a data: URI.

The page loads nothing: every image is a data: URI, the CSS is inline, and a Content-Security-Policy that
allows only data: images says so to the browser. Every thumbnail is a ``<figure class="thumb">`` with
``data-key``, ``data-shard``, ``data-score``, ``data-band`` and ``data-position`` (best/median/worst), in page
order from the best image of the highest band down, so tools (and tests) can match it to the Parquet.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from pipeline import bands as band_labels
from pipeline import schema as S
from pipeline.analysis.reading import duckdb_relation, fetch_images, thumbnail
from pipeline.cutoffs import CutoffTable, build_tables
from pipeline.io.storage import filesystem, write_bytes_atomic
from pipeline.io.units import read_units

log = logging.getLogger(__name__)

POSITIONS = ("best", "median", "worst")
_THUMB_COLUMNS = (S.KEY, S.SHARD, S.OFFSET, S.SIZE, S.CAPTION, S.URL, S.AESTHETIC_SCORE, S.SCORE_BAND)


@dataclass(frozen=True)
class Thumb:
    key: str
    shard: str
    band: str
    position: str
    score: float
    caption: str
    url: str
    jpeg: bytes | None  # None: the ranged read or the decode failed (error says why)
    error: str | None = None


@dataclass
class ReportInfo:
    output: str
    html_path: str | None
    bands: dict[str, int]  # scored rows per band
    thumbs: list[Thumb] = field(default_factory=list)
    tables: list[CutoffTable] = field(default_factory=list)
    seconds: float = 0.0
    html_bytes: int = 0


# Data ---------------------------------------------------------------------------------------------


def merged_histogram(records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(bin edges, counts, underflow, overflow) summed over the records' fixed score histograms."""
    edges = np.linspace(S.HIST_LOW, S.HIST_HIGH, S.HIST_BINS + 1)
    counts = np.zeros(S.HIST_BINS, dtype=np.int64)
    under = over = 0
    for record in records:
        hist = record["score"]["histogram"]
        counts += np.asarray(hist["counts"], dtype=np.int64)
        under += int(hist["underflow"])
        over += int(hist["overflow"])
    return edges, counts, under, over


@contextlib.contextmanager
def _plot(width_in: float, height_in: float, dpi: int) -> Iterator[tuple[Any, Any]]:
    """A matplotlib figure and axes on the Agg backend, closed afterwards."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(width_in, height_in), dpi=dpi)
    try:
        yield figure, axes
    finally:
        plt.close(figure)


def _png(figure: Any, axes: Any) -> bytes:
    axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    sink = io.BytesIO()
    figure.savefig(sink, format="png")
    return sink.getvalue()


def histogram_png(records: Sequence[Mapping[str, Any]], title: str = "", width_in: float = 9.0,
                  height_in: float = 3.2, dpi: int = 110) -> bytes:
    """The score histogram with LAION's thresholds as dashed lines, as PNG bytes (matplotlib, Agg)."""
    edges, counts, under, over = merged_histogram(records)
    with _plot(width_in, height_in, dpi) as (figure, axes):
        axes.bar(edges[:-1], counts, width=S.HIST_STEP, align="edge", color="#4c78a8", edgecolor="white")
        nonzero = np.flatnonzero(counts)
        low = min(edges[nonzero[0]] if nonzero.size else 4.0, min(S.LAION_THRESHOLDS)) - 0.5
        high = max(edges[nonzero[-1] + 1] if nonzero.size else 7.0, max(S.LAION_THRESHOLDS)) + 0.5
        axes.set_xlim(max(S.HIST_LOW, low), min(S.HIST_HIGH, high))
        top = max(int(counts.max()) if counts.size else 1, 1)
        for i, threshold in enumerate(S.LAION_THRESHOLDS):
            axes.axvline(threshold, color="#e45756", linestyle="--", linewidth=1)
            axes.text(threshold, top * (1.02 + 0.07 * (i % 2)), f"{threshold:g}", color="#e45756",
                      ha="center", va="bottom", fontsize=8)
        axes.set_ylim(0, top * 1.22)
        axes.set_xlabel("aesthetic score (0.25-wide bins); dashed: LAION-Aesthetics cutoffs")
        axes.set_ylabel("images")
        note = f"  (outside [{S.HIST_LOW:g}, {S.HIST_HIGH:g}): {under} below, {over} above)" if under or over else ""
        axes.set_title((title or "Score histogram") + note, fontsize=10)
        return _png(figure, axes)


def similarity_png(records: Sequence[Mapping[str, Any]], width_in: float = 9.0, height_in: float = 2.6,
                   dpi: int = 110) -> bytes | None:
    """The clip_similarity histogram, summed over the records, with LAION's cut-offs marked; None when no
    unit recorded one."""
    summaries = [r["clip_similarity"] for r in records if r.get("clip_similarity")]
    if not summaries or not sum(s["count"] for s in summaries):
        return None
    counts = np.sum([np.asarray(s["histogram"]["counts"], dtype=np.int64) for s in summaries], axis=0)
    edges = np.linspace(S.SIMILARITY_LOW, S.SIMILARITY_HIGH, len(counts) + 1)
    with _plot(width_in, height_in, dpi) as (figure, axes):
        axes.bar(edges[:-1], counts, width=S.SIMILARITY_STEP, align="edge", color="#72b7b2", edgecolor="white")
        nonzero = np.flatnonzero(counts)
        axes.set_xlim(min(edges[nonzero[0]], 0.2) - 0.05, max(edges[nonzero[-1] + 1], 0.35) + 0.05)
        for threshold in S.SIMILARITY_THRESHOLDS:
            axes.axvline(threshold, color="#e45756", linestyle="--", linewidth=1)
        axes.set_xlabel("clip_similarity: image-caption cosine (0.02-wide bins); dashed: LAION's 0.28 and 0.3")
        axes.set_ylabel("images")
        axes.set_title(f"Caption similarity ({int(counts.sum()):,} images with a caption)", fontsize=10)
        return _png(figure, axes)


def pick_thumbnail_rows(con: Any, view: str, per_position: int) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """(scored rows per band, rows to show): per band the ``per_position`` best, median and worst ok rows.

    A band with at most 3 x ``per_position`` rows shows all of them (as best, then median, then worst
    thirds), so no image appears twice.
    """
    bands = dict(con.execute(
        f"SELECT {S.SCORE_BAND}, count(*) FROM {view} WHERE {S.STATUS} = 'ok' AND isfinite({S.AESTHETIC_SCORE}) "
        f"GROUP BY ALL").fetchall())
    order = [b for b in reversed(band_labels.LABELS) if bands.get(b)]
    columns = ", ".join(_THUMB_COLUMNS)
    where = f"{S.STATUS} = 'ok' AND isfinite({S.AESTHETIC_SCORE}) AND {S.SCORE_BAND} = ?"
    tie = f"{S.KEY}, {S.SHARD}"
    chosen: list[dict[str, Any]] = []
    for band in order:
        def rows(sql: str, params: list[Any]) -> list[dict[str, Any]]:
            cursor = con.execute(sql, params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, r)) for r in cursor.fetchall()]

        if bands[band] <= 3 * per_position:
            every = rows(f"SELECT {columns} FROM {view} WHERE {where} ORDER BY {S.AESTHETIC_SCORE} DESC, {tie}", [band])
            thirds = np.array_split(np.arange(len(every)), 3)
            for position, index in zip(POSITIONS, thirds):
                chosen += [{**every[i], "position": position} for i in index]
            continue
        best = rows(f"SELECT {columns} FROM {view} WHERE {where} ORDER BY {S.AESTHETIC_SCORE} DESC, {tie} LIMIT ?",
                    [band, per_position])
        worst = rows(f"SELECT {columns} FROM {view} WHERE {where} ORDER BY {S.AESTHETIC_SCORE} ASC, {tie} LIMIT ?",
                     [band, per_position])
        taken = {(r[S.SHARD], r[S.KEY]) for r in best + worst}
        near = rows(
            f"WITH m AS (SELECT median({S.AESTHETIC_SCORE}) AS med FROM {view} WHERE {where}) "
            f"SELECT {columns} FROM {view}, m WHERE {where} "
            f"ORDER BY abs({S.AESTHETIC_SCORE} - m.med), {tie} LIMIT ?", [band, band, 3 * per_position])
        median = [r for r in near if (r[S.SHARD], r[S.KEY]) not in taken][:per_position]
        median.sort(key=lambda r: (-r[S.AESTHETIC_SCORE], r[S.KEY]))
        worst.sort(key=lambda r: (-r[S.AESTHETIC_SCORE], r[S.KEY]))
        for position, group in zip(POSITIONS, (best, median, worst)):
            chosen += [{**r, "position": position} for r in group]
    return {b: int(bands[b]) for b in order}, chosen


def load_thumbs(rows: Sequence[Mapping[str, Any]], storage_options: Mapping[str, Any] | None = None,
                size: int = 192) -> list[Thumb]:
    """Fetch each row's image with one ranged read of its shard and shrink it to a JPEG thumbnail."""
    thumbs = []
    try:
        images: list[bytes | Exception] = list(fetch_images(rows, storage_options))
    except Exception:  # noqa: BLE001 - fall back to one at a time so one bad shard spoils one thumbnail
        images = []
        for row in rows:
            try:
                images += fetch_images([row], storage_options)
            except Exception as error:  # noqa: BLE001
                images.append(error)
    for row, data in zip(rows, images):
        jpeg, error = None, None
        if isinstance(data, Exception):
            error = f"{type(data).__name__}: {data}"
        else:
            try:
                jpeg = thumbnail(data, size)
            except Exception as exc:  # noqa: BLE001 - a bad image becomes a visible placeholder
                error = f"{type(exc).__name__}: {exc}"
        thumbs.append(Thumb(key=str(row[S.KEY]), shard=str(row[S.SHARD]), band=str(row[S.SCORE_BAND]),
                            position=str(row["position"]), score=float(row[S.AESTHETIC_SCORE]),
                            caption=str(row.get(S.CAPTION) or ""), url=str(row.get(S.URL) or ""),
                            jpeg=jpeg, error=error))
    return thumbs


# HTML -----------------------------------------------------------------------------------------------


def _template() -> Any:
    """The page template (``pipeline/data/report.html.j2``), rendered with autoescaping: every caption, key
    and URL comes from the data and is escaped by Jinja, not by hand."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.PackageLoader("pipeline", "data"),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.get_template("report.html.j2")


def _statuses(tables: Sequence[CutoffTable]) -> list[tuple[str, int, float]]:
    counts: dict[str, int] = {}
    for table in tables:
        for status, count in table.counts_by_status.items():
            counts[status] = counts.get(status, 0) + count
    total = sum(counts.values()) or 1
    return [(s, c, c / total) for s, c in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def _thumb_context(thumb: Thumb) -> dict[str, Any]:
    caption = thumb.caption if len(thumb.caption) <= 140 else thumb.caption[:137] + "..."
    return {"key": thumb.key, "shard": thumb.shard, "score": thumb.score, "band": thumb.band,
            "position": thumb.position, "url": thumb.url, "caption": caption, "error": thumb.error,
            "jpeg": base64.b64encode(thumb.jpeg).decode() if thumb.jpeg is not None else None}


def render_html(output: str, tables: Sequence[CutoffTable], histogram: bytes, bands: Mapping[str, int],
                thumbs: Sequence[Thumb], title: str | None = None, similarity: bytes | None = None) -> str:
    sections = []
    for band, count in bands.items():
        rows = [(position, [_thumb_context(t) for t in thumbs if t.band == band and t.position == position])
                for position in POSITIONS]
        sections.append({"name": band, "count": count, "rows": [(p, members) for p, members in rows if members]})
    return _template().render(
        title=title or f"Aesthetic scores: {output}", output=output,
        generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        tiny_random=any(t.tiny_random for t in tables), tables=list(tables), statuses=_statuses(tables),
        histogram=base64.b64encode(histogram).decode(),
        similarity=base64.b64encode(similarity).decode() if similarity is not None else None, bands=sections)


def build_report(output: str, storage_options: Mapping[str, Any] | None = None, per_position: int = 3,
                 thumb_size: int = 192, title: str | None = None, dedup: bool = False) -> tuple[str, ReportInfo]:
    """(HTML text, what went into it) for the committed units under ``output``; with ``dedup``, each
    duplicate group (``aesthetics dedup``) counts and shows as its keeper only."""
    started = time.time()
    records = read_units(output, storage_options)
    duplicates = None
    if dedup:
        from pipeline.cutoffs import without_duplicates
        from pipeline.dedup import duplicate_rows

        duplicates = duplicate_rows(output, storage_options)
        records = {r["unit"]: r for r in without_duplicates(
            records, duplicates.select([S.UNIT, S.AESTHETIC_SCORE]).to_pylist())}
    tables = build_tables(records.values())
    import duckdb

    con = duckdb.connect()
    try:
        duckdb_relation(output, con=con, view_name="scores", storage_options=storage_options)
        view = "scores"
        if duplicates is not None:
            con.register("duplicates", duplicates.select([S.SHARD, S.KEY]))
            con.execute(f"CREATE VIEW keepers AS SELECT * FROM scores ANTI JOIN duplicates USING ({S.SHARD}, {S.KEY})")
            view = "keepers"
        bands, rows = pick_thumbnail_rows(con, view, per_position) if records else ({}, [])
    finally:
        con.close()
    thumbs = load_thumbs(rows, storage_options, thumb_size)
    histogram = histogram_png(list(records.values()))
    if dedup:
        title = title or f"Aesthetic scores: {output} (duplicates counted once)"
    text = render_html(output, tables, histogram, bands, thumbs, title, similarity_png(list(records.values())))
    info = ReportInfo(output=output, html_path=None, bands=bands, thumbs=thumbs, tables=list(tables),
                      seconds=round(time.time() - started, 3), html_bytes=len(text.encode()))
    return text, info


def write_report(output: str, out: str, storage_options: Mapping[str, Any] | None = None,
                 out_storage_options: Mapping[str, Any] | None = None, per_position: int = 3,
                 thumb_size: int = 192, title: str | None = None, dedup: bool = False) -> ReportInfo:
    """Build the report of ``output`` and write it to ``out`` (a path or URI of the .html file)."""
    text, info = build_report(output, storage_options, per_position, thumb_size, title, dedup)
    fs, path = filesystem(out, out_storage_options if out_storage_options is not None else storage_options)
    write_bytes_atomic(fs, path, text.encode())
    info.html_path = out
    return info


__all__ = ["POSITIONS", "ReportInfo", "Thumb", "build_report", "histogram_png", "load_thumbs", "merged_histogram",
           "pick_thumbnail_rows", "render_html", "write_report"]
