"""Typed job configuration, validated once, at the edge.

Everything below is a frozen dataclass whose ``__post_init__`` rejects bad values with a message
that names the field, so nothing past the CLI needs to re-check its inputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from pipeline.errors import UsageError

PRECISIONS = ("fp32", "fp16", "bf16", "amp_bf16")  # amp_bf16: fp32 weights, bf16 autocast
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(UsageError):
    """A configuration value is invalid; the message says which and why."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class WeightsSpec:
    """One weights file: where to get it and the sha256 it must have.

    ``uri`` is a local path, an fsspec URI (s3://, gs://, file://) or an http(s) URL.
    """

    uri: str
    sha256: str | None = None

    def __post_init__(self) -> None:
        _require(bool(self.uri), "weights uri must not be empty")
        if self.sha256 is not None:
            _require(
                len(self.sha256) == 64 and all(c in "0123456789abcdef" for c in self.sha256),
                f"sha256 for {self.uri!r} must be 64 lowercase hex digits, got {self.sha256!r}",
            )


@dataclass(frozen=True)
class HeadSpec:
    """An aesthetic head applied to the L2-normalised image embedding."""

    name: str
    weights: WeightsSpec

    def __post_init__(self) -> None:
        _require(bool(self.name) and self.name.replace("-", "").replace("_", "").replace("+", "").replace(".", "").isalnum(),
                 f"head name {self.name!r} must be letters, digits, '-', '_', '+' or '.'")


_V2_SOURCE = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
_V1_SOURCE = "https://github.com/LAION-AI/aesthetic-predictor/raw/main/"

# The heads we know by name, pinned to the sha256 of their published files.
KNOWN_HEADS: Mapping[str, HeadSpec] = {
    spec.name: spec
    for spec in (
        HeadSpec("sac+logos+ava1-l14-linearMSE", WeightsSpec(
            _V2_SOURCE + "sac%2Blogos%2Bava1-l14-linearMSE.pth",
            "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0")),
        HeadSpec("ava+logos-l14-linearMSE", WeightsSpec(
            _V2_SOURCE + "ava%2Blogos-l14-linearMSE.pth",
            "390a3aafaf3b37d57148f9b22f30556de38343064b7d915acfa80d3812b4c9ff")),
        HeadSpec("ava+logos-l14-reluMSE", WeightsSpec(
            _V2_SOURCE + "ava%2Blogos-l14-reluMSE.pth",
            "0af3254c651d55b7ea851429c20f26ec880bb0169805a4df85b814bd7966f3e4")),
        HeadSpec("sa_0_4_vit_l_14_linear", WeightsSpec(
            _V1_SOURCE + "sa_0_4_vit_l_14_linear.pth",
            "2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba")),
        HeadSpec("sa_0_4_vit_b_32_linear", WeightsSpec(
            _V1_SOURCE + "sa_0_4_vit_b_32_linear.pth",
            "c7b14cead230694acc7b9447974d3cad78003c72da032e402a303b6c2429e85f")),
        HeadSpec("sa_0_4_vit_b_16_linear", WeightsSpec(
            _V1_SOURCE + "sa_0_4_vit_b_16_linear.pth",
            "8ad3923d7ecf019df20ecd2ab5542a3075fbba0278d239c0371345f3d7fcbde0")),
    )
}
DEFAULT_HEAD = "sac+logos+ava1-l14-linearMSE"

# A random-weight stand-in for CLIP, for tests and for machines that reach no model hub.
TINY_MODEL = "tiny-random"
# The same tiny architecture under a name that takes a weights file (a fine-tuned tiny model, in tests).
TINY_ARCH = "tiny-arch"
DEFAULT_PRETRAINED = "openai"
# Data files under the target size that make a run compact the output: enough that a nightly run
# adding a few units does not rewrite the last partial file of every band each night.
DEFAULT_COMPACT_AT = 1000


@dataclass(frozen=True)
class ModelConfig:
    """The CLIP image tower.

    ``pretrained`` is an open_clip tag ("openai": fetched from the model hub when reachable) or a
    WeightsSpec URI of a state-dict file (.safetensors, .bin, .pt). ``name == "tiny-random"`` builds
    a tiny architecture with seeded random weights: its scores mean nothing and every record says so.
    """

    name: str = "ViT-L-14-quickgelu"
    pretrained: str = DEFAULT_PRETRAINED
    pretrained_sha256: str | None = None
    precision: str = "fp16"
    device: str = "auto"
    seed: int = 0
    # torch.compile the image tower. Off until a GPU run shows it pays (bench/gpu_check.py measures it);
    # it costs a compile per actor, and batches are padded to one shape so it compiles once.
    compile: bool = False
    channels_last: bool = False  # the patch-embedding convolution in NHWC memory order

    def __post_init__(self) -> None:
        _require(bool(self.name), "model name must not be empty")
        _require(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        _require(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        for flag in ("compile", "channels_last"):
            _require(isinstance(getattr(self, flag), bool), f"model.{flag} must be true or false")
        if self.is_tiny_random:
            _require(self.pretrained in ("", DEFAULT_PRETRAINED),
                     f"{TINY_MODEL} has seeded random weights; it takes no pretrained weights ({self.pretrained!r})")
            _require(self.pretrained_sha256 is None,
                     f"--pretrained-sha256 pins a weights file, but {TINY_MODEL} has seeded random weights and no file")
        if self.pretrained_sha256 is not None:
            WeightsSpec(self.pretrained, self.pretrained_sha256)  # validates the digest

    @property
    def is_tiny_random(self) -> bool:
        return self.name == TINY_MODEL


@dataclass(frozen=True)
class DecodeConfig:
    """CPU decode: bytes to a square uint8 image the model's preprocess would produce."""

    # libjpeg-turbo through simplejpeg, DCT-domain downscaling of large JPEGs, torch's SIMD resampling;
    # False: Pillow all the way (the reference's own code, several times slower)
    fast: bool = True
    max_pixels: int = 89_478_485  # Pillow's own bomb limit; larger images get status image_too_large
    apply_exif_orientation: bool = True
    batch_size: int = 256  # rows per decode task and block: one embed batch, fewer blocks for Ray to move
    quality_metrics: bool = False  # sharpness / exposure / contrast / colourfulness columns
    phash: bool = False  # the phash column (imagehash.phash of the decoded pixels; about a decode's cost again)

    def __post_init__(self) -> None:
        _require(self.max_pixels > 0, f"max_pixels must be positive, got {self.max_pixels}")
        _require(self.batch_size > 0, f"decode batch_size must be positive, got {self.batch_size}")


@dataclass(frozen=True)
class ResourcesConfig:
    """How the job asks Ray for resources.

    ``gpus_per_actor=None`` means: one GPU per embed actor when the cluster has GPUs, else CPU.
    """

    embed_batch_size: int = 256
    min_actors: int = 1
    max_actors: int = 1
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    # Batches an embed actor works on at once, in threads: while one waits on the device the next is
    # prepared on the host (Ray Data's batch conversion, the pinned copy), so the GPU does not idle between
    # batches. None: 2 on a GPU, 1 on CPU (where the model itself needs the cores).
    concurrent_batches_per_actor: int | None = None
    memory_per_actor_gb: float = 2.0  # host memory an embed actor holds (ViT-L/14 weights are 1.7 GB in fp32)
    decode_cpus: float = 1.0  # CPUs one decode task asks for
    decode_concurrency: int | None = None  # at most this many decode tasks at once (None: Ray decides)
    # How many CPUs of decode feed one embed actor (one GPU): sets decode_concurrency from max_actors
    # when that is not given. Measure it: decode images/s per CPU against model images/s per GPU.
    decode_cpus_per_actor: float | None = None
    read_concurrency: int | None = None
    # Ray Data's per-operator resource reservation (DataContext.op_resource_reservation_enabled). It sets
    # aside CPUs for every operator, staging's included, even while one is idle: on 2 CPUs decode could
    # run only half the time, and runs take longer with it than without (BENCHMARKS.md).
    # Without it decode runs further ahead of the model, still held back by Ray Data's downstream-capacity
    # backpressure: peak RSS rises a little on small runs; on large ones private memory stays flat and
    # only the object store's touched pages grow (BENCHMARKS.md).
    reserve_per_operator: bool = False
    # torch threads in each embed actor that runs on CPU. None: the node's Ray CPUs shared among max_actors.
    # On CPU the model is the slow stage and decode leaves its cores idle much of the time; the actor's
    # OpenMP threads wait passively, so a decode task on the same core gets it back at once (faster than
    # one thread on 2 CPUs, BENCHMARKS.md). GPU actors keep Ray's
    # default (OMP_NUM_THREADS = their num_cpus).
    cpu_threads_per_actor: int | None = None

    def __post_init__(self) -> None:
        _require(self.embed_batch_size > 0, "embed_batch_size must be positive")
        _require(1 <= self.min_actors <= self.max_actors,
                 f"need 1 <= min_actors <= max_actors, got {self.min_actors}..{self.max_actors}")
        _require(self.gpus_per_actor is None or self.gpus_per_actor >= 0, "gpus_per_actor must be >= 0")
        _require(self.cpus_per_actor >= 0 and self.decode_cpus > 0, "CPU requests must be positive")
        _require(self.memory_per_actor_gb > 0, "memory_per_actor_gb must be positive")
        for name in ("decode_concurrency", "read_concurrency", "cpu_threads_per_actor", "concurrent_batches_per_actor"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"{name} must be >= 1, got {value}")
        _require(self.decode_cpus_per_actor is None or self.decode_cpus_per_actor >= self.decode_cpus,
                 f"decode_cpus_per_actor must be at least one decode task ({self.decode_cpus} CPUs)")

    @property
    def decode_task_limit(self) -> int | None:
        """At most this many decode tasks at once: explicit, or decode_cpus_per_actor x max_actors."""
        if self.decode_concurrency is not None or self.decode_cpus_per_actor is None:
            return self.decode_concurrency
        return max(1, round(self.decode_cpus_per_actor * self.max_actors / self.decode_cpus))


@dataclass(frozen=True)
class InputConfig:
    """What the input is: its format (a module of pipeline.sources, or ``auto``) and that format's options.

    ``auto`` is resolved from the listing before anything runs; the options are then checked and typed by
    the format itself (its ``parse_options``), so a format's settings live with the format."""

    format: str = "auto"
    options: Any = field(default_factory=dict)  # a mapping as given; the format's typed options once parsed

    def __post_init__(self) -> None:
        from pipeline.sources import get_source, source_names

        formats = ("auto", *source_names())
        _require(self.format in formats, f"input format {self.format!r} is not one of {', '.join(formats)}")
        if self.format != "auto" and isinstance(self.options, Mapping):
            object.__setattr__(self, "options", get_source(self.format).parse_options(self.options))

    def resolved(self, format: str) -> "InputConfig":
        """This config for the format ``auto`` turned out to be, its options checked against that format."""
        options = self.options if self.format == format else dict(self.options)
        return InputConfig(format, options)


LISTING_MODES = ("auto", "full")


@dataclass(frozen=True)
class ListingConfig:
    """How to list the input (pipeline.io.listing): ``auto`` lists each folder from where its kept listing
    ended when that listing allows it, ``full`` lists everything; a full listing is made anyway when the last
    one is older than ``full_every_days``."""

    mode: str = "auto"
    full_every_days: float = 7.0

    def __post_init__(self) -> None:
        _require(self.mode in LISTING_MODES, f"listing mode {self.mode!r} is not one of {', '.join(LISTING_MODES)}")
        _require(isinstance(self.full_every_days, (int, float)) and self.full_every_days > 0,
                 f"listing full_every_days must be a number > 0, got {self.full_every_days!r}")


@dataclass(frozen=True)
class ScoreConfig:
    """One scoring job: which shards, where the output goes, which model and heads."""

    input: tuple[str, ...]
    output: str
    model: ModelConfig = field(default_factory=ModelConfig)
    heads: tuple[HeadSpec, ...] = (KNOWN_HEADS[DEFAULT_HEAD],)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    shards_per_unit: int = 4
    source: InputConfig = field(default_factory=InputConfig)
    listing: ListingConfig = field(default_factory=ListingConfig)
    write_embeddings: bool = False
    # clip_similarity: the caption's text embedding (same CLIP, open_clip's tokenizer) against the image's
    caption_similarity: bool = True
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    weights_dirs: tuple[str, ...] = ()  # folders (local or URI) searched for weight files first
    prompts: str | None = None  # zero-shot prompt sets: a YAML path, or "default" for the shipped ones
    rescore: bool = False  # redo units committed under another model or head identity
    # Digests (hex MD5 or SHA-256 of image bytes or of URLs, one per line) whose rows get status `excluded`;
    # the sha256 of the list file is pinned before the run and is part of the units' model key.
    exclude_hashes: str | None = None
    exclude_hashes_sha256: str | None = None
    # The run compacts the data table once this many of its files are small (0: never), looking each time it
    # has committed this many more files and at its end.
    compact_at: int = DEFAULT_COMPACT_AT

    def __post_init__(self) -> None:
        _require(len(self.input) > 0, "at least one --input is required")
        _require(all(isinstance(p, str) and p for p in self.input), "input paths must be non-empty strings")
        _require(bool(self.output), "--output is required")
        _require(len(self.heads) > 0, "at least one head is required")
        names = [h.name for h in self.heads]
        _require(len(set(names)) == len(names), f"head names must be unique, got {names}")
        _require(self.shards_per_unit >= 1, "shards_per_unit must be >= 1")
        _require(isinstance(self.compact_at, int) and self.compact_at >= 0,
                 f"compact_at must be a whole number >= 0 (0: never compact), got {self.compact_at!r}")
        gpus = self.resources.gpus_per_actor
        _require(not (self.model.device == "cpu" and gpus), f"device cpu contradicts gpus_per_actor={gpus}")
        _require(not (self.model.device == "cuda" and gpus == 0), "device cuda contradicts gpus_per_actor=0")
        _require(not any(is_credential_option(k) for k in self.storage_options),
                 "credentials do not belong in storage options: give them to the nodes' environment or roles")

    @property
    def primary_head(self) -> HeadSpec:
        return self.heads[0]

    def replace(self, **changes: Any) -> "ScoreConfig":
        return dataclasses.replace(self, **changes)


# fsspec storage options that carry credentials (s3fs, gcsfs, adlfs and botocore names): refused in a job's
# config and on a submitted command line alike. Credentials come from the nodes' environment or roles.
CREDENTIAL_OPTIONS = frozenset({
    "key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
    "access_key", "secret_key", "session_token", "account_key", "sas_token",
})


def is_credential_option(name: str) -> bool:
    """A storage option (any case) whose value is a credential."""
    return name.lower() in CREDENTIAL_OPTIONS


def resolve_head(name_or_uri: str, sha256: str | None = None) -> HeadSpec:
    """A known head by name, or an arbitrary head file (its name taken from the file name)."""
    if name_or_uri in KNOWN_HEADS and sha256 is None:
        return KNOWN_HEADS[name_or_uri]
    stem = name_or_uri.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".pth", ".pt", ".safetensors"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    stem = stem.replace("%2B", "+")
    return HeadSpec(stem, WeightsSpec(name_or_uri, sha256))


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    _require(not unknown, f"unknown {where} setting(s): {sorted(unknown)}; known: {sorted(names)}")
    return cls(**values)


def config_from_mapping(values: Mapping[str, Any]) -> ScoreConfig:
    """A ScoreConfig from a plain mapping (a YAML file, merged CLI flags), checked key by key."""
    values = dict(values)
    if "input" in values and isinstance(values["input"], str):
        values["input"] = (values["input"],)
    for name in ("input", "weights_dirs"):
        if name in values:
            values[name] = tuple(values[name])
    if "model" in values:
        values["model"] = _build(ModelConfig, values["model"], "model")
    if "decode" in values:
        values["decode"] = _build(DecodeConfig, values["decode"], "decode")
    if "resources" in values:
        values["resources"] = _build(ResourcesConfig, values["resources"], "resources")
    if "source" in values:
        values["source"] = _build(InputConfig, values["source"], "source")
    if "listing" in values:
        values["listing"] = _build(ListingConfig, values["listing"], "listing")
    if "heads" in values:
        heads = []
        for item in values["heads"]:
            if isinstance(item, str):
                heads.append(resolve_head(item))
            else:
                _require(isinstance(item, Mapping) and ("uri" in item or "name" in item),
                         f"a head is a name, a URI, or {{name, uri, sha256}}; got {item!r}")
                if "uri" not in item:
                    heads.append(resolve_head(item["name"], item.get("sha256")))
                else:
                    spec = resolve_head(item["uri"], item.get("sha256"))
                    heads.append(HeadSpec(item.get("name", spec.name), spec.weights))
        values["heads"] = tuple(heads)
    return _build(ScoreConfig, values, "job")
