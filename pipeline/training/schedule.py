"""A fine-tuning schedule as data: stages of (optimizer, learning rate, epochs, loss or loss cycle).

The file is YAML (``pipeline/data/finetune-schedule.yaml`` is the default: seed 001's recipe). It is parsed
and checked once, on the driver, into a frozen :class:`Schedule`; a bad file is one line naming the file and
the field. Epochs are numbered 1.. across stages; :meth:`Schedule.at` says which stage and loss an epoch
trains with, so a resumed run picks up in the right stage from the epoch number alone.
"""

from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.config import ConfigError

LOSSES = ("mse", "l1", "mixed", "emd", "bce")  # what each does: pipeline.training.losses
DEFAULT_SCHEDULE = pathlib.Path(__file__).resolve().parent.parent / "data" / "finetune-schedule.yaml"
OPTIMIZERS = ("adamw", "adam", "sgd")
_STAGE_FIELDS = {"optimizer", "lr", "epochs", "loss", "loss_every", "weight_decay", "momentum", "warmup_steps",
                 "tower_lr_scale"}
_TOP_FIELDS = {"stages", "grad_clip"}


class ScheduleError(ConfigError):
    """A schedule file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Stage:
    optimizer: str
    lr: float
    epochs: int
    losses: tuple[str, ...]  # one loss, or a cycle
    loss_every: int = 1  # epochs each loss of the cycle is held for
    weight_decay: float | None = None  # None: the optimizer's own default
    momentum: float = 0.0  # sgd only
    warmup_steps: int = 0
    # The tower's learning rate is the stage's times this; 0 holds the tower still (a head-only stage, e.g. a
    # linear probe before fine-tuning) without changing which parameters DDP synchronises.
    tower_lr_scale: float = 1.0

    def loss_at(self, epoch_in_stage: int) -> str:
        """The loss of the stage's ``epoch_in_stage``-th epoch (0-based)."""
        return self.losses[(epoch_in_stage // self.loss_every) % len(self.losses)]


@dataclass(frozen=True)
class Schedule:
    stages: tuple[Stage, ...]
    grad_clip: float | None = None
    source: str = ""

    @property
    def epochs(self) -> int:
        return sum(stage.epochs for stage in self.stages)

    @property
    def losses(self) -> set[str]:
        return {loss for stage in self.stages for loss in stage.losses}

    def at(self, epoch: int) -> tuple[int, Stage, str]:
        """(stage index, stage, loss) of the 1-based ``epoch``."""
        first = 1
        for index, stage in enumerate(self.stages):
            if epoch < first + stage.epochs:
                return index, stage, stage.loss_at(epoch - first)
            first += stage.epochs
        raise ValueError(f"epoch {epoch} is past the schedule's {self.epochs} epochs")

    def stage_start(self, index: int) -> int:
        """The 1-based epoch stage ``index`` starts at."""
        return 1 + sum(stage.epochs for stage in self.stages[:index])

    def replace(self, **changes: Any) -> "Schedule":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"grad_clip": self.grad_clip, "source": self.source,
                "stages": [dataclasses.asdict(stage) for stage in self.stages]}


def _number(value: Any, where: str, kind: type, minimum: float, inclusive: bool = True) -> Any:
    if isinstance(value, str) and kind is float:
        # YAML 1.1 (PyYAML) reads 1e-4 as a string (it wants 1.0e-4): take what anyone means by it.
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise ScheduleError(f"{where} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    if value < minimum or (not inclusive and value == minimum):
        raise ScheduleError(f"{where} must be {'>=' if inclusive else '>'} {minimum:g}, got {value!r}")
    return kind(value)


def _stage(raw: Any, where: str) -> Stage:
    if not isinstance(raw, Mapping):
        raise ScheduleError(f"{where} must be a mapping of optimizer, lr, epochs, loss; got {raw!r}")
    unknown = sorted(set(raw) - _STAGE_FIELDS)
    if unknown:
        raise ScheduleError(f"{where}: unknown field(s) {unknown}; known: {sorted(_STAGE_FIELDS)}")
    missing = sorted({"optimizer", "lr", "epochs", "loss"} - set(raw))
    if missing:
        raise ScheduleError(f"{where}: missing {missing}")
    optimizer = str(raw["optimizer"]).lower()
    if optimizer not in OPTIMIZERS:
        raise ScheduleError(f"{where}.optimizer must be one of {OPTIMIZERS}, got {raw['optimizer']!r}")
    losses = raw["loss"] if isinstance(raw["loss"], list) else [raw["loss"]]
    if not losses or any(loss not in LOSSES for loss in losses):
        raise ScheduleError(f"{where}.loss must be one of {LOSSES} or a list of them, got {raw['loss']!r}")
    momentum = _number(raw.get("momentum", 0.0), f"{where}.momentum", float, 0.0)
    if momentum and optimizer != "sgd":
        raise ScheduleError(f"{where}.momentum is for sgd; {optimizer} has its own")
    weight_decay = raw.get("weight_decay")
    return Stage(optimizer=optimizer, lr=_number(raw["lr"], f"{where}.lr", float, 0.0, inclusive=False),
                 epochs=_number(raw["epochs"], f"{where}.epochs", int, 1), losses=tuple(losses),
                 loss_every=_number(raw.get("loss_every", 1), f"{where}.loss_every", int, 1),
                 weight_decay=None if weight_decay is None else _number(weight_decay, f"{where}.weight_decay",
                                                                         float, 0.0),
                 momentum=momentum, warmup_steps=_number(raw.get("warmup_steps", 0), f"{where}.warmup_steps", int, 0),
                 tower_lr_scale=_number(raw.get("tower_lr_scale", 1.0), f"{where}.tower_lr_scale", float, 0.0))


def parse_schedule(raw: Any, source: str = "schedule") -> Schedule:
    if not isinstance(raw, Mapping) or "stages" not in raw:
        raise ScheduleError(f"{source}: expected a mapping with a 'stages' list")
    unknown = sorted(set(raw) - _TOP_FIELDS)
    if unknown:
        raise ScheduleError(f"{source}: unknown field(s) {unknown}; known: {sorted(_TOP_FIELDS)}")
    stages = raw["stages"]
    if not isinstance(stages, list) or not stages:
        raise ScheduleError(f"{source}: 'stages' must be a non-empty list")
    clip = raw.get("grad_clip")
    return Schedule(tuple(_stage(stage, f"{source}: stages[{i}]") for i, stage in enumerate(stages)),
                    None if clip is None else _number(clip, f"{source}: grad_clip", float, 0.0, inclusive=False),
                    source)


def load_schedule(path: str | None = None, storage_options: Mapping[str, Any] | None = None) -> Schedule:
    """The schedule in ``path`` (a local path or fsspec URI), or the default one."""
    import yaml

    from pipeline.io.storage import filesystem

    source = str(path or DEFAULT_SCHEDULE)
    try:
        fs, inner = filesystem(source, storage_options)
        with fs.open(inner, "rb") as handle:
            text = handle.read().decode("utf-8")
    except FileNotFoundError:
        raise ScheduleError(f"schedule file {source} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ScheduleError(f"schedule file {source} unreadable: {type(error).__name__}: {error}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ScheduleError(f"schedule file {source} is not YAML: {' '.join(str(error).split())}") from None
    return parse_schedule(raw, source)
