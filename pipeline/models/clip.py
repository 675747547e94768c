"""Load the open_clip model whose image embeddings the heads score, and say exactly which weights it has.

``ModelConfig.pretrained`` is either

- an open_clip tag (``"openai"``): open_clip fetches the file from the model hub; where no hub is reachable
  this fails with :class:`WeightsNotFound` saying which file to provide instead, or
- a path / fsspec URI / URL of a state dict (.safetensors, .bin, .pt), resolved and sha256-checked by
  :mod:`pipeline.models.weights` and loaded by open_clip with ``weights_only=True``.

Nothing here falls back to other weights. Random weights come only from the ``tiny-random`` model (tests,
machines without weights; its identity says so) and from :func:`build_random_init_clip_for_benchmark`.

open_clip is imported inside the functions that use it: importing it takes seconds (torchvision and more),
and the Ray driver, which only wires the stage that calls this module, never needs it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import pathlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from pipeline.long_lived import long_lived

with long_lived():  # the driver's first import of torch
    import torch

from pipeline.config import TINY_ARCH, TINY_MODEL, ModelConfig, WeightsSpec
from pipeline.errors import WeightsError
from pipeline.models.weights import WeightsNotFound, file_name_of, resolve_weights, sha256_of

log = logging.getLogger(__name__)

TINY_MODEL_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "data" / f"{TINY_MODEL}.json"
_WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True, eq=False)
class LoadedClip:
    """An open_clip model in eval mode plus what its callers need to feed it."""

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    image_size: int  # square input side, pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # the resize filter the weights were trained with (decode should match it)
    resize_mode: str
    embed_dim: int
    identity: str  # "<arch>/<tag or file name>@<sha256[:12]>", or a random-weights label
    device: torch.device
    precision: str  # the precision actually used (fp16 asked on CPU runs as fp32)
    input_dtype: torch.dtype  # what encode_image expects its pixels in
    autocast_dtype: torch.dtype | None = None  # amp_bf16: fp32 weights, run under autocast to this


def tiny_identity(seed: int) -> str:
    return f"{TINY_MODEL}(seed={seed})"


def _weights_identity(name: str, label: str, sha256: str) -> str:
    return f"{name}/{label}@{sha256[:12]}"


def pinned_clip_identity(config: ModelConfig) -> str | None:
    """The identity :func:`load_clip` will report, when the config alone fixes it (tiny-random, or pinned
    weights); None when only the fetched file can tell (an open_clip tag without a pinned sha256)."""
    if config.is_tiny_random:
        return tiny_identity(config.seed)
    if not config.pretrained_sha256:
        return None
    pretrained = config.pretrained
    label = file_name_of(pretrained) if _looks_like_weights_location(pretrained) else pretrained
    return _weights_identity(config.name, label, config.pretrained_sha256)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None: CUDA when torch sees one, else CPU. An explicit CUDA request without CUDA is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} was asked for but torch sees no CUDA device; use 'auto' or 'cpu'")
    return device


def resolve_precision(requested: str, device: str | torch.device) -> str:
    """The precision a model asked to run in ``requested`` runs in on ``device``."""
    # fp16 matmuls on CPU are slow or unsupported; bf16 on CPU is honoured when asked for explicitly.
    if torch.device(device).type == "cpu" and requested == "fp16":
        return "fp32"
    return requested


@functools.cache
def _open_clip() -> Any:
    with long_lived():
        import open_clip
    return open_clip


def _register_tiny_model() -> None:
    open_clip = _open_clip()

    for name in (TINY_MODEL, TINY_ARCH):
        if name not in open_clip.list_models():
            open_clip.add_model_config(TINY_MODEL_CONFIG.with_name(f"{name}.json"))


def _model_config(name: str) -> dict[str, Any]:
    open_clip = _open_clip()

    if name in (TINY_MODEL, TINY_ARCH):
        _register_tiny_model()
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"unknown open_clip model {name!r} (open_clip.list_models() lists the known ones)")
    return config


def _create(name: str, checkpoint: str | None, precision: str, device: torch.device,
            preprocess_overrides: Mapping[str, Any] | None = None) -> torch.nn.Module:
    open_clip = _open_clip()

    model = open_clip.create_model(
        name,
        pretrained=checkpoint,
        precision=precision,
        device=device,
        require_pretrained=checkpoint is not None,
        weights_only=True,
        force_preprocess_cfg=dict(preprocess_overrides or {}),
    )
    return model.eval().requires_grad_(False)


def _loaded(name: str, model: torch.nn.Module, identity: str, device: torch.device, precision: str) -> LoadedClip:
    open_clip = _open_clip()
    from open_clip.model import get_input_dtype

    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = preprocess["size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height != width:
        raise ValueError(f"{name}: only square inputs are supported, model expects {height}x{width}")
    return LoadedClip(
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        image_size=int(height),
        mean=tuple(float(v) for v in preprocess["mean"]),
        std=tuple(float(v) for v in preprocess["std"]),
        interpolation=str(preprocess.get("interpolation", "bicubic")),
        resize_mode=str(preprocess.get("resize_mode", "shortest")),
        embed_dim=int(_model_config(name)["embed_dim"]),
        identity=identity,
        device=device,
        precision=precision,
        input_dtype=get_input_dtype(precision) or torch.float32,
        autocast_dtype=torch.bfloat16 if precision == "amp_bf16" else None,
    )


def _random_clip(name: str, seed: int, precision: str, device: torch.device, identity: str) -> LoadedClip:
    _model_config(name)
    # Built on CPU under its own RNG state: the same seed gives the same weights on any device, and the
    # caller's random stream is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _create(name, None, precision, torch.device("cpu"))
    return _loaded(name, model.to(device), identity, device, precision)


def _hub_file_hint(tag_cfg: Mapping[str, Any]) -> str:
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo, file_name = hub.rstrip("/").rsplit("/", 1) if not hub.endswith("/") else (hub.rstrip("/"), "")
        file_name = file_name or "open_clip_model.safetensors"
        return (f"the open_clip weights of {repo} "
                f"(https://huggingface.co/{repo}/resolve/main/{file_name})")
    return f"the file at {tag_cfg.get('url')}"


def _download_open_clip_tag(name: str, tag: str, tag_cfg: Mapping[str, Any]) -> pathlib.Path:
    """open_clip's own hub download; every failure becomes WeightsNotFound with the way out."""
    from open_clip.pretrained import download_pretrained

    howto = (
        f"open_clip could not fetch pretrained={tag!r} for {name} (no model hub reachable?). Give the weights "
        f"as a file instead: fetch {_hub_file_hint(tag_cfg)} where there is internet, put it on the nodes' disk "
        f"or in object storage, and pass its path or URI as the pretrained weights "
        f"(e.g. pretrained='s3://my-bucket/weights/open_clip_model.safetensors' with its sha256 to pin it); "
        f"a bare file name is also looked up in each --weights-dir.")
    try:
        path = download_pretrained(dict(tag_cfg))
    except Exception as error:
        raise WeightsNotFound(f"{howto}\nCause: {type(error).__name__}: {error}") from error
    if not path:
        raise WeightsNotFound(howto)
    return pathlib.Path(path)


def _looks_like_weights_location(pretrained: str) -> bool:
    return "://" in pretrained or "/" in pretrained or pretrained.endswith(_WEIGHTS_SUFFIXES)


def _checkpoint(config: ModelConfig, search_dirs: Sequence[str], storage_options: Mapping[str, Any] | None,
                cache_dir: str | None) -> tuple[pathlib.Path, dict[str, Any], str]:
    """(a local, sha256-checked weights file, open_clip preprocess overrides, the weights' label)."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    name, pretrained = config.name, config.pretrained
    _model_config(name)
    tag_cfg = get_pretrained_cfg(name, pretrained) if pretrained else {}
    if tag_cfg:
        path = _download_open_clip_tag(name, pretrained, tag_cfg)
        if config.pretrained_sha256 is not None:
            resolve_weights(WeightsSpec(str(path), config.pretrained_sha256))  # raises on a digest mismatch
        if bool(tag_cfg.get("quick_gelu", False)) != bool(_model_config(name).get("quick_gelu", False)):
            warnings.warn(f"{name} with pretrained={pretrained!r}: the weights were trained with a different GELU "
                          f"than this architecture uses; embeddings will drift (use the -quickgelu variant)")
        preprocess = {key: tag_cfg[key] for key in ("mean", "std", "interpolation", "resize_mode") if key in tag_cfg}
        return path, preprocess, pretrained
    if pretrained and _looks_like_weights_location(pretrained):
        path = resolve_weights(WeightsSpec(pretrained, config.pretrained_sha256), search_dirs, cache_dir,
                               storage_options)
        return path, {}, file_name_of(pretrained)
    known = list_pretrained_tags_by_model(name)
    raise ValueError(
        f"pretrained={pretrained!r} for {name} is neither an open_clip tag (known: {known}) nor a path or URI "
        "of a weights file (.safetensors, .bin, .pt)")


def _meta_state_dict(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """The tensors a safetensors file holds, as shapes only: its header is all that is read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in handle.keys()}


def check_loads(name: str, path: pathlib.Path) -> None:
    """Load ``path`` into ``name``'s architecture the way open_clip does, on the meta device: every key and
    shape is checked, no tensor data is read (a torch file is mapped, a safetensors file's header read)."""
    from unittest import mock

    from open_clip import factory

    if path.suffix not in _WEIGHTS_SUFFIXES:
        return  # other formats (big_vision .npz) load through paths that need real tensors
    with _no_random_init_warning():
        model = _open_clip().create_model(name, device="meta")
    try:
        if path.suffix == ".safetensors":
            # open_clip's safetensors reader cannot target the meta device; hand its key conversions the shapes.
            with mock.patch.object(factory, "load_state_dict", return_value=_meta_state_dict(path)):
                factory.load_checkpoint(model, str(path), device="meta")
        else:
            factory.load_checkpoint(model, str(path), device="meta")
    except Exception as error:  # noqa: BLE001 - a file that does not load fails in many ways
        detail = " ".join(str(error).split())[:300]
        raise WeightsError(f"CLIP weights {path} do not load into {name}: {type(error).__name__}: {detail}") from error


@contextlib.contextmanager
def _no_random_init_warning():
    """open_clip warns on the root logger that a model built without weights is random: here it is meant."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def verified_clip_weights(config: ModelConfig, search_dirs: Sequence[str] = (),
                          storage_options: Mapping[str, Any] | None = None, cache_dir: str | None = None) -> str:
    """Find the weights ``config`` names, check their pin and that they load into the architecture; their sha256."""
    path, _, _ = _checkpoint(config, search_dirs, storage_options, cache_dir)
    check_loads(config.name, path)
    return sha256_of(path)


def embedding_width(config: ModelConfig) -> int:
    """The width of the model's image embedding, from its config alone."""
    return int(_model_config(TINY_MODEL if config.is_tiny_random else config.name)["embed_dim"])


def load_clip(
    config: ModelConfig,
    device: str | torch.device | None = None,
    search_dirs: Sequence[str] = (),
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
) -> LoadedClip:
    """The model ``config`` names, on ``device`` (None: ``config.device``), in eval mode."""
    device = resolve_device(config.device if device is None else device)
    precision = resolve_precision(config.precision, device)
    if precision != config.precision:
        log.info("precision %s asked for on %s; using %s", config.precision, device, precision)

    if config.is_tiny_random:
        return _random_clip(TINY_MODEL, config.seed, precision, device, tiny_identity(config.seed))

    path, preprocess, label = _checkpoint(config, search_dirs, storage_options, cache_dir)
    model = _create(config.name, str(path), precision, device, preprocess)
    return _loaded(config.name, model, _weights_identity(config.name, label, sha256_of(path)), device, precision)


def build_random_init_clip_for_benchmark(config: ModelConfig, device: str | torch.device | None = None) -> LoadedClip:
    """The architecture ``config.name`` with seeded random weights, for throughput benchmarks only.

    Its embeddings mean nothing; the scoring job never calls this (it uses :func:`load_clip`).
    """
    device = resolve_device(config.device if device is None else device)
    precision = resolve_precision(config.precision, device)
    return _random_clip(config.name, config.seed, precision, device,
                        f"{config.name}/random-init(seed={config.seed})")


def image_geometry(config: ModelConfig) -> tuple[int, str]:
    """The square input side and resize filter the model expects, from its config alone (no weights),
    so the driver can configure the decode stage without loading the model."""
    from open_clip.pretrained import get_pretrained_cfg

    name = TINY_MODEL if config.is_tiny_random else config.name
    size = _model_config(name)["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    tag_cfg = get_pretrained_cfg(name, config.pretrained) if config.pretrained and not config.is_tiny_random else {}
    return int(size), str(tag_cfg.get("interpolation", "bicubic"))
