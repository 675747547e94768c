"""Everything a scoring run checks on the driver before it writes a byte or starts Ray.

In order: the object-store endpoints answer, the output is a place we may write and is not tangled
with the input, the input lists work items of its format (auto: the one format that fits), every weights file is found, is the pinned one and loads, and
the device and precision the embed actors will run with are fixed. What comes out is the job's config
with every weights file pinned by sha256 and the model's device and precision as they will run, so the
actors load exactly the files checked here and the records record what ran.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pipeline.config import KNOWN_HEADS, HeadSpec, ModelConfig, ScoreConfig, WeightsSpec
from pipeline.errors import InputError, OutputError, WeightsError
from pipeline.exclusions import Exclusions, load_exclusions
from pipeline.io.listing import InputListing, list_input_entries
from pipeline.io.storage import check_reachable, filesystem, full_uri, protocol_of
from pipeline.io.units import refuse_earlier_layout
from pipeline.sources import WorkItem, list_input

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class PreparedRun:
    """A config that passed every check, and the work items its input lists."""

    config: ScoreConfig  # weights pinned by sha256; model.device and model.precision as the actors run them
    requested_precision: str
    shards: Sequence[WorkItem]  # img2dataset shards, image files, ...: whatever config.source.format reads
    exclusions: Exclusions | None = None  # the --exclude-hashes list, loaded (its sha256 pinned in config)
    listing: InputListing | None = None  # how the input was listed; a run keeps it for the next one


def prepare_run(config: ScoreConfig, check_clip_weights: bool = True) -> PreparedRun:
    """Check ``config`` against the world and pin it; raises a :class:`pipeline.errors.UserError`.

    ``check_clip_weights=False`` leaves the CLIP weights alone, for a caller that loads the model itself."""
    for uri in (*config.input, config.output):
        check_reachable(uri, config.storage_options)
    check_output_location(config.output, config.input, config.storage_options)
    listing = list_input_entries(config.input, config.storage_options, config.output, config.listing)
    source, items = list_input(config.input, config.storage_options, config.source, listing.listing)
    listing.format = source.name
    config = config.replace(source=config.source.resolved(source.name))
    model = pin_model(config, check_clip_weights)
    heads = pin_heads(config, model)
    exclusions = None
    if config.exclude_hashes:
        exclusions = load_exclusions(config.exclude_hashes, config.storage_options)
        if config.exclude_hashes_sha256 not in (None, exclusions.sha256):
            raise InputError(f"--exclude-hashes {config.exclude_hashes} has sha256 {exclusions.sha256}, not the "
                             f"pinned {config.exclude_hashes_sha256}")
        config = config.replace(exclude_hashes_sha256=exclusions.sha256)
    return PreparedRun(config.replace(model=model, heads=heads), config.model.precision, items, exclusions, listing)


# The output --------------------------------------------------------------------------------------


def _tree_root(uri: str, storage_options: Mapping[str, Any]) -> str:
    """``uri`` as a canonical absolute URI, cut before any glob character (a glob's folder)."""
    fs, path = filesystem(uri, storage_options)
    cut = min((path.index(c) for c in _GLOB_CHARS if c in path), default=None)
    if cut is not None:
        path = posixpath.dirname(path[:cut])
    if protocol_of(fs) in ("file", "local"):
        return "file://" + os.path.realpath(path)
    return full_uri(fs, path.rstrip("/")).replace("s3a://", "s3://")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_output_location(output: str, inputs: Sequence[str], storage_options: Mapping[str, Any]) -> None:
    """The output must be a folder (or a prefix) we may write, apart from every input."""
    fs, root = filesystem(output, storage_options)
    if fs.isfile(root):
        raise OutputError(f"--output {output} is an existing file; give a folder or prefix to hold the scores")
    out_root = _tree_root(output, storage_options)
    for uri in inputs:
        in_root = _tree_root(uri, storage_options)
        if _inside(out_root, in_root) or _inside(in_root, out_root):
            raise OutputError(f"--output {output} and --input {uri} overlap: the next listing of the input would "
                              f"see the output's files; put the output outside the input")
    refuse_earlier_layout(output, storage_options)
    if protocol_of(fs) in ("file", "local"):
        _check_local_writable(root)


def _check_local_writable(root: str) -> None:
    path = os.path.abspath(root)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise OutputError(f"cannot create the output {root}: {path} is a file, not a folder")
    # access() sees permission bits, read-only mounts and immutable folders, for root too.
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the output under {path}: permission denied (or a read-only or immutable "
                          f"folder); choose another --output or fix its permissions")


# The weights -------------------------------------------------------------------------------------


def embed_device(config: ScoreConfig) -> str:
    """'cuda' or 'cpu': where the embed actors will run, decided once, here."""
    gpus = config.resources.gpus_per_actor
    if config.model.device != "auto":
        return config.model.device
    if gpus is not None:
        return "cuda" if gpus > 0 else "cpu"
    if os.environ.get("RAY_ADDRESS"):
        import ray

        from pipeline.ray_session import ensure_ray

        ensure_ray()
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _weights_failure(what: str, error: BaseException) -> WeightsError:
    if isinstance(error, WeightsError):
        return error
    return WeightsError(f"{what} cannot be loaded: {type(error).__name__}: {error}")


def pin_model(config: ScoreConfig, check_weights: bool = True) -> ModelConfig:
    """The CLIP weights found, hash-checked and load-checked; the device and precision the actors will use."""
    from pipeline.models.clip import resolve_precision, verified_clip_weights

    model = config.model
    device = embed_device(config)
    precision = resolve_precision(model.precision, device)
    if precision != model.precision:
        log.warning("precision %s was asked for, but the embed actors run on %s, where it runs as %s: "
                    "running and recording %s", model.precision, device, precision, precision)
    sha256 = model.pretrained_sha256
    if check_weights and not model.is_tiny_random:
        try:
            sha256 = verified_clip_weights(model, config.weights_dirs, config.storage_options)
        except Exception as error:  # noqa: BLE001 - any failure here means: these weights will not load
            raise _weights_failure(f"CLIP weights {model.pretrained!r} for {model.name}", error) from error
    return dataclasses.replace(model, device=device, precision=precision, pretrained_sha256=sha256)


def pin_heads(config: ScoreConfig, model: ModelConfig) -> tuple[HeadSpec, ...]:
    """Every head found, hash-checked, loaded and fitted to the model's embedding width."""
    from pipeline.models.clip import embedding_width
    from pipeline.models.heads import load_head_bank
    from pipeline.models.weights import WeightsNotFound

    try:
        bank = load_head_bank(config.heads, config.weights_dirs, config.storage_options)
        bank.check_embedding_dim(embedding_width(model), model.name)
    except WeightsNotFound as error:
        unknown = [h.name for h in config.heads if _bare_name(h.weights.uri)]
        if unknown:
            raise WeightsError(f"head {unknown[0]!r} is neither a known head ({', '.join(sorted(KNOWN_HEADS))}) nor a "
                               f"file found here or in any --weights-dir; give a known name or a path or URI of "
                               f"a head file") from error
        raise
    except Exception as error:  # noqa: BLE001 - any failure here means: these heads will not load
        raise _weights_failure("a head", error) from error
    return tuple(HeadSpec(spec.name, WeightsSpec(spec.weights.uri, head.sha256))
                 for spec, head in zip(config.heads, bank.heads))


def _bare_name(uri: str) -> bool:
    """A head given as a plain word, which can only have meant a known head's name."""
    return "/" not in uri and "." not in uri and not os.path.exists(uri)

