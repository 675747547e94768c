"""Loose image files under a folder or prefix, each with optional ``.txt`` (caption) and ``.json`` siblings.

Files group into samples by their path relative to the input folder, less the extension
(``a/b/0001.jpg``, ``a/b/0001.txt`` and ``a/b/0001.json`` are key ``a/b/0001``).
A sample is one work item. Its rows are those of a tar sample with the same members, so captions, JSON
metadata and statuses follow the same rules; ``shard`` is the image file's URI and the member its name,
at offset 0, so reading an image back is one read of the file.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pyarrow.compute as pc

from pipeline.io.storage import filesystem
from pipeline.io.tar_reader import (
    IMAGE_EXTENSIONS,
    JSON_EXTENSIONS,
    MAX_TEXT_BYTES,
    TEXT_EXTENSIONS,
    UNSCORED_IMAGE_EXTENSIONS,
    Sample,
)
from pipeline.sources.base import (
    Entry,
    Listing,
    StorageError,
    UnitPlan,
    parse_options,
    plan_sticky_units,
    read_byte_range,
)

if TYPE_CHECKING:
    from pipeline.io.units import Committed

_CAPTION_EXTENSIONS = TEXT_EXTENSIONS + JSON_EXTENSIONS


def _extension(uri: str) -> str:
    base = posixpath.basename(uri)
    return base.rsplit(".", 1)[1].lower() if "." in base else ""


@dataclass(frozen=True)
class ImageFile:
    """One sample: its image file (or, without one, the file that names it) and its caption siblings."""

    name: str
    key: str
    image: str | None
    text: str | None
    json: str | None
    extra: tuple[str, ...]  # further files of the key: a second image, a file of another kind
    size: int  # bytes of the image
    etag: str | None  # the tags of every file of the sample: a new caption is a changed sample too

    @property
    def folder(self) -> str:
        return posixpath.dirname(self.name)

    @property
    def stem(self) -> str:
        return posixpath.basename(self.key)

    def version(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "etag": self.etag}

    def task(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "image": self.image, "text": self.text, "json": self.json,
                "extra": list(self.extra)}


def _sample(key: str, files: list[Entry]) -> ImageFile:
    by_kind: dict[str, list[Entry]] = {"image": [], "txt": [], "json": [], "other": []}
    for entry in files:
        ext = _extension(entry.uri)
        kind = "image" if ext in IMAGE_EXTENSIONS else ext if ext in _CAPTION_EXTENSIONS else "other"
        by_kind[kind].append(entry)
    image = by_kind["image"][0] if by_kind["image"] else None
    extra = by_kind["image"][1:] + by_kind["other"]
    text = by_kind["txt"][0] if by_kind["txt"] else None
    meta = by_kind["json"][0] if by_kind["json"] else None
    named_by = image or (extra[0] if extra else None) or text or meta
    tags = [f"{posixpath.basename(e.uri)}={e.etag}" for e in (image, text, meta, *extra) if e is not None]
    return ImageFile(name=named_by.uri, key=key, image=image.uri if image else None, text=text.uri if text else None,
                     json=meta.uri if meta else None, extra=tuple(e.uri for e in extra),
                     size=image.size if image else 0, etag="|".join(tags))


@dataclass(frozen=True)
class FilesOptions:
    # One image is one work item: a unit holds many, so that commits and output files stay few.
    files_per_unit: int = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.files_per_unit, int) or self.files_per_unit < 1:
            raise ValueError(f"files_per_unit must be a whole number >= 1, got {self.files_per_unit!r}")


class FilesSource:
    name = "files"
    items_per_task = 64  # one image is little work: a task per image would be mostly overhead
    names_in_order = False  # images are added anywhere, under any name

    def parse_options(self, values: Mapping[str, Any]) -> FilesOptions:
        return parse_options(FilesOptions, values, self.name)

    def claims(self, listing: Listing) -> bool:
        uris = pc.utf8_lower(listing.table["uri"])
        if pc.any(pc.ends_with(uris, ".tar")).as_py():
            return False
        return any(pc.any(pc.ends_with(uris, f".{extension}")).as_py()
                   for extension in IMAGE_EXTENSIONS + UNSCORED_IMAGE_EXTENSIONS)

    def list_items(self, listing: Listing, options: Any) -> list[ImageFile]:
        samples: dict[tuple[str, str], list[Entry]] = {}
        for entry in listing.entries:
            if posixpath.basename(entry.uri).startswith("."):
                continue  # hidden files: editors' and object stores' own
            relative = entry.relative
            key = posixpath.join(posixpath.dirname(relative), posixpath.basename(relative).rsplit(".", 1)[0])
            samples.setdefault((entry.root, key), []).append(entry)
        items = [_sample(key, files) for (_, key), files in samples.items()]
        return sorted(items, key=lambda i: i.name)

    def per_unit(self, config: Any) -> int:
        return config.source.options.files_per_unit

    def plan_units(self, items: Sequence[ImageFile], per_unit: int, committed: Committed) -> UnitPlan:
        return UnitPlan.of_units(plan_sticky_units(items, per_unit, committed.unit_of_item()))

    def read(self, task: Mapping[str, Any], storage_options: Mapping[str, Any], options: Any) -> list[dict[str, Any]]:
        from pipeline.stages.read import _row_for_sample

        sample = Sample(task["key"], other_members=[posixpath.basename(u) for u in task["extra"]])
        if task["extra"] and task["image"]:
            sample.notes.append(f"further files of the same key ignored: {', '.join(sample.other_members)}")
        try:
            if task["image"]:
                fs, path = filesystem(task["image"], storage_options)
                sample.image = fs.cat_file(path)
                sample.image_member = posixpath.basename(task["image"])
                sample.image_format = _extension(task["image"])
                sample.image_offset, sample.image_size = 0, len(sample.image)
            for uri, field in ((task["text"], "text"), (task["json"], "json")):
                if uri:
                    fs, path = filesystem(uri, storage_options)
                    with fs.open(path, "rb") as handle:
                        setattr(sample, field, handle.read(MAX_TEXT_BYTES))
        except Exception as exc:  # content cannot fail a plain read: what fails is storage
            raise StorageError(f"reading {task['name']}: {type(exc).__name__}: {exc}") from exc
        return [_row_for_sample(sample, None)]

    def owns_row(self, shard: str, member: str | None) -> bool:
        return member is not None and posixpath.basename(shard) == member

    def fetch(self, fs: Any, path: str, member: str | None, offset: int, size: int) -> bytes:
        return read_byte_range(fs, path, offset, size)


SOURCE = FilesSource()
