"""Train an aesthetic head on CLIP embeddings and save it in a LAION file format the scoring job loads.

Architectures, each saved with exactly the state-dict keys :mod:`pipeline.models.heads` recognises:

- ``linear``: one ``nn.Linear(D, 1)``, keys ``weight``, ``bias`` (the V1 format);
- ``mlp``: the improved-aesthetic-predictor layout, Linear layers with Dropout between and no activation,
  keys ``layers.{0,2,4,6,7}.*`` (the V2 ``*-linearMSE`` format; affine in eval mode, dropout only regularises);
- ``relu-mlp``: the same widths with ReLU, keys ``layers.{0,3,6,9,11}.*`` (the ``*-reluMSE`` format).

Losses (``auto``: bce for keep/trash labels, mse otherwise): ``mse`` and ``l1`` on the mean score; ``emd`` on
the vote distribution (AVA counts), NIMA's r=2 earth mover's distance between cumulative distributions. A head
outputs one number, so for ``emd`` that number is the centre of a discretised normal over the scores 1..10
whose spread is one learned parameter (kept in the JSON record, not needed to score). ``bce`` trains on
keep/trash labels; the head then outputs the logit of keep (decision boundary 0).

Conditioning: inputs are standardised per dimension and targets to zero mean and unit variance while training;
both are folded exactly (float64) into the first and last Linear on export, so the file takes raw unit
embeddings and outputs label units, like LAION's heads.

Splits are by a hash of each key (seeded), so an image stays in the same split when labels are added.
Training stops when the validation loss has not improved for ``patience`` epochs; the best epoch's weights
are kept. Metrics are reported on the validation and the untouched test split.

Scale: one trial here holds the labelled embeddings in one process (250k AVA images at D=768: 0.8 GB as
float32), which is what a labelled set of aesthetic ratings needs; :func:`train_many` runs a hyper-parameter grid
as Ray tasks (the embeddings put into the object store once), which is the part that parallelises. For more
labelled rows than fit one machine, :mod:`pipeline.training.distributed` trains one config data-parallel with
Ray Train, streaming the embeddings from the scored Parquet files to the workers (never gathered in one
process); it shares this module's model, objective, conditioning, export and metrics.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError
from pipeline.evaluate import score_metrics
from pipeline.models.heads import Head, HeadBank, HeadFormat, detect_head_format
from pipeline.training.labels import AVA_BINARY_THRESHOLD, AVA_VOTE_BINS, LabelKind, LabelTable
from pipeline.training.splits import SPLIT_NAMES, TEST, TRAIN, VALIDATION, split_assignments  # noqa: F401 (API)

log = logging.getLogger(__name__)

ARCHITECTURES = ("linear", "mlp", "relu-mlp")
LOSSES = ("auto", "mse", "l1", "emd", "bce")  # auto: bce for keep/trash labels, else mse
LAION_HIDDEN = (1024, 128, 64, 16)  # the improved-aesthetic-predictor's widths
RECORD_FORMAT = 1
_MIN_SIGMA = 0.05  # a vote spread below this is a point mass: EMD gradients vanish


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "linear"
    loss: str = "auto"
    hidden: tuple[int, int, int, int] = LAION_HIDDEN  # mlp and relu-mlp only; the file layout fixes 4
    dropout: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 10
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    threshold: float = AVA_BINARY_THRESHOLD  # for the accuracy metric on score labels
    device: str = "auto"

    def __post_init__(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ConfigError(message)

        require(self.arch in ARCHITECTURES, f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        require(self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}")
        require(len(self.hidden) == 4 and all(w >= 1 for w in self.hidden),
                f"hidden must be 4 positive widths (the LAION MLP layout), got {self.hidden}")
        require(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        require(self.lr > 0 and self.weight_decay >= 0, "lr must be positive and weight_decay >= 0")
        require(self.batch_size >= 1 and self.max_epochs >= 1 and self.patience >= 1,
                "batch_size, max_epochs and patience must be >= 1")
        require(0 < self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1,
                f"need 0 < val_fraction, 0 <= test_fraction, sum < 1; got {self.val_fraction}, {self.test_fraction}")

    @property
    def head_format(self) -> HeadFormat:
        return {"linear": HeadFormat.LINEAR, "mlp": HeadFormat.LINEAR_MLP, "relu-mlp": HeadFormat.RELU_MLP}[self.arch]


@dataclass(frozen=True, eq=False)
class TrainingSet:
    """Labelled embeddings: row i of ``embeddings`` (N, D) float32 unit vectors has label ``scores[i]``."""

    keys: np.ndarray
    embeddings: np.ndarray
    scores: np.ndarray
    kind: str = LabelKind.SCORE
    votes: np.ndarray | None = None  # (N, 10) vote counts, for the EMD loss

    def __post_init__(self) -> None:
        n = len(self.keys)
        if self.embeddings.ndim != 2 or len(self.embeddings) != n or len(self.scores) != n:
            raise ValueError("keys, embeddings (N, D) and scores must have the same N")
        if self.votes is not None and self.votes.shape != (n, AVA_VOTE_BINS):
            raise ValueError(f"votes must be (N, {AVA_VOTE_BINS})")

    @classmethod
    def from_labels(cls, keys: np.ndarray, embeddings: np.ndarray, labels: LabelTable,
                    label_rows: np.ndarray) -> "TrainingSet":
        """Rows of ``embeddings`` with their labels at ``label_rows`` (see ``scored.align``)."""
        votes = labels.votes[label_rows] if labels.votes is not None else None
        return cls(np.asarray(keys, dtype=object), np.ascontiguousarray(embeddings, dtype=np.float32),
                   labels.scores[label_rows].astype(np.float64), labels.kind, votes)

    @property
    def embed_dim(self) -> int:
        return int(self.embeddings.shape[1])


# -- model ---------------------------------------------------------------------------------------


class MLPHead(nn.Module):
    """The improved-aesthetic-predictor's module layout: its ``layers.N`` names are the file's keys."""

    def __init__(self, input_dim: int, hidden: Sequence[int], dropout: float, relu: bool):
        super().__init__()
        modules: list[nn.Module] = []
        width = input_dim
        for position, out_width in enumerate(hidden):
            modules.append(nn.Linear(width, out_width))
            if relu:
                modules.append(nn.ReLU())
            if position < len(hidden) - 1 or relu:
                modules.append(nn.Dropout(dropout))  # V2 has no dropout after its 4th Linear; ReLU has
            width = out_width
        if relu:
            modules.pop()  # (Linear, ReLU, Dropout) x 3, Linear, ReLU, Linear: no dropout before the output
        modules.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_head_module(config: TrainConfig, input_dim: int) -> nn.Module:
    """An untrained head whose ``state_dict()`` keys are those of ``config.head_format``."""
    if config.arch == "linear":
        return nn.Linear(input_dim, 1)
    return MLPHead(input_dim, config.hidden, config.dropout, relu=config.arch == "relu-mlp")


def _first_and_last_linear(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """Key prefixes ('' or 'layers.N.') of the first and last Linear."""
    if "weight" in state_dict:
        return "", ""
    indices = sorted(int(key.split(".")[1]) for key in state_dict if key.endswith(".weight"))
    return f"layers.{indices[0]}.", f"layers.{indices[-1]}."


def export_state_dict(head: nn.Module, input_mean: torch.Tensor, input_scale: torch.Tensor,
                      output_mean: float, output_scale: float) -> dict[str, torch.Tensor]:
    """The trained head with the input standardisation and output scaling folded in, float32 on CPU.

    ``head`` computes ``z = head((x - input_mean) / input_scale)`` and the label is ``z * output_scale +
    output_mean``; the result computes the label from ``x`` directly.
    """
    state = {key: value.detach().to("cpu", torch.float64).clone() for key, value in head.state_dict().items()}
    first, last = _first_and_last_linear(state)
    mean = input_mean.detach().to("cpu", torch.float64)
    scale = input_scale.detach().to("cpu", torch.float64)
    weight = state[first + "weight"]
    state[first + "bias"] = state[first + "bias"] - weight @ (mean / scale)
    state[first + "weight"] = weight / scale  # divides each input column
    state[last + "weight"] = state[last + "weight"] * output_scale
    state[last + "bias"] = state[last + "bias"] * output_scale + output_mean
    return {key: value.float().contiguous() for key, value in state.items()}


# -- losses --------------------------------------------------------------------------------------


def emd_loss(predicted: torch.Tensor, target: torch.Tensor, r: float = 2.0) -> torch.Tensor:
    """NIMA's earth mover's distance between (B, K) distributions over ordered bins, batch mean:
    ``(mean_k |CDF_p(k) - CDF_q(k)|^r)^(1/r)``."""
    difference = torch.cumsum(predicted, dim=1) - torch.cumsum(target, dim=1)
    return difference.abs().pow(r).mean(dim=1).pow(1.0 / r).mean()


def score_distribution(centres: torch.Tensor, sigma: torch.Tensor, bins: int = AVA_VOTE_BINS) -> torch.Tensor:
    """(B,) centres -> (B, bins) discretised normal over the scores 1..bins."""
    scores = torch.arange(1, bins + 1, dtype=centres.dtype, device=centres.device)
    return torch.softmax(-0.5 * ((scores - centres[:, None]) / sigma) ** 2, dim=1)


class _Objective(nn.Module):
    """The loss of label-unit predictions; holds the EMD spread parameter when the loss is EMD."""

    def __init__(self, loss: str, label_scale: float, initial_sigma: float = 1.0):
        super().__init__()
        self.loss = loss
        self.label_scale = label_scale
        # Only the EMD loss trains the spread; frozen otherwise, so data-parallel training sees no unused parameter.
        self.log_sigma = nn.Parameter(torch.tensor(math.log(max(initial_sigma, _MIN_SIGMA))),
                                      requires_grad=loss == "emd")

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp().clamp_min(_MIN_SIGMA)

    def forward(self, predictions: torch.Tensor, scores: torch.Tensor, votes: torch.Tensor | None) -> torch.Tensor:
        if self.loss == "mse":
            return (((predictions - scores) / self.label_scale) ** 2).mean()
        if self.loss == "l1":
            return ((predictions - scores).abs() / self.label_scale).mean()
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(predictions, scores)
        return emd_loss(score_distribution(predictions, self.sigma), votes)


class ConditionedHead(nn.Module):
    """The head as it trains: standardised inputs in, label-unit predictions out, and the training loss.

    Both training paths (here and :mod:`pipeline.training.distributed`) train this module; :meth:`export`
    folds the conditioning into the head's file format.
    """

    def __init__(self, head: nn.Module, objective: _Objective, input_mean: torch.Tensor, input_scale: torch.Tensor,
                 output_mean: float, output_scale: float):
        super().__init__()
        self.head = head
        self.objective = objective
        self.register_buffer("input_mean", torch.as_tensor(input_mean, dtype=torch.float32))
        self.register_buffer("input_scale", torch.as_tensor(input_scale, dtype=torch.float32))
        self.output_mean = float(output_mean)
        self.output_scale = float(output_scale)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x - self.input_mean) / self.input_scale)[:, 0] * self.output_scale + self.output_mean

    def forward(self, x: torch.Tensor, scores: torch.Tensor, votes: torch.Tensor | None = None) -> torch.Tensor:
        return self.objective(self.predict(x), scores, votes)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def export(self) -> dict[str, torch.Tensor]:
        return export_state_dict(self.head, self.input_mean, self.input_scale, self.output_mean, self.output_scale)


def conditioned_head(config: TrainConfig, input_dim: int, input_mean: torch.Tensor, input_scale: torch.Tensor,
                     output_mean: float, output_scale: float, initial_sigma: float = 1.0) -> ConditionedHead:
    """An untrained head of ``config``'s architecture with its objective and conditioning."""
    return ConditionedHead(build_head_module(config, input_dim), _Objective(config.loss, output_scale, initial_sigma),
                           input_mean, input_scale, output_mean, output_scale)


def floored_scale(std: torch.Tensor) -> torch.Tensor:
    """Per-dimension input scale: the training std, floored so a near-constant dimension cannot blow up."""
    return std.clamp_min(max(float(std.median()) * 1e-3, 1e-12))


def output_conditioning(loss: str, mean: float, std: float) -> tuple[float, float]:
    """(output_mean, output_scale) for training-split label statistics."""
    if loss == "bce":
        return 0.0, 1.0  # the output is a logit: nothing to standardise
    return float(mean), float(std) or 1.0


def vote_spread(votes: torch.Tensor) -> torch.Tensor:
    """(B,) standard deviation of each row's (B, 10) vote distribution: where the EMD spread starts."""
    bins = torch.arange(1, AVA_VOTE_BINS + 1, dtype=votes.dtype, device=votes.device)
    return (votes * (bins - (votes * bins).sum(dim=1, keepdim=True)) ** 2).sum(dim=1).sqrt()


# -- training ------------------------------------------------------------------------------------


@dataclass(eq=False)
class TrainedHead:
    """A trained head in file format, with how it was trained and how well it does."""

    state_dict: dict[str, torch.Tensor]
    config: TrainConfig
    embed_dim: int
    label_kind: str
    split: np.ndarray  # TRAIN / VALIDATION / TEST per training row (empty when the rows were never gathered)
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]]
    metrics: dict[str, dict[str, float]]  # "val", "test" (when there is a test split), "train"
    emd_sigma: float | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # provenance the caller adds (label file, scored source)
    split_rows: dict[str, int] | None = None  # rows per split, where ``split`` is not kept (distributed runs)

    @property
    def rows_per_split(self) -> dict[str, int]:
        if self.split_rows is not None:
            return dict(self.split_rows)
        return {name: int((self.split == code).sum()) for code, name in SPLIT_NAMES.items()}

    @property
    def head_format(self) -> HeadFormat:
        return detect_head_format(self.state_dict)

    @property
    def selection_score(self) -> float:
        """What :func:`train_many` ranks trials by: validation SRCC (scale-free, comparable across losses)."""
        value = self.metrics["val"]["srcc"]
        return value if math.isfinite(value) else -math.inf

    def as_head(self, name: str = "trained") -> Head:
        """The head as the scoring job loads it."""
        return Head.from_state_dict(name, self.state_dict)

    def predict(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        """Scores of (N, D) unit embeddings through the exported file format (what scoring will compute)."""
        tensor = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        return HeadBank([self.as_head()]).score(tensor)["trained"]

    def file_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self.state_dict, buffer)
        return buffer.getvalue()

    def record(self, sha256: str, head_path: str) -> dict[str, Any]:
        """The JSON written beside the head file."""
        return {
            "format": RECORD_FORMAT,
            "head_file": head_path,
            "sha256": sha256,
            "head_format": self.head_format.value,
            "embed_dim": self.embed_dim,
            "label_kind": self.label_kind,
            "output": "logit of keep (boundary 0)" if self.config.loss == "bce" else "score in label units",
            "config": dataclasses.asdict(self.config),
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "rows": self.rows_per_split,
            "metrics": self.metrics,
            "emd_sigma": self.emd_sigma,
            "seconds": round(self.seconds, 2),
            "torch": torch.__version__,
            **self.extra,
        }


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_loss(config: TrainConfig, label_kind: str) -> TrainConfig:
    """``auto`` made concrete: bce for keep/trash labels, mse otherwise."""
    if config.loss == "auto":
        return dataclasses.replace(config, loss="bce" if label_kind == LabelKind.BINARY else "mse")
    return config


def check_loss(config: TrainConfig, label_kind: str, has_votes: bool) -> None:
    """The loss fits the labels."""
    if config.loss == "emd" and not has_votes:
        raise ConfigError("the emd loss needs vote counts per image (AVA.txt labels); use mse or l1 for scores")
    if config.loss == "bce" and label_kind != LabelKind.BINARY:
        raise ConfigError("the bce loss needs keep/trash labels: give a keep/trash CSV, or turn scores into "
                          "keep/trash with a threshold or percentile")
    if config.loss == "emd" and label_kind == LabelKind.BINARY:
        raise ConfigError("keep/trash labels have no vote distribution: use bce (or mse)")


def check_split_rows(counts: Mapping[str, int]) -> None:
    if counts["train"] < 2 or counts["val"] < 2:
        raise ConfigError(f"too few labelled rows to train and validate: {dict(counts)} "
                          "(need >= 2 in train and val)")


def _check(data: TrainingSet, config: TrainConfig, split: np.ndarray) -> None:
    check_loss(config, data.kind, data.votes is not None)
    check_split_rows({SPLIT_NAMES[code]: int((split == code).sum()) for code in SPLIT_NAMES})
    if not np.isfinite(data.embeddings).all() or not np.isfinite(data.scores).all():
        raise ConfigError("training data has non-finite embeddings or labels")


def split_metrics(predictions: np.ndarray, labels: np.ndarray, label_kind: str,
                  config: TrainConfig) -> dict[str, float]:
    """The metrics of one split's predictions (from the head file) against its labels."""
    if label_kind == LabelKind.BINARY:
        return score_metrics(predictions, labels, threshold=0.5,
                             prediction_threshold=0.0 if config.loss == "bce" else 0.5)
    return score_metrics(predictions, labels, threshold=config.threshold)


def _metrics(predictions: np.ndarray, data: TrainingSet, rows: np.ndarray, config: TrainConfig) -> dict[str, float]:
    return split_metrics(predictions[rows], data.scores[rows], data.kind, config)


def improves(loss: float, best: float) -> bool:
    """Whether a validation loss beats the best so far (early stopping's test)."""
    return loss < best - 1e-7 * max(1.0, abs(best))


def train_head(data: TrainingSet, config: TrainConfig = TrainConfig()) -> TrainedHead:
    """Train one head on ``data`` (see the module docstring); deterministic for a seed on CPU."""
    started = time.monotonic()
    config = resolve_loss(config, data.kind)
    split = split_assignments(data.keys, config.val_fraction, config.test_fraction, config.seed)
    _check(data, config, split)
    torch.manual_seed(config.seed)
    device = _device(config.device)

    x = torch.from_numpy(data.embeddings).to(device)
    y = torch.from_numpy(data.scores.astype(np.float32)).to(device)
    votes = None
    if config.loss == "emd":
        counts = torch.from_numpy(data.votes.astype(np.float32)).to(device)
        votes = counts / counts.sum(dim=1, keepdim=True)
    train_rows = torch.from_numpy(np.flatnonzero(split == TRAIN)).to(device)
    val_rows = torch.from_numpy(np.flatnonzero(split == VALIDATION)).to(device)

    # Standardise with training-split statistics only; a near-constant dimension must not blow up.
    input_mean = x[train_rows].mean(dim=0)
    input_scale = floored_scale(x[train_rows].std(dim=0))
    output_mean, output_scale = output_conditioning(config.loss, float(y[train_rows].mean()),
                                                    float(y[train_rows].std()))

    initial_sigma = float(vote_spread(votes)[train_rows].mean()) if votes is not None else 1.0
    model = conditioned_head(config, data.embed_dim, input_mean, input_scale, output_mean, output_scale,
                             initial_sigma).to(device)
    head, objective = model.head, model.objective
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        return model(x[rows], y[rows], votes[rows] if votes is not None else None)

    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    best_loss, best_epoch, best_state, stale_epochs = math.inf, 0, None, 0
    history: list[dict[str, float]] = []
    epoch = 0
    for epoch in range(1, config.max_epochs + 1):
        head.train()
        order = train_rows[torch.randperm(len(train_rows), generator=generator).to(device)]
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(batch)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        head.eval()
        with torch.no_grad():
            val_loss = float(loss_of(val_rows))
        history.append({"epoch": epoch, "train_loss": total / len(order), "val_loss": val_loss})
        if best_state is None or improves(val_loss, best_loss):
            best_loss, best_epoch, stale_epochs = val_loss, epoch, 0
            best_state = (copy.deepcopy(head.state_dict()), float(objective.sigma.detach()))
        else:
            stale_epochs += 1
            if stale_epochs >= config.patience:
                break
    head.load_state_dict(best_state[0])
    head.eval()

    state_dict = model.export()
    trained = TrainedHead(state_dict, config, data.embed_dim, data.kind, split, best_epoch, epoch, history, {},
                          emd_sigma=best_state[1] if config.loss == "emd" else None)
    predictions = trained.predict(data.embeddings)
    for code, name in SPLIT_NAMES.items():
        rows = np.flatnonzero(split == code)
        if len(rows):
            trained.metrics[name] = _metrics(predictions, data, rows, config)
    trained.seconds = time.monotonic() - started
    log.info("trained %s/%s: best epoch %d of %d, val %s", config.arch, config.loss, best_epoch, epoch,
             trained.metrics["val"])
    return trained


def config_grid(base: TrainConfig, **choices: Sequence[Any]) -> list[TrainConfig]:
    """Every combination of the given field values over ``base`` (``lr=[1e-3, 1e-4], arch=["linear"]``)."""
    configs = [base]
    for name, values in choices.items():
        values = list(values)
        if values:
            configs = [dataclasses.replace(config, **{name: value}) for config in configs for value in values]
    return configs


def train_many(data: TrainingSet, configs: Sequence[TrainConfig], use_ray: bool = False,
               ray_address: str | None = None, cpus_per_trial: float = 1.0,
               gpus_per_trial: float = 0.0) -> list[TrainedHead]:
    """Train one head per config, best validation SRCC first.

    With ``use_ray`` each config is a Ray task (on the cluster at ``ray_address``, or a local Ray), the training
    set is put into the object store once and shared by all of them; without, they run one after another.
    """
    if not configs:
        raise ConfigError("no training configurations")
    if use_ray:
        import ray

        from pipeline.ray_session import connect_ray

        connect_ray(ray_address)
        data_ref = ray.put(data)
        # Ray sets OMP_NUM_THREADS to the task's CPUs, so torch in each trial keeps to its share.
        task = ray.remote(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial)(train_head)
        trained = ray.get([task.remote(data_ref, config) for config in configs])
    else:
        trained = [train_head(data, config) for config in configs]
    return sorted(trained, key=lambda head: head.selection_score, reverse=True)


def save_head(trained: TrainedHead, path: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the head file (``torch.save`` of the state dict) and ``<stem>.json`` beside it; returns the record
    (with the file's ``sha256`` and ``record_file``)."""
    from pipeline.io.storage import filesystem, write_bytes_atomic

    data = trained.file_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    fs, inner = filesystem(path, storage_options)
    write_bytes_atomic(fs, inner, data)
    record = finite_or_none(trained.record(sha256, path))
    record["record_file"] = record_path_for(path)
    fs, record_inner = filesystem(record["record_file"], storage_options)
    write_bytes_atomic(fs, record_inner, json.dumps(record, indent=2, sort_keys=True, allow_nan=False).encode())
    return record


def finite_or_none(value: Any) -> Any:
    """NaN and infinities as null: the record must be strict JSON for any reader."""
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def record_path_for(head_path: str) -> str:
    """``head.pth`` -> ``head.json``."""
    stem, dot, suffix = head_path.rpartition(".")
    return (stem if dot and "/" not in suffix else head_path) + ".json"
