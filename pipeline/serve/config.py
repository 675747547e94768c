"""What `aesthetics serve` runs with, checked on the driver before anything is deployed.

:class:`ServeConfig` is the command line, typed and validated. :func:`plan_model` turns the output's unit
records into the :class:`ModelSpec` the model replicas load: the same CLIP weights (pinned by sha256), the
same precision and the same heads that scored the output, so an uploaded image is scored by what scored the
stored rows.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from pipeline.config import ConfigError, HeadSpec, ModelConfig, WeightsSpec
from pipeline.errors import InputError
from pipeline.models.prompts import PromptSets, load_prompt_sets

DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
# Far below the batch job's limit (Pillow's 89 MP): an upload comes from anyone who can reach the port, and
# a 40 MP photo already needs ~120 MB of RGB before it is resized.
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000
MAX_K = 200  # rows one search or neighbour request may ask for
MAX_QUERY_CHARS = 1000  # CLIP's tokenizer keeps 77 tokens; anything longer is a mistake or abuse
MIN_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ServeConfig:
    output: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # Required off loopback; accepted as an `Authorization: Bearer` header, a cookie set by `/?token=`.
    token: str | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    weights_dirs: tuple[str, ...] = ()
    model: ModelConfig | None = None  # None: the model the records name
    prompts: str | None = "default"  # prompt sets of the attribute profile (None: no profile)
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS
    model_replicas: int = 1
    model_cpus: float = 1.0
    model_gpus: float | None = None  # None: one GPU per replica when the cluster has any, else none
    api_cpus: float = 0.5
    max_batch_size: int = 16
    batch_wait_s: float = 0.01
    app_name: str = "aesthetics"

    def __post_init__(self) -> None:
        _require(bool(self.output), "the output prefix must not be empty")
        _require(bool(self.host), "--host must not be empty")
        _require(1 <= self.port <= 65535, f"--port must be 1..65535, got {self.port}")
        if self.token is not None:
            _require(len(self.token) >= MIN_TOKEN_CHARS and self.token.isprintable() and " " not in self.token,
                     f"the token must be at least {MIN_TOKEN_CHARS} printable characters without spaces")
        _require(is_loopback(self.host) or self.token is not None,
                 f"--host {self.host} listens beyond this machine: a token is required")
        _require(self.max_upload_bytes > 0, "--max-upload-mb must be positive")
        _require(self.max_upload_pixels > 0, "--max-upload-pixels must be positive")
        _require(self.model_replicas >= 1, "--replicas must be >= 1")
        _require(self.model_cpus >= 0 and self.api_cpus >= 0, "CPU requests must be >= 0")
        _require(self.model_gpus is None or self.model_gpus >= 0, "--gpus must be >= 0")
        _require(1 <= self.max_batch_size <= 1024, "--max-batch-size must be 1..1024")
        _require(math.isfinite(self.batch_wait_s) and 0 <= self.batch_wait_s <= 1,
                 "--batch-wait-ms must be 0..1000")

    @property
    def token_required(self) -> bool:
        return self.token is not None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


@dataclass(frozen=True)
class ModelSpec:
    """What a model replica loads. Picklable: it travels to the replica."""

    model: ModelConfig
    heads: tuple[HeadSpec, ...]
    recorded_identities: tuple[str, ...]  # the rows' `model` values it must match
    weights_dirs: tuple[str, ...] = ()
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    prompts: PromptSets | None = None
    max_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS
    tiny_random: bool = False
    score_range: tuple[float, float] | None = None  # lowest and highest stored score (the page's slider)
    decode: Mapping[str, Any] = field(default_factory=dict)  # the recorded decode options (fast path, EXIF)


def check_weights(model: ModelConfig, heads: tuple[HeadSpec, ...], config: ServeConfig) -> None:
    """Find and verify every weights file on the driver, as `score` does: a missing head fails here with the
    way out, not as a replica that Serve restarts until it gives up."""
    from pipeline.models.clip import verified_clip_weights
    from pipeline.models.heads import load_head_bank

    options = dict(config.storage_options)
    load_head_bank(heads, config.weights_dirs, options)
    if not model.is_tiny_random:
        verified_clip_weights(model, config.weights_dirs, options)


def plan_model(config: ServeConfig) -> ModelSpec:
    """The model, precision and heads that scored ``config.output``, from its unit records."""
    from pipeline.analysis.select import model_config_of, models_in
    from pipeline.io.units import read_units

    records = read_units(config.output, dict(config.storage_options))
    if not records:
        raise InputError(f"no committed units under {config.output}: score it first")
    keys = sorted({str(r.get("model_key")) for r in records.values()})
    if len(keys) > 1 and config.model is None:
        raise InputError(f"the units of {config.output} were scored with {len(keys)} models or head sets "
                         f"({keys}): serve one of them with --model/--pretrained")
    record = next(iter(records.values()))
    heads = tuple(HeadSpec(h["name"], WeightsSpec(h["uri"], h.get("sha256"))) for h in record.get("heads") or ())
    if not heads:
        raise InputError(f"the unit records of {config.output} name no heads (written by an older version?)")
    model = config.model
    if model is None:
        # The recorded precision, not select's fp32: a score is only reproducible in the precision it was made in.
        model = dataclasses.replace(model_config_of(record), precision=record.get("precision") or "fp32")
    check_weights(model, heads, config)
    prompts = load_prompt_sets(config.prompts, dict(config.storage_options)) if config.prompts else None
    lows = [r["score"]["min"] for r in records.values() if (r.get("score") or {}).get("min") is not None]
    highs = [r["score"]["max"] for r in records.values() if (r.get("score") or {}).get("max") is not None]
    return ModelSpec(model=model, heads=heads, recorded_identities=tuple(sorted(models_in(records))),
                     weights_dirs=config.weights_dirs, storage_options=dict(config.storage_options),
                     prompts=prompts, max_pixels=config.max_upload_pixels,
                     tiny_random=any(bool(r.get("tiny_random")) for r in records.values()),
                     score_range=(min(lows), max(highs)) if lows and highs else None,
                     decode=dict(record.get("decode") or {}))
