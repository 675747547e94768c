"""For analysts: read the committed scores, look at the images, select sets by text.

- :mod:`pipeline.analysis.reading`: ``open_scores`` (pyarrow dataset), ``duckdb_relation`` (DuckDB view),
  ``fetch_image`` (one ranged read of a shard per image).
- :mod:`pipeline.analysis.report`: one self-contained HTML page (``aesthetics report``).
- :mod:`pipeline.analysis.select`: rank by a text query, keep a score threshold, spread the picks
  (``aesthetics select``).
"""

from pipeline.analysis.reading import (
    BAND_RANGES,
    bands_at_least,
    committed_paths,
    duckdb_relation,
    fetch_image,
    fetch_images,
    open_scores,
    read_units,
    score_filter,
    thumbnail,
)

__all__ = [
    "BAND_RANGES", "bands_at_least", "committed_paths", "duckdb_relation", "fetch_image", "fetch_images",
    "open_scores", "read_units", "score_filter", "thumbnail",
]
