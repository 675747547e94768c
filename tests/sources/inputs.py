"""The sample dataset's shards turned into the other input formats, with the same images, keys and captions."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

from pipeline.io.tar_reader import split_key


def tar_samples(tar: str | Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of every member of a tar."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as archive:
        for member in archive.getmembers():
            if member.isfile():
                key, ext = split_key(member.name)
                samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
    return samples


def copy_shards(tars: list[str], target: Path) -> None:
    """img2dataset shards: each tar with its sidecar."""
    target.mkdir(parents=True, exist_ok=True)
    for tar in tars:
        for path in (Path(tar), Path(tar).with_suffix(".parquet")):
            if path.exists():
                shutil.copy(path, target / path.name)


def write_loose_files(tars: list[str], target: Path) -> None:
    """Loose files: a folder per shard, each member of the tar a file (``000000001.jpg``, ``.txt``, ``.json``)."""
    for tar in tars:
        folder = target / Path(tar).stem
        folder.mkdir(parents=True, exist_ok=True)
        for key, members in tar_samples(tar).items():
            for ext, data in members.items():
                (folder / f"{key}.{ext}").write_bytes(data)


def parquet_table(tar: str | Path):
    """One Parquet table per tar: key, the image bytes in ``jpg``, ``caption``, ``url`` and an extra column."""
    import pyarrow as pa

    rows = []
    for key, members in tar_samples(tar).items():
        meta = json.loads(members.get("json", b"{}"))
        rows.append({"key": key, "jpg": members.get("jpg"), "caption": members.get("txt", b"").decode() or None,
                     "url": meta.get("url"), "width": meta.get("width")})
    return pa.Table.from_pylist(rows, schema=pa.schema([("key", pa.string()), ("jpg", pa.binary()),
                                                        ("caption", pa.string()), ("url", pa.string()),
                                                        ("width", pa.int64())]))


def write_parquet_files(tars: list[str], target: Path, row_group_size: int = 4) -> None:
    """Parquet files named like a Hugging Face export's, small row groups so rows span several."""
    import pyarrow.parquet as pq

    target.mkdir(parents=True, exist_ok=True)
    for tar in tars:
        pq.write_table(parquet_table(tar), target / f"train-{Path(tar).stem}.parquet", row_group_size=row_group_size)


def tar_member_bytes(tars: list[str]) -> dict[str, bytes]:
    """sha256 -> bytes of every image member of the tars."""
    import hashlib

    images = {}
    for tar in tars:
        for members in tar_samples(tar).values():
            for ext in ("jpg", "jpeg", "png", "webp"):
                if ext in members:
                    images[hashlib.sha256(members[ext]).hexdigest()] = members[ext]
    return images
