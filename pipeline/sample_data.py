"""A small, real, offline sample dataset: photographs -> 127.0.0.1 -> img2dataset -> WebDataset shards.

Used by ``make demo``, the integration tests and the benchmarks. Nothing here reaches the network:
the photographs are the ones bundled inside scikit-image (no pooch download), they are served by a
threaded ``http.server`` on 127.0.0.1, and img2dataset itself downloads them, resizes them and writes
``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json`` exactly as it does for LAION.

Every subject comes as the original and as degraded variants (blurred, dark, noisy, tiny, washed
out, JPEG-mangled), so aesthetic scores have something to rank; a few URLs 404 and one returns a
text body, so the shards carry img2dataset's own failure rows. Past the distinct subject x variant
pairs, images are seeded random crops/flips of them: thousands of distinct images cost milliseconds
each.

img2dataset observed (1.47), worth knowing when reading its output:

* sidecar ``NNNNN.parquet`` has one row per URL of the shard, failures included. Columns, in order:
  the saved additional columns, ``caption``, ``url`` (strings, as given), then ``key`` (string),
  ``status`` (string), ``error_message`` (string, null on success), ``width``, ``height``,
  ``original_width``, ``original_height`` (int32, null unless success), ``exif`` (string, JSON),
  ``sha256`` (string of the downloaded bytes, null unless success).
* ``status`` is one of ``success``, ``failed_to_download`` (HTTP error, timeout, refused) or
  ``failed_to_resize`` (the body did not decode as an image; error_message "Image decoding error").
* ``key`` = shard_id * 10**ceil(log10(number_sample_per_shard)) + row index in the shard, zero-padded
  to ceil(log10(number_sample_per_shard)) + 5 digits: 10 per shard -> ``000013`` is shard 1, row 3.
* tar members: ``<key>.jpg``, ``<key>.txt`` (caption), ``<key>.json`` (the sidecar row as JSON),
  adjacent, in download-completion order (not key order); failed rows have no members.
* grayscale sources stay single-channel JPEGs (cv2 ``IMREAD_UNCHANGED``); alpha is matted on white.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import http.server
import io
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFilter

from pipeline.io.storage import is_local, local_path

# Subjects --------------------------------------------------------------------------------------
# Only images that ship inside the scikit-image wheel: the optional-download ones need pooch and
# the network. Grayscale photographs are kept on purpose: LAION has them and decode must cope.


def _motorcycle() -> np.ndarray:
    from skimage import data

    left, _right, _disparity = data.stereo_motorcycle()
    return left


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return getattr(data, name)()

    return load


# (subject, loader, what the photo shows). Order matters: it fixes which subjects a small sample gets.
SUBJECTS: tuple[tuple[str, Callable[[], np.ndarray], str], ...] = (
    ("astronaut", _skimage("astronaut"), "an astronaut in a spacesuit in front of a flag"),
    ("chelsea", _skimage("chelsea"), "a tabby cat"),
    ("coffee", _skimage("coffee"), "a cup of coffee on a saucer"),
    ("rocket", _skimage("rocket"), "a rocket on the launch pad"),
    ("camera", _skimage("camera"), "a man with a camera on a tripod, black and white"),
    ("motorcycle", _motorcycle, "a motorcycle in a workshop"),
    ("hubble_deep_field", _skimage("hubble_deep_field"), "distant galaxies in deep space"),
    ("coins", _skimage("coins"), "old coins, black and white"),
    ("immunohistochemistry", _skimage("immunohistochemistry"), "a microscope slide of stained tissue"),
    ("moon", _skimage("moon"), "the surface of the moon"),
    ("retina", _skimage("retina"), "the retina of a human eye"),
    ("clock", _skimage("clock"), "a clock on a wall, black and white"),
    ("brick", _skimage("brick"), "a brick wall"),
    ("grass", _skimage("grass"), "a close-up of grass"),
    ("gravel", _skimage("gravel"), "a close-up of gravel"),
)

# Degradations ----------------------------------------------------------------------------------


def _blurred(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=max(image.size) / 80))


def _dark(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.point(lambda value: int(value * 0.18))


def _noisy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, 55.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))  # 2-D -> L, 3-D -> RGB


def _tiny(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    tiny = image.copy()
    tiny.thumbnail((32, 32), Image.Resampling.LANCZOS)
    return tiny


def _overexposed(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.point(lambda value: min(255, int(value * 2.4 + 80)))


def _jpeg_artifacts(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    # Round-trip through a quality-4 JPEG: the blocks survive img2dataset's quality-95 re-encode.
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=4)
    buffer.seek(0)
    return Image.open(buffer).convert(image.mode)


# variant name -> (caption suffix, transform). "original" first: it is the reference for the rest.
VARIANTS: dict[str, tuple[str, Callable[[Image.Image, np.random.Generator], Image.Image] | None]] = {
    "original": ("", None),
    "blurred": (", blurred", _blurred),
    "dark": (", very dark, underexposed", _dark),
    "noisy": (", with heavy noise", _noisy),
    "tiny": (", tiny thumbnail", _tiny),
    "overexposed": (", overexposed, washed out", _overexposed),
    "jpeg_artifacts": (", heavy jpeg compression artifacts", _jpeg_artifacts),
}
DEGRADATIONS = tuple(name for name in VARIANTS if name != "original")

# A text file beside the photos: its URL returns a body that is not an image, which img2dataset
# records as failed_to_resize (a different failure from a 404's failed_to_download).
NON_IMAGE_NAME = "not_an_image.txt"

# File format by position in the list: mostly JPEG, like the web, with some PNG and WebP so the
# download path sees more than one codec (img2dataset re-encodes all of them to JPEG).
_FORMAT_CYCLE = ("jpg", "jpg", "png", "jpg", "jpg", "webp", "jpg", "jpg")
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


@dataclasses.dataclass(frozen=True)
class Photo:
    """One image file on disk and what it shows."""

    index: int
    path: Path
    caption: str
    subject: str
    variant: str  # a key of VARIANTS
    jittered: bool  # a random crop/flip of the subject (beyond the distinct subject x variant pairs)
    image_format: str  # jpg, png or webp
    width: int
    height: int


def _as_rgb_or_gray(pixels: np.ndarray) -> Image.Image:
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        pixels = (np.clip(pixels, 0, 1) * 255).astype(np.uint8) if pixels.dtype.kind == "f" else pixels.astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        pixels = pixels[:, :, :3]
    return Image.fromarray(pixels)  # uint8 2-D -> L, H x W x 3 -> RGB


def _jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random 55-95% crop, flipped half the time: cheap, and distinct for every seed."""
    width, height = image.size
    crop_width = int(width * rng.uniform(0.55, 0.95))
    crop_height = int(height * rng.uniform(0.55, 0.95))
    left = int(rng.integers(0, width - crop_width + 1))
    top = int(rng.integers(0, height - crop_height + 1))
    cropped = image.crop((left, top, left + crop_width, top + crop_height))
    if rng.random() < 0.5:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return cropped


def _plan(n_subjects: int, variants: Sequence[str], n_images: int) -> list[tuple[int, str]]:
    """(subject index, variant) per image, spread so any prefix mixes subjects and variants.

    Image i shows subject i % S in variant (i % S + i // S) % V: the first S * V images are each
    subject x variant pair exactly once, and with S >= V (the default 15 >= 7) the first V
    images already cover every variant.
    """
    return [(i % n_subjects, variants[(i % n_subjects + i // n_subjects) % len(variants)]) for i in range(n_images)]


def make_photos(
    out_dir: str | os.PathLike,
    n_variants: int = len(DEGRADATIONS),
    *,
    n_images: int | None = None,
    subjects: Sequence[str] | None = None,
    seed: int = 0,
    jpeg_quality: int = 90,
) -> list[Photo]:
    """Write photographs and degraded variants of them into ``out_dir``; return what was written.

    ``n_variants`` degradations per subject (0: originals only, up to ``len(DEGRADATIONS)``).
    ``n_images`` (default: every subject x variant pair once) truncates or extends the list; past
    the distinct pairs each image is a seeded random crop/flip of a pair, so all are distinct.
    The output is a function of the arguments only (seeded per image, not per call).
    """
    if not 0 <= n_variants <= len(DEGRADATIONS):
        raise ValueError(f"n_variants must be in [0, {len(DEGRADATIONS)}], got {n_variants}")
    chosen = [s for s in SUBJECTS if subjects is None or s[0] in subjects]
    unknown = set(subjects or ()) - {s[0] for s in SUBJECTS}
    if unknown or not chosen:
        raise ValueError(f"unknown subjects {sorted(unknown)}; known: {[s[0] for s in SUBJECTS]}")
    variants = ("original",) + DEGRADATIONS[:n_variants]
    distinct = len(chosen) * len(variants)
    n_images = distinct if n_images is None else n_images
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / NON_IMAGE_NAME).write_text("This is a text file, not an image.\n")

    sources: dict[int, Image.Image] = {}  # decoded once per subject
    photos = []
    for index, (subject_index, variant) in enumerate(_plan(len(chosen), variants, n_images)):
        subject, load, description = chosen[subject_index]
        if subject_index not in sources:
            sources[subject_index] = _as_rgb_or_gray(load())
        rng = np.random.default_rng([seed, index])
        image = sources[subject_index]
        jittered = index >= distinct
        if jittered:
            image = _jitter(image, rng)
        suffix, transform = VARIANTS[variant]
        if transform is not None:
            image = transform(image, rng)
        image_format = _FORMAT_CYCLE[index % len(_FORMAT_CYCLE)]
        path = out / f"{index:06d}_{subject}_{variant}.{image_format}"
        save_options = {"quality": jpeg_quality} if image_format in ("jpg", "webp") else {}
        image.save(path, format=_PIL_FORMAT[image_format], **save_options)
        caption = f"a photo of {description}{suffix}" + (", cropped" if jittered else "")
        photos.append(Photo(index, path, caption, subject, variant, jittered, image_format, *image.size))
    return photos


# Serving ---------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass


class _LocalServer(http.server.ThreadingHTTPServer):
    # img2dataset opens thread_count connections at once; the default backlog of 5 makes the
    # kernel drop SYNs, and a dropped SYN costs a 1 s retransmit per image.
    request_queue_size = 256
    daemon_threads = True


@contextlib.contextmanager
def serve_directory(path: str | os.PathLike) -> Iterator[str]:
    """Serve ``path`` over HTTP on 127.0.0.1 (a free port) while the block runs; yield the base URL."""
    handler = functools.partial(_QuietHandler, directory=os.fspath(path))
    server = _LocalServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="sample-data-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# URL list --------------------------------------------------------------------------------------

MISSING_SUBJECT = "missing"  # subject column of the URLs that 404
NON_IMAGE_SUBJECT = "not_an_image"  # subject column of the URL whose body is text


def write_url_list(
    photos: Sequence[Photo],
    base_url: str,
    path: str | os.PathLike,
    extra_broken: int = 3,
    *,
    non_image: bool = True,
) -> Path:
    """Write a Parquet URL list (url, caption, subject, variant) for img2dataset.

    URLs are ``base_url/<file name>``, so ``base_url`` must serve the photos' directory. Adds
    ``extra_broken`` URLs that 404 and, with ``non_image``, one that returns a text body (the
    file make_photos leaves beside the photos). The broken ones are spread evenly through the list,
    so they land in different shards.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    base_url = base_url.rstrip("/")
    rows = [
        {"url": f"{base_url}/{photo.path.name}", "caption": photo.caption,
         "subject": photo.subject, "variant": photo.variant}
        for photo in photos
    ]
    broken = [
        {"url": f"{base_url}/missing/{number:04d}.jpg", "caption": "a photo that is no longer there",
         "subject": MISSING_SUBJECT, "variant": "http_404"}
        for number in range(extra_broken)
    ]
    if non_image:
        broken.append({"url": f"{base_url}/{NON_IMAGE_NAME}", "caption": "a text file posing as a photo",
                       "subject": NON_IMAGE_SUBJECT, "variant": "text_body"})
    total = len(rows) + len(broken)
    for number, row in enumerate(broken):
        rows.insert(min(len(rows), int((number + 0.5) * total / len(broken))), row)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ("url", "caption", "subject", "variant")
    table = pa.table({name: pa.array([row[name] for row in rows], pa.string()) for name in columns})
    pq.write_table(table, path)
    return path


# img2dataset -----------------------------------------------------------------------------------

# Set before img2dataset is imported, here and in every process it spawns (they inherit os.environ):
# albumentations asks PyPI for its latest version at import (2 s timeout each process when offline),
# and urllib would send 127.0.0.1 through an HTTP proxy if one is configured.
_OFFLINE_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
_LOCAL_HOSTS = "127.0.0.1,localhost"


@contextlib.contextmanager
def _offline_environment() -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(_OFFLINE_ENV)
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), _LOCAL_HOSTS]))
    try:
        yield
    finally:
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        os.environ.update(saved)


@contextlib.contextmanager
def _captured_output(enabled: bool) -> Iterator[io.StringIO]:
    """Send fds 1 and 2 (ours and the spawned workers') to a file; hand back what was said.

    img2dataset prints progress bars and per-shard speed lines from its worker and logger
    processes, so redirecting sys.stdout would not be enough.
    """
    said = io.StringIO()
    if not enabled:
        yield said
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield said
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            sink.seek(0)
            said.write(sink.read().decode("utf-8", errors="replace"))


def upload_directory(
    local_dir: str | os.PathLike, uri: str, storage_options: dict | None = None
) -> list[str]:
    """Copy every file under ``local_dir`` to ``uri`` (any fsspec URI), keeping relative paths.

    Returns the URIs written, sorted. One put per file: fsspec's recursive ``put`` nests or
    flattens depending on trailing slashes and whether the target exists, which is not worth it.
    """
    import fsspec

    fs, base = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    base = base.rstrip("/")
    local_root = Path(local_dir)
    written = []
    for file in sorted(p for p in local_root.rglob("*") if p.is_file()):
        relative = file.relative_to(local_root).as_posix()
        fs.put_file(os.fspath(file), f"{base}/{relative}")
        written.append(f"{uri.rstrip('/')}/{relative}")
    return written


def _download_in_process(
    url_list: str, output_folder: str, *, additional_columns: list[str] | None, number_sample_per_shard: int,
    image_size: int, resize_mode: str, resize_only_if_bigger: bool, thread_count: int, timeout: int,
) -> None:
    """img2dataset's ``download()`` minus its process pool and logger process.

    Same Reader, Resizer, Downloader and WebDatasetSampleWriter, so the same tars, sidecars and
    stats; the pool and the logger are spawned processes that each import img2dataset (torch,
    cv2, albumentations, wandb: seconds apiece), which is most of the cost of a small build.
    """
    import fsspec
    from img2dataset.downloader import Downloader
    from img2dataset.main import arguments_validator
    from img2dataset.reader import Reader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    # download() checks this first: an additional column named key/status/... would shadow its own.
    arguments_validator({"compute_hash": "sha256", "verify_hash": None, "save_additional_columns": additional_columns})
    fs, output_path = fsspec.core.url_to_fs(output_folder)
    tmp_path = output_folder + "/_tmp"
    fs.makedirs(output_path + "/_tmp", exist_ok=True)
    reader = Reader(url_list, "parquet", "url", "caption", None, None, additional_columns,
                    number_sample_per_shard, set(), tmp_path, 0)
    resizer = Resizer(image_size=image_size, resize_mode=resize_mode, resize_only_if_bigger=resize_only_if_bigger,
                      encode_format="jpg")
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=thread_count, save_caption=True,
        extract_exif=True, output_folder=output_folder, column_list=reader.column_list, timeout=timeout,
        number_sample_per_shard=number_sample_per_shard, oom_shard_count=5, compute_hash="sha256",
        verify_hash_type=None, encode_format="jpg", retries=0, user_agent_token=None,
        disallowed_header_directives=None,
    )
    failed = [shard for ok, shard in map(downloader, reader) if not ok]
    failed = [shard for ok, shard in map(downloader, failed) if not ok]  # download()'s max_shard_retry=1
    if fs.exists(output_path + "/_tmp"):
        fs.rm(output_path + "/_tmp", recursive=True)
    if failed:
        raise RuntimeError(f"img2dataset failed on shards {[shard_id for shard_id, _ in failed]}")


def build_shards(
    url_list: str | os.PathLike,
    output_dir: str,
    *,
    number_sample_per_shard: int = 10,
    image_size: int = 256,
    resize_mode: str = "keep_ratio",
    resize_only_if_bigger: bool = True,
    processes_count: int = 1,
    thread_count: int = 16,
    timeout: int = 10,
    in_process: bool = True,
    storage_options: dict | None = None,
    quiet: bool = True,
) -> list[str]:
    """Run img2dataset on a Parquet URL list (url, caption; other columns are saved as metadata).

    Writes ``NNNNN.tar``, ``NNNNN.parquet`` and ``NNNNN_stats.json`` into ``output_dir``, which
    must be empty or absent, and returns the tar paths (URIs for remote ones) in shard order.
    ``output_dir`` may be any fsspec URI: img2dataset writes to s3:// itself when credentials and
    endpoint come from the environment (AWS_ENDPOINT_URL works with s3fs). It accepts no
    storage options, so with ``storage_options`` the shards are built locally and uploaded.

    Defaults follow LAION-5B's img2dataset run: keep_ratio resize of the short side to
    ``image_size``, never upscaling (tiny images stay tiny), JPEG re-encode at quality 95.
    ``in_process=True`` runs img2dataset's own reader, downloader and writer in this process;
    ``False`` calls ``img2dataset.download`` as production does, with ``processes_count`` spawned
    workers and a logger process, each of which first imports img2dataset (seconds each, more when
    they import at once). Spawned workers re-import the caller's ``__main__``: a script calling
    this with ``in_process=False`` needs an ``if __name__ == "__main__":`` guard.
    """
    import fsspec
    import pyarrow.parquet as pq

    url_list = os.fspath(url_list)
    url_list = local_path(url_list) if is_local(url_list) else url_list
    output_dir = local_path(output_dir) if is_local(output_dir) else output_dir.rstrip("/")
    fs, output_path = fsspec.core.url_to_fs(output_dir, **(storage_options or {}))
    if fs.exists(output_path) and fs.ls(output_path):
        raise FileExistsError(f"{output_dir} is not empty; img2dataset would skip the shards it finds there")

    if storage_options and not is_local(output_dir):
        with tempfile.TemporaryDirectory(prefix="img2dataset-") as local_dir:
            local_tars = build_shards(
                url_list, local_dir, number_sample_per_shard=number_sample_per_shard, image_size=image_size,
                resize_mode=resize_mode, resize_only_if_bigger=resize_only_if_bigger,
                processes_count=processes_count, thread_count=thread_count, timeout=timeout,
                in_process=in_process, quiet=quiet,
            )
            upload_directory(local_dir, output_dir, storage_options)
        return [f"{output_dir}/{os.path.basename(tar)}" for tar in local_tars]

    with fsspec.open(url_list, "rb") as handle:
        listed_columns = pq.read_schema(handle).names
    if "url" not in listed_columns or "caption" not in listed_columns:
        raise ValueError(f"{url_list} needs columns url and caption, has {listed_columns}")
    additional_columns = [c for c in listed_columns if c not in ("url", "caption")] or None

    said = io.StringIO()
    try:
        with _offline_environment(), _captured_output(quiet) as said:
            if in_process:
                _download_in_process(
                    url_list, output_dir, additional_columns=additional_columns,
                    number_sample_per_shard=number_sample_per_shard, image_size=image_size,
                    resize_mode=resize_mode, resize_only_if_bigger=resize_only_if_bigger,
                    thread_count=thread_count, timeout=timeout,
                )
            else:
                from img2dataset import download

                download(
                    url_list=url_list, output_folder=output_dir, input_format="parquet", url_col="url",
                    caption_col="caption", save_additional_columns=additional_columns,
                    output_format="webdataset", encode_format="jpg", image_size=image_size,
                    resize_mode=resize_mode, resize_only_if_bigger=resize_only_if_bigger,
                    number_sample_per_shard=number_sample_per_shard, processes_count=processes_count,
                    thread_count=thread_count, timeout=timeout, enable_wandb=False,
                    # [] turns the X-Robots-Tag check off (None would mean its default list): the
                    # sample server sends none, but a caller may point this at one that does.
                    disallowed_header_directives=[],
                )
    except Exception as error:
        error.add_note(f"img2dataset said:\n{_tail(said)}")  # filled in once the capture has ended
        raise

    fs.invalidate_cache()
    tars = sorted(fs.glob(output_path + "/*.tar"))
    if not tars:
        raise RuntimeError(f"img2dataset wrote no shard into {output_dir}; it said:\n{_tail(said)}")
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return [tar if protocol in ("file", "local") else f"{protocol}://{tar}" for tar in tars]


def _tail(said: io.StringIO, characters: int = 4000) -> str:
    return said.getvalue()[-characters:] or "(nothing)"


# End to end ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SampleDataset:
    """What build_sample_dataset wrote, and what a reader of the shards should find in them."""

    root: Path  # holds photos/, urls.parquet and shards/
    shards_dir: str  # local path or URI
    tar_paths: list[str]
    sidecar_paths: list[str]  # NNNNN.parquet beside each tar
    stats_paths: list[str]  # NNNNN_stats.json beside each tar
    url_list: Path
    photos: list[Photo]
    keys_by_status: dict[str, list[str]]  # img2dataset status -> sorted keys, from the sidecars
    keys_by_shard: dict[str, list[str]]  # tar path -> sorted keys of its sidecar (failures included)
    sidecar_rows: dict[str, dict]  # key -> its sidecar row, every column
    photo_by_key: dict[str, Photo]  # the photo behind each key that is not a broken URL
    build_seconds: float

    @property
    def expected_keys(self) -> list[str]:
        """Keys with an image in a tar."""
        return self.keys_by_status.get("success", [])

    @property
    def failed_keys(self) -> list[str]:
        """Keys img2dataset tried and gave up on (sidecar row, no tar member)."""
        return sorted(k for status, keys in self.keys_by_status.items() if status != "success" for k in keys)

    @property
    def n_failed(self) -> int:
        return len(self.failed_keys)

    @property
    def all_keys(self) -> list[str]:
        return sorted(k for keys in self.keys_by_status.values() for k in keys)

    @property
    def caption_by_key(self) -> dict[str, str]:
        return {key: row["caption"] for key, row in self.sidecar_rows.items()}

    @property
    def subject_variant_by_key(self) -> dict[str, tuple[str, str]]:
        """(subject, variant) per key; broken URLs read ("missing", "http_404") / ("not_an_image", "text_body")."""
        return {key: (row["subject"], row["variant"]) for key, row in self.sidecar_rows.items()}


_IMG2DATASET_FILE = re.compile(r"^\d+(\.tar|\.parquet|_stats\.json)$")


def _remove_img2dataset_files(folder: str, storage_options: dict | None) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(folder, **(storage_options or {}))
    if not fs.exists(path):
        return
    stale = [entry for entry in fs.ls(path, detail=False) if _IMG2DATASET_FILE.match(entry.rstrip("/").rsplit("/", 1)[-1])]
    if fs.exists(path + "/_tmp"):
        stale.append(path + "/_tmp")
    if stale:
        fs.rm(stale, recursive=True)
    fs.invalidate_cache()


def build_sample_dataset(
    out_dir: str | os.PathLike,
    n_images: int | None = None,
    images_per_shard: int = 10,
    image_size: int = 256,
    *,
    n_variants: int = len(DEGRADATIONS),
    broken_urls: int = 3,
    non_image: bool = True,
    shards_dir: str | None = None,
    seed: int = 0,
    thread_count: int = 16,
    in_process: bool = True,
    processes_count: int = 1,
    storage_options: dict | None = None,
    overwrite: bool = True,
    resize_only_if_bigger: bool = True,
) -> SampleDataset:
    """Photos -> HTTP on 127.0.0.1 -> URL list -> img2dataset -> shards, all under ``out_dir``.

    ``n_images`` photos (default: each bundled subject x variant pair once, 105 images) plus
    ``broken_urls`` 404s and, with ``non_image``, one text body. Shards go to ``out_dir/shards``
    unless ``shards_dir`` names another place (e.g. s3://bucket/prefix, reached with
    ``storage_options`` or the environment's AWS_* settings). Checks that every photo
    came through and every broken URL failed, so a test never runs on a half-built sample.
    ``overwrite`` first removes what an earlier build left (photos/, urls.parquet, and the
    img2dataset files in the shards folder, nothing else), so ``make demo`` can run twice.
    ``resize_only_if_bigger=False`` has img2dataset upscale small photos too, so every image's
    shortest side is ``image_size`` (benchmarks that want one size).
    """
    import fsspec
    import pyarrow.parquet as pq

    started = time.perf_counter()
    root = Path(out_dir).absolute()
    shards_dir = shards_dir or str(root / "shards")
    if overwrite:
        shutil.rmtree(root / "photos", ignore_errors=True)
        _remove_img2dataset_files(shards_dir, storage_options)
    photos = make_photos(root / "photos", n_variants, n_images=n_images, seed=seed)
    url_list = root / "urls.parquet"
    with serve_directory(root / "photos") as base_url:
        write_url_list(photos, base_url, url_list, broken_urls, non_image=non_image)
        tar_paths = build_shards(
            url_list, shards_dir, number_sample_per_shard=images_per_shard, image_size=image_size,
            resize_only_if_bigger=resize_only_if_bigger, thread_count=thread_count, in_process=in_process,
            processes_count=processes_count, storage_options=storage_options,
        )
    # The server's port is gone now: nothing downstream may depend on the URLs being live.

    sidecar_paths = [tar[: -len(".tar")] + ".parquet" for tar in tar_paths]
    stats_paths = [tar[: -len(".tar")] + "_stats.json" for tar in tar_paths]
    photo_by_name = {photo.path.name: photo for photo in photos}
    keys_by_status: dict[str, list[str]] = {}
    keys_by_shard: dict[str, list[str]] = {}
    sidecar_rows: dict[str, dict] = {}
    for tar, sidecar in zip(tar_paths, sidecar_paths):
        with fsspec.open(sidecar, "rb", **(storage_options or {})) as handle:
            rows = pq.read_table(handle).to_pylist()
        keys_by_shard[tar] = sorted(row["key"] for row in rows)
        for row in rows:
            keys_by_status.setdefault(row["status"], []).append(row["key"])
            sidecar_rows[row["key"]] = row
    keys_by_status = {status: sorted(keys) for status, keys in sorted(keys_by_status.items())}
    photo_by_key = {
        key: photo_by_name[name]
        for key, row in sidecar_rows.items()
        if (name := row["url"].rsplit("/", 1)[-1]) in photo_by_name
    }

    dataset = SampleDataset(
        root=root, shards_dir=shards_dir, tar_paths=tar_paths, sidecar_paths=sidecar_paths,
        stats_paths=stats_paths, url_list=url_list, photos=photos, keys_by_status=keys_by_status,
        keys_by_shard=keys_by_shard, sidecar_rows=sidecar_rows, photo_by_key=photo_by_key,
        build_seconds=time.perf_counter() - started,
    )
    expected_failures = broken_urls + (1 if non_image else 0)
    if len(dataset.expected_keys) != len(photos) or dataset.n_failed != expected_failures:
        raise RuntimeError(
            f"img2dataset fetched {len(dataset.expected_keys)} of {len(photos)} photos and failed "
            f"{dataset.n_failed} URLs (expected {expected_failures}); statuses: "
            f"{ {status: len(keys) for status, keys in keys_by_status.items()} }; see {stats_paths[:1]}"
        )
    return dataset


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.sample_data",
        description="Build WebDataset shards with img2dataset from photographs served on 127.0.0.1.",
    )
    parser.add_argument("out_dir", help="directory for photos/, urls.parquet and shards/")
    parser.add_argument("--images", type=int, default=None, help="number of photos (default: 105 distinct)")
    parser.add_argument("--per-shard", type=int, default=10, help="samples per shard, broken URLs included")
    parser.add_argument("--image-size", type=int, default=256, help="img2dataset image_size (short side)")
    parser.add_argument("--broken", type=int, default=3, help="URLs that 404")
    parser.add_argument("--shards-dir", default=None, help="where the shards go (default OUT_DIR/shards; s3:// ok)")
    parser.add_argument("--processes", type=int, default=0,
                        help="img2dataset worker processes; 0 runs its machinery in this process (fast)")
    args = parser.parse_args(argv)
    dataset = build_sample_dataset(
        args.out_dir, args.images, args.per_shard, args.image_size, broken_urls=args.broken,
        shards_dir=args.shards_dir, in_process=args.processes == 0, processes_count=max(1, args.processes),
    )
    summary = {
        "shards_dir": dataset.shards_dir,
        "shards": len(dataset.tar_paths),
        "photos": len(dataset.photos),
        "statuses": {status: len(keys) for status, keys in dataset.keys_by_status.items()},
        "seconds": round(dataset.build_seconds, 2),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
