"""Build small tars and sidecars by hand, for tests of the read path."""

from __future__ import annotations

import io
import tarfile
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq


def make_tar(members: Iterable[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_sidecar(rows: list[dict]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def sidecar_row(key: str, status: str = "success", caption: str | None = None, **extra) -> dict:
    row = {"key": key, "url": f"http://127.0.0.1/{key}.jpg", "caption": caption or f"caption {key}",
           "status": status, "error_message": None if status == "success" else "HTTP Error 404: Not Found",
           "original_width": 640, "original_height": 480}
    row.update(extra)
    return row
