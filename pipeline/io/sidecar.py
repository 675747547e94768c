"""Read img2dataset's per-shard metadata Parquet (the "sidecar").

img2dataset writes one row per URL it tried, failures included, so the sidecar names the samples
that never reached the tar. The columns we lift out get their own output columns; the rest travel
as one JSON object so that extra columns (``save_additional_columns``) are never lost.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pyarrow.parquet as pq

SUCCESS = "success"
_LIFTED = ("key", "url", "caption", "status", "error_message", "original_width", "original_height")


@dataclass(frozen=True)
class SidecarRow:
    key: str
    url: str | None
    caption: str | None
    status: str | None
    error_message: str | None
    original_width: int | None
    original_height: int | None
    extra_json: str | None


@dataclass
class Sidecar:
    rows: dict[str, SidecarRow] = field(default_factory=dict)  # in file order
    duplicate_keys: int = 0


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _int_or_none(value: Any) -> int | None:
    value = _clean(value)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def read_sidecar(fileobj: BinaryIO) -> Sidecar:
    """Parse a sidecar; raises on an unreadable file (the caller decides what that means)."""
    table = pq.read_table(fileobj)
    if "key" not in table.column_names:
        raise ValueError(f"sidecar has no 'key' column (columns: {table.column_names})")
    sidecar = Sidecar()
    for record in table.to_pylist():
        key = _clean(record.get("key"))
        if key is None:
            continue
        key = str(key)
        if key in sidecar.rows:
            sidecar.duplicate_keys += 1
            continue
        extra = {k: _clean(v) for k, v in record.items() if k not in _LIFTED}
        caption = _clean(record.get("caption"))
        sidecar.rows[key] = SidecarRow(
            key=key,
            url=_clean(record.get("url")),
            caption=str(caption) if caption is not None else None,
            status=_clean(record.get("status")),
            error_message=_clean(record.get("error_message")),
            original_width=_int_or_none(record.get("original_width")),
            original_height=_int_or_none(record.get("original_height")),
            extra_json=json.dumps(extra, default=str, ensure_ascii=False) if extra else None,
        )
    return sidecar
