"""Stream one WebDataset tar and group its members into samples by key.

Members are grouped by WebDataset's own key rule (the path up to the first dot of the file
name) over the whole tar, so members of one key that are not adjacent still form one sample.
Nothing is ever extracted to disk, so member names such as ``../x.jpg`` are only strings here.
The image member's data offset and size are kept, so a later reader fetches it with one ranged read.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Image-like members we recognise but do not score: the row says so instead of "no image".
UNSCORED_IMAGE_EXTENSIONS = ("gif", "bmp", "tif", "tiff", "jp2", "avif", "heic", "heif", "ppm", "pgm")
TEXT_EXTENSIONS = ("txt",)
JSON_EXTENSIONS = ("json",)
MAX_TEXT_BYTES = 1 << 20  # a caption member larger than this is cut, and the row says so

_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset.tariterators.base_plus_ext


@dataclass
class Sample:
    key: str
    image_member: str | None = None
    image_format: str | None = None
    image_offset: int = -1
    image_size: int = -1
    image: bytes | None = None
    text: bytes | None = None
    json: bytes | None = None
    other_members: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # warnings that do not stop scoring
    error: str | None = None  # why the image member is unusable (truncated in the tar, ...)


@dataclass
class TarContents:
    samples: dict[str, Sample]  # in order of first appearance
    error: str | None = None  # the tar ended badly or was never a tar; samples read before stay
    members_read: int = 0
    skipped_members: list[str] = field(default_factory=list)  # links, devices, names without a key


def split_key(name: str) -> tuple[str, str] | None:
    match = _KEY_AND_EXT.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def read_tar(fileobj: BinaryIO) -> TarContents:
    """Read every member of a tar stream. Content errors end the read and are reported, not raised;
    storage errors (the stream itself failing) propagate so the caller can tell them apart."""
    contents = TarContents(samples={})
    try:
        archive = tarfile.open(fileobj=fileobj, mode="r|")
    except (tarfile.TarError, EOFError) as exc:
        contents.error = f"not a readable tar: {exc}"
        return contents
    try:
        while True:
            try:
                member = archive.next()
            except (tarfile.TarError, EOFError) as exc:
                contents.error = f"tar ends badly after {contents.members_read} members: {exc}"
                break
            if member is None:
                break
            contents.members_read += 1
            _add_member(contents, archive, member)
    finally:
        archive.close()
    return contents


def _add_member(contents: TarContents, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    if member.isdir():
        return
    parts = split_key(member.name) if member.isfile() else None
    if parts is None:
        contents.skipped_members.append(member.name)
        return
    key, ext = parts
    sample = contents.samples.get(key)
    if sample is None:
        sample = contents.samples[key] = Sample(key)
    wanted = ext in IMAGE_EXTENSIONS or ext in TEXT_EXTENSIONS or ext in JSON_EXTENSIONS
    if not wanted:
        sample.other_members.append(member.name)
        return
    if ext in IMAGE_EXTENSIONS and sample.image_member is not None:
        sample.notes.append(f"second image member {member.name!r} ignored")
        return
    if (ext in TEXT_EXTENSIONS and sample.text is not None) or (ext in JSON_EXTENSIONS and sample.json is not None):
        sample.notes.append(f"duplicate member {member.name!r} ignored")
        return
    limit = MAX_TEXT_BYTES if ext not in IMAGE_EXTENSIONS else None
    try:
        handle = archive.extractfile(member)
        data = handle.read(limit if limit is not None else -1) if handle is not None else b""
    except (tarfile.TarError, EOFError) as exc:
        data = None
        error = f"member {member.name!r} is cut short in the tar: {exc}"
        if ext in IMAGE_EXTENSIONS:
            sample.error = error
        else:
            sample.notes.append(error)
    if data is not None and len(data) < member.size and limit is None:
        sample.error = f"member {member.name!r} is cut short in the tar ({len(data)} of {member.size} bytes)"
    if ext in IMAGE_EXTENSIONS:
        sample.image_member = member.name
        sample.image_format = ext
        sample.image_offset = member.offset_data
        sample.image_size = member.size
        sample.image = data if sample.error is None else None
    elif ext in TEXT_EXTENSIONS:
        if data is not None and member.size > MAX_TEXT_BYTES:
            sample.notes.append(f"caption member {member.name!r} cut to {MAX_TEXT_BYTES} of {member.size} bytes")
        sample.text = data
    else:
        sample.json = data
