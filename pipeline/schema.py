"""Column names, per-row status values, score bands and the output Arrow schema.

Every stage reads and writes columns named here; nothing else in the package spells a column name.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import bands


class Status(str, enum.Enum):
    """Why a row has (or has no) score. Every output row carries exactly one."""

    OK = "ok"
    DOWNLOAD_FAILED = "download_failed"  # img2dataset could not fetch or resize it (sidecar row, no tar member)
    NO_IMAGE = "no_image"  # the sample has no image member (caption only, or the member vanished)
    EMPTY_IMAGE = "empty_image"  # the image member has zero bytes
    DECODE_ERROR = "decode_error"  # truncated, corrupt, or not an image at all
    UNSUPPORTED_FORMAT = "unsupported_format"  # an image, but of a format or mode we do not score
    IMAGE_TOO_LARGE = "image_too_large"  # over the pixel limit (decompression bomb guard)
    SHARD_ERROR = "shard_error"  # the tar itself is unreadable (not a tar, truncated, empty)
    STORAGE_ERROR = "storage_error"  # storage failed after retries: the unit is not committed, a rerun retries it
    SCORE_ERROR = "score_error"  # the model produced no finite score for this row
    EXCLUDED = "excluded"  # its image bytes or URL are on the run's exclusion list (--exclude-hashes)


# The key of the one row that stands for a shard with no readable samples and no sidecar.
SHARD_ROW_KEY = ""

# Columns flowing between stages ------------------------------------------------------------
KEY = "key"
SHARD = "shard"  # URI of the tar the row came from
UNIT = "unit"  # work unit id (the output file stem)
MEMBER = "tar_member"  # name of the image member inside the tar
OFFSET = "tar_offset"  # byte offset of the image member's data inside the tar
SIZE = "tar_size"  # byte size of the image member's data
IMAGE_FORMAT = "image_format"  # the member's extension: jpg, jpeg, png or webp
IMAGE_SHA256 = "image_sha256"  # hex SHA-256 of the image member's bytes: exact duplicates share it
PHASH = "phash"  # 64-bit perceptual hash of the decoded pixels (imagehash.phash), 16 hex digits; --phash
IMAGE = "image"  # raw image bytes; dropped by the decode stage
PIXELS = "pixels"  # uint8 (N, S, S, 3) after resize and crop; dropped by the embed stage
URL = "url"
CAPTION = "caption"
ORIGINAL_WIDTH = "original_width"  # from the sidecar: size before img2dataset resized it
ORIGINAL_HEIGHT = "original_height"
WIDTH = "width"  # decoded size, after EXIF orientation
HEIGHT = "height"
DOWNLOAD_STATUS = "download_status"  # img2dataset's own status, verbatim
METADATA_JSON = "metadata_json"  # the other sidecar and .json member fields, as one JSON object
STATUS = "status"
ERROR = "error"
SHARD_ROWS = "shard_rows"  # rows the read stage emitted for this row's shard (completeness check)
AESTHETIC_SCORE = "aesthetic_score"  # the primary head's score
CLIP_SIMILARITY = "clip_similarity"  # cosine of the image and caption embeddings of the same CLIP; NaN without caption
EMBEDDING = "embedding"  # optional fp16 L2-normalised CLIP image embedding
MODEL = "model"  # CLIP identity: architecture + weights sha256
HEAD = "head"  # primary head identity: name + sha256
SCORE_BAND = bands.COLUMN  # Hive partition column: pipeline/bands.py owns its rule

SCORE_PREFIX = "score_"  # extra heads and prompt scores: score_<name>


def score_column(head_name: str) -> str:
    return SCORE_PREFIX + head_name.replace("-", "_").replace("+", "_").replace(".", "_")


# LAION-Aesthetics' published cut-offs, the rows of the cutoff table.
LAION_THRESHOLDS = (4.5, 4.75, 5.0, 6.0, 6.25, 6.5)
# clip_similarity cut-offs for context: LAION-2B-en kept image-caption cosine >= 0.28 (ViT-B/32), LAION-400M
# >= 0.3. A unit record counts the rows at each, and keeps a 0.02-wide histogram over [-1, 1].
SIMILARITY_THRESHOLDS = (0.28, 0.3)
SIMILARITY_LOW, SIMILARITY_HIGH, SIMILARITY_STEP = -1.0, 1.0, 0.02

# Histogram kept in every record: 0.25-wide bins over [0, 10) plus under/overflow, so every
# LAION threshold is a bin edge and the cutoff table never needs the Parquet.
HIST_LOW, HIST_HIGH, HIST_STEP = 0.0, 10.0, 0.25
HIST_BINS = int(round((HIST_HIGH - HIST_LOW) / HIST_STEP))


def output_schema(extra_score_columns: tuple[str, ...] = (), embedding_dim: int | None = None) -> pa.Schema:
    """The Arrow schema of every output Parquet file (the partition column lives in the path)."""
    fields = [
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(SHARD, pa.string(), nullable=False),
        pa.field(UNIT, pa.string(), nullable=False),
        pa.field(MEMBER, pa.string()),
        pa.field(OFFSET, pa.int64()),
        pa.field(SIZE, pa.int64()),
        pa.field(IMAGE_FORMAT, pa.string()),
        pa.field(IMAGE_SHA256, pa.string()),
        pa.field(PHASH, pa.string()),
        pa.field(URL, pa.string()),
        pa.field(CAPTION, pa.string()),
        pa.field(ORIGINAL_WIDTH, pa.int32()),
        pa.field(ORIGINAL_HEIGHT, pa.int32()),
        pa.field(WIDTH, pa.int32()),
        pa.field(HEIGHT, pa.int32()),
        pa.field(DOWNLOAD_STATUS, pa.string()),
        pa.field(METADATA_JSON, pa.string()),
        pa.field(STATUS, pa.string(), nullable=False),
        pa.field(ERROR, pa.string()),
        pa.field(AESTHETIC_SCORE, pa.float32()),
        pa.field(CLIP_SIMILARITY, pa.float32()),
    ]
    fields += [pa.field(name, pa.float32()) for name in extra_score_columns]
    fields += [pa.field(MODEL, pa.string(), nullable=False), pa.field(HEAD, pa.string(), nullable=False)]
    if embedding_dim:
        fields.append(pa.field(EMBEDDING, pa.list_(pa.float16(), embedding_dim)))
    return pa.schema(fields)


TEXT_COLUMNS = frozenset(f.name for f in output_schema() if pa.types.is_string(f.type))


def restore_null_text(batch: dict[str, Any]) -> dict[str, Any]:
    """Give text columns that arrive as float NaNs their None back, in place.

    When a text column is None in every row of a block, Arrow types it ``null`` and Ray Data hands it
    to the next numpy UDF as float32 NaNs; passed on, it would become a float column or the string
    "nan". Every stage that takes numpy batches calls this first."""
    for name in TEXT_COLUMNS.intersection(batch):
        values = batch[name]
        if isinstance(values, np.ndarray) and values.dtype.kind == "f":
            if not np.isnan(values).all():
                raise TypeError(f"column {name!r} holds numbers, not text")
            batch[name] = np.full(len(values), None, dtype=object)
    return batch
