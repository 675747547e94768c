"""Fine-tune the open_clip image tower with an aesthetic head on Ray Train (seed 001's method), and write the
result as files the scoring job loads.

Data: WebDataset shards go through the scoring job's own read and decode stages as a Ray Data pipeline
(:func:`labelled_images`); each ``ok`` row whose join key has a label gets the label and its split (the seeded
key hash ``train-head`` splits by, :func:`~pipeline.training.splits.split_assignments`). Rows are filtered to
one split before decode, so only that split's images are decoded. The training split is streamed to the
workers (``get_dataset_shard``, equal shards); every worker reads the validation split whole and scores every
``workers``-th batch of it, and the predictions are gathered, so each worker computes the same validation SRCC
and takes the same early-stopping decision.

Model (:class:`AestheticModel`): uint8 pixels -> the scoring job's normalisation -> the image tower -> unit
embedding -> the head (a ``train-head`` architecture, in its file layout) -> a score in label units (or a keep
logit for bce). The head sees the unit embedding times sqrt(D), so its inputs are of unit scale without
statistics that would drift while the tower trains; its outputs are standardised to the training labels.
Both are folded into the exported head file, which then takes unit embeddings and outputs label units, as
every LAION head does. With ``trainable_blocks=N`` only the last N transformer blocks (and the final norm and
projection) train; ``N=0`` freezes the tower (a head on frozen embeddings, through the same path).

Schedule: :mod:`pipeline.training.schedule` (stages of optimizer, lr, epochs, loss or loss cycle); losses:
:mod:`pipeline.training.losses`. Each stage starts a fresh optimizer; the tower and head learning rates are
the stage's (the head's times ``head_lr_scale``). Early stopping and the kept weights go by validation SRCC,
which is comparable across stages whose losses differ.

Fault tolerance: every epoch rank 0 reports a checkpoint (weights, optimizer, epoch, history) to the run's
storage path (local or s3://); Ray Train keeps the best one by validation SRCC and the latest. A killed worker
makes Ray Train restart the group (``max_failures``), which resumes from the latest checkpoint; a rerun of
the driver with the same storage path and run name resumes the same way.

Output: ``<out>/clip.safetensors`` (the whole open_clip state dict, image tower fine-tuned, the text tower as
loaded: ``open_clip`` loads it as any pretrained file), ``<out>/head.safetensors`` and ``<out>/finetune.json``
with both sha256s, the config, the schedule and per-split metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline import schema
from pipeline.config import TINY_ARCH, ConfigError, DecodeConfig, ModelConfig
from pipeline.errors import InputError
from pipeline.training import checkpoints
from pipeline.training.labels import AVA_BINARY_THRESHOLD, AVA_VOTE_BINS, LabelKind, LabelTable
from pipeline.training.schedule import Schedule, load_schedule
from pipeline.training.splits import SPLIT_NAMES, TEST, TRAIN, VALIDATION, split_assignments
from pipeline.training.train_head import finite_or_none

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
HEAD_ARCHITECTURES = ("linear", "mlp", "relu-mlp")
CHECKPOINT_FILE = "state.pt"
CLIP_FILE, HEAD_FILE, RECORD_FILE = "clip.safetensors", "head.safetensors", "finetune.json"
TRAIN_DATASET, VALIDATION_DATASET = "train", "val"

# Columns of the labelled image rows.
KEY, SPLIT, SCORE, VOTES, PIXELS = "join_key", "split", "score", "votes", schema.PIXELS


@dataclass(frozen=True)
class FinetuneConfig:
    """What is trained and how; checked once, here."""

    model: ModelConfig = ModelConfig()
    trainable_blocks: int | None = None  # None: the whole image tower; N: its last N blocks; 0: none
    arch: str = "linear"
    hidden: tuple[int, int, int, int] = (1024, 128, 64, 16)
    dropout: float = 0.2
    batch_size: int = 32  # global: each of W workers takes batch_size / W
    head_lr_scale: float = 1.0
    patience: int | None = None  # epochs without a better validation SRCC before stopping; None: run them all
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    flip: bool = False  # augmentation: horizontal flip, half the images
    crop_scale: float = 1.0  # augmentation: a random crop of this share of the side, resized back; 1: none
    amp: bool = True  # bf16 autocast on GPU (no loss scaling needed); CPU always runs fp32
    threshold: float = AVA_BINARY_THRESHOLD  # good/bad cut for the accuracy metric on score labels

    def __post_init__(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ConfigError(message)

        require(self.arch in HEAD_ARCHITECTURES, f"arch must be one of {HEAD_ARCHITECTURES}, got {self.arch!r}")
        require(self.trainable_blocks is None or self.trainable_blocks >= 0, "trainable_blocks must be >= 0")
        require(len(self.hidden) == 4 and all(width >= 1 for width in self.hidden), "hidden must be 4 widths")
        require(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        require(self.batch_size >= 1, "batch_size must be >= 1")
        require(self.head_lr_scale > 0, "head_lr_scale must be positive")
        require(self.patience is None or self.patience >= 1, "patience must be >= 1")
        require(0 < self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1,
                f"need 0 < val_fraction, 0 <= test_fraction, sum < 1; got {self.val_fraction}, {self.test_fraction}")
        require(0.2 <= self.crop_scale <= 1, f"crop_scale must be in [0.2, 1], got {self.crop_scale}")

    @property
    def scored_arch(self) -> str:
        """The open_clip architecture name to score the exported weights with."""
        return TINY_ARCH if self.model.is_tiny_random else self.model.name


# -- the labelled images -------------------------------------------------------------------------


def _label_arrays(labels: LabelTable) -> dict[str, Any]:
    return {"keys": np.asarray(labels.keys, dtype=object), "scores": np.asarray(labels.scores, dtype=np.float64),
            "votes": None if labels.votes is None else np.asarray(labels.votes, dtype=np.float32)}


_index_cache: dict[int, Any] = {}


def _label_index(labels: Mapping[str, Any]) -> Any:
    import pandas as pd

    index = _index_cache.get(id(labels["keys"]))
    if index is None:
        _index_cache.clear()
        index = _index_cache[id(labels["keys"])] = pd.Index(labels["keys"])
    return index


def _join_values(batch: Mapping[str, np.ndarray], join_on: str) -> list[str | None]:
    from pipeline.training.scored import JOIN_URL_STEM, url_stem

    if join_on == JOIN_URL_STEM:
        return [url_stem(url) for url in batch[schema.URL]]
    if join_on not in batch:
        raise InputError(f"the shards' rows have no column {join_on!r} to join labels on")
    return [None if value is None else str(value) for value in batch[join_on]]


def _read_shard(batch: Mapping[str, Any], storage_options: Mapping[str, Any], rows_per_batch: int) -> Any:
    """One shard's rows through the scoring job's read stage (tar + sidecar joined, every row's status)."""
    from pipeline.stages.read import StorageError, read_shard_rows, to_table

    name = str(batch["name"][0])
    try:
        rows = read_shard_rows(str(batch["tar"][0]) or None, str(batch["sidecar"][0]) or None, storage_options)
    except StorageError as error:
        # A shard that cannot be read must not train on silently less data.
        raise InputError(f"shard {name} unreadable: {error}") from error
    table = to_table(rows, name, str(batch["unit"][0]))
    for start in range(0, table.num_rows, rows_per_batch):
        yield table.slice(start, rows_per_batch)


def _labelled(batch: dict[str, np.ndarray], *, labels: Mapping[str, Any], join_on: str, splits: tuple[int, ...],
              val_fraction: float, test_fraction: float, seed: int, keep_image: bool) -> dict[str, np.ndarray]:
    """One batch of read rows -> its ``ok`` rows with a label in ``splits``, with the label and split."""
    keys = np.asarray(_join_values(batch, join_on), dtype=object)
    ok = np.asarray(batch[schema.STATUS], dtype=object) == schema.Status.OK.value
    positions = _label_index(labels).get_indexer(keys.tolist()) if len(keys) else np.empty(0, dtype=np.int64)
    rows = np.flatnonzero(ok & (positions >= 0))
    split = split_assignments(keys[rows], val_fraction, test_fraction, seed)
    keep = np.isin(split, splits)
    rows, split = rows[keep], split[keep]
    out = {KEY: keys[rows], SPLIT: split, SCORE: labels["scores"][positions[rows]]}
    if labels["votes"] is not None:
        out[VOTES] = labels["votes"][positions[rows]].reshape(-1, AVA_VOTE_BINS)
    if keep_image:
        for name in (schema.IMAGE, schema.STATUS, schema.ERROR):
            out[name] = np.asarray(batch[name], dtype=object)[rows]
    return out


def _only_split(batch: dict[str, np.ndarray], *, code: int) -> dict[str, np.ndarray]:
    keep = np.asarray(batch[SPLIT]) == code
    return {name: values[keep] for name, values in batch.items()}


def _decoded(batch: dict[str, np.ndarray], *, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    ok = np.asarray(batch[schema.STATUS], dtype=object) == schema.Status.OK.value
    return {name: batch[name][ok] for name in columns}


@dataclass(frozen=True, eq=False)
class LabelledImages:
    """The labelled rows of some shards as lazy Ray Data pipelines, one per split."""

    shards: int
    rows: dict[str, int]  # ok rows with a label, per split (decode failures not yet subtracted)
    label_mean: float  # over the training split's rows
    label_std: float
    vote_spread: float  # mean std of the training rows' vote distributions (1 without votes)
    has_votes: bool
    build: Any  # split code -> ray.data.Dataset of KEY, SPLIT, SCORE, (VOTES), PIXELS

    def split(self, code: int) -> Any:
        return self.build(code)


def labelled_images(inputs: Sequence[str], labels: LabelTable, config: FinetuneConfig, join_on: str = "key",
                    storage_options: Mapping[str, Any] | None = None, decode: DecodeConfig | None = None,
                    read_cpus: float = 0.5, cache: bool = False) -> LabelledImages:
    """The shards' labelled images, split by key hash. Without ``cache`` one pass over the shards' rows (no
    decode) counts them and each split is read and decoded again whenever it is iterated; with it, every
    labelled image is decoded once into the object store (spilled to disk when full) and counted there."""
    import ray

    from pipeline.io.shards import list_shards
    from pipeline.models.clip import image_geometry
    from pipeline.stages.tasks import decode_images

    shards = list_shards(inputs, storage_options)
    if not shards:
        raise InputError(f"no shards under {list(inputs)}")
    items = [{"unit": "finetune", "name": s.name, "tar": s.tar or "", "sidecar": s.sidecar or ""} for s in shards]
    image_size, interpolation = image_geometry(config.model)
    decode = decode or DecodeConfig()
    storage = dict(storage_options or {})
    label_arrays = _label_arrays(labels)
    split_args = dict(labels=label_arrays, join_on=join_on, val_fraction=config.val_fraction,
                      test_fraction=config.test_fraction, seed=config.seed)

    def read() -> Any:
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # The same rows in the same order every epoch and every attempt: a resumed or repeated run sees
        # the batches an uninterrupted one does.
        ds.context.execution_options.preserve_order = True
        return ds.map_batches(_read_shard, fn_kwargs={"storage_options": storage, "rows_per_batch": decode.batch_size},
                              batch_size=1, batch_format="numpy", num_cpus=read_cpus)

    columns = (KEY, SPLIT, SCORE, PIXELS) + ((VOTES,) if labels.votes is not None else ())

    def decoded(codes: tuple[int, ...]) -> Any:
        ds = read().map_batches(_labelled, batch_format="numpy", batch_size=None, num_cpus=read_cpus,
                                fn_kwargs={**split_args, "splits": codes, "keep_image": True})
        ds = ds.map_batches(decode_images, fn_kwargs={"decode_config": decode, "image_size": image_size,
                                                      "interpolation": interpolation},
                            batch_size=None, batch_format="numpy", num_cpus=read_cpus)
        return ds.map_batches(_decoded, batch_format="numpy", batch_size=None, num_cpus=read_cpus,
                              fn_kwargs={"columns": columns})

    if cache:
        everything = decoded((TRAIN, VALIDATION, TEST)).materialize()
        # Each split held apart once: iterating a materialized split runs no task, where a filter run every
        # epoch would start worker processes again each time (Ray reaps idle ones within a second).
        cached = {code: everything.map_batches(_only_split, batch_format="numpy", batch_size=None, num_cpus=0.1,
                                               fn_kwargs={"code": code}).materialize() for code in SPLIT_NAMES}
        del everything
        counted = cached[TRAIN].union(cached[VALIDATION], cached[TEST])

        def build(code: int) -> Any:
            return cached[code]
    else:
        counted = read().map_batches(_labelled, batch_format="numpy", batch_size=None, num_cpus=read_cpus,
                                     fn_kwargs={**split_args, "splits": (TRAIN, VALIDATION, TEST),
                                                "keep_image": False})

        def build(code: int) -> Any:
            return decoded((code,))
    frame = counted.select_columns([KEY, SPLIT]).to_pandas()
    rows = {name: int((frame[SPLIT] == code).sum()) for code, name in SPLIT_NAMES.items()} if len(frame) else \
        {name: 0 for name in SPLIT_NAMES.values()}
    if not len(frame):
        raise InputError(f"no ok image in the {len(shards)} shards matches a label (joined on {join_on!r}); "
                         "try --join-on url_stem or check the keys")
    if rows["train"] < 2 or rows["val"] < 2:
        raise InputError(f"too few labelled images to train and validate: {rows} (need >= 2 in train and val)")
    train_keys = frame[KEY][frame[SPLIT] == TRAIN].to_numpy(dtype=object)
    positions = _label_index(label_arrays).get_indexer(train_keys.tolist())
    train_scores = labels.scores[positions]
    spread = 1.0
    if labels.votes is not None:
        share = labels.votes[positions] / labels.votes[positions].sum(axis=1, keepdims=True)
        bins = np.arange(1, AVA_VOTE_BINS + 1)
        centre = (share * bins).sum(axis=1, keepdims=True)
        spread = float(np.sqrt((share * (bins - centre) ** 2).sum(axis=1)).mean())
    return LabelledImages(len(shards), rows, float(train_scores.mean()), float(train_scores.std(ddof=1)) or 1.0,
                          spread, labels.votes is not None, build)


# -- the model -----------------------------------------------------------------------------------


def _torch() -> Any:
    import torch

    return torch


def build_model(config: FinetuneConfig, output_mean: float, output_scale: float, initial_sigma: float,
                search_dirs: Sequence[str] = (), storage_options: Mapping[str, Any] | None = None) -> Any:
    """An :class:`AestheticModel` on CPU in fp32: the configured CLIP's image tower, a fresh head (seeded)."""
    from pipeline.models.clip import load_clip
    from pipeline.training.finetune_model import AestheticModel

    torch = _torch()
    model_config = dataclasses.replace(config.model, precision="fp32", device="cpu")
    clip = load_clip(model_config, search_dirs=search_dirs, storage_options=storage_options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = AestheticModel(clip.model.visual, config, clip.embed_dim, clip.mean, clip.std,
                                         output_mean, output_scale, initial_sigma)
    model.set_trainable(config.trainable_blocks)
    return model, clip


def _augment(images: Any, config: FinetuneConfig, generator: Any) -> Any:
    """Light augmentations of a normalised (B, 3, S, S) batch, seeded: a random crop resized back, a flip."""
    torch = _torch()
    import torch.nn.functional as F

    if config.crop_scale < 1:
        size = images.shape[-1]
        side = max(1, int(round(size * config.crop_scale)))
        crops = []
        for image in images:
            top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=generator))
            crops.append(image[:, top:top + side, left:left + side])
        images = F.interpolate(torch.stack(crops), size=(size, size), mode="bilinear", align_corners=False)
    if config.flip:
        flip = torch.rand(len(images), generator=generator) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)
    return images


def _optimizer(stage: Any, model: Any, config: FinetuneConfig) -> Any:
    torch = _torch()
    tower = [p for p in model.visual.parameters() if p.requires_grad]
    head = list(model.head.parameters())
    groups = [{"params": tower, "lr": stage.lr * stage.tower_lr_scale}, {"params": head, "lr": stage.lr * config.head_lr_scale},
              {"params": list(model.objective.parameters()), "lr": stage.lr * config.head_lr_scale,
               "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]
    for group in groups:
        group["base_lr"] = group["lr"]
    decay = {} if stage.weight_decay is None else {"weight_decay": stage.weight_decay}
    if stage.optimizer == "adamw":
        return torch.optim.AdamW(groups, **decay)
    if stage.optimizer == "adam":
        return torch.optim.Adam(groups, **decay)
    return torch.optim.SGD(groups, lr=stage.lr, momentum=stage.momentum, **decay)


def _warm_up(optimizer: Any, stage: Any, step: int) -> None:
    factor = min(1.0, (step + 1) / stage.warmup_steps) if stage.warmup_steps else 1.0
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


# -- the training loop (runs in each Ray Train worker) -------------------------------------------


def _batch_tensors(batch: Mapping[str, Any], device: Any, has_votes: bool) -> tuple[Any, Any, Any]:
    torch = _torch()
    pixels = torch.as_tensor(np.ascontiguousarray(batch[PIXELS])).to(device)
    scores = torch.as_tensor(np.asarray(batch[SCORE], dtype=np.float32)).to(device)
    votes = torch.as_tensor(np.asarray(batch[VOTES], dtype=np.float32)).to(device) if has_votes else None
    return pixels, scores, votes


def _autocast(device: Any, enabled: bool) -> Any:
    torch = _torch()
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def split_metrics(predictions: np.ndarray, labels: np.ndarray, label_kind: str, threshold: float,
                  bce: bool) -> dict[str, float]:
    from pipeline.evaluate import score_metrics

    if label_kind == LabelKind.BINARY:
        return score_metrics(predictions, labels, threshold=0.5, prediction_threshold=0.0 if bce else 0.5)
    return score_metrics(predictions, labels, threshold=threshold)


def _gather(values: Any) -> list[Any]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, values)
        return gathered
    return [values]


def predict_batches(model: Any, batches: Any, device: Any, amp: bool, take: Any = None) -> dict[str, np.ndarray]:
    """Keys, labels and predictions of ``batches`` (an iterator of numpy batches) by ``model`` in eval mode;
    ``take(i)`` says whether batch i is this process's to score."""
    torch = _torch()
    keys, labels, predictions = [], [], []
    model.eval()
    with torch.no_grad():
        for index, batch in enumerate(batches):
            if take is not None and not take(index):
                continue
            pixels, scores, _ = _batch_tensors(batch, device, False)
            with _autocast(device, amp):
                predicted = model.predict_normalised(model.normalised(pixels))
            keys.append(np.asarray(batch[KEY], dtype=object))
            labels.append(scores.cpu().numpy().astype(np.float64))
            predictions.append(predicted.float().cpu().numpy().astype(np.float64))

    def join(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)

    return {"keys": join(keys, object), "labels": join(labels, np.float64),
            "predictions": join(predictions, np.float64)}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _await_reports_taken(timeout_s: float = 60) -> None:
    """Wait until Ray Train's controller has taken this worker's reports. A report still queued in a worker that
    dies is lost, and the checkpoint with it (the controller registers one only once every rank's report of it
    arrived): the injected fault comes after them, so the run resumes from the checkpoint the test expects."""
    from ray.train.v2._internal.execution.context import get_train_context

    reports = get_train_context().get_result_queue()
    deadline = time.monotonic() + timeout_s
    while reports.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.05)


def finetune_worker(loop: Mapping[str, Any]) -> None:
    """One Ray Train worker: resume from the latest checkpoint if any, then the schedule's remaining epochs."""
    import ray.train
    import ray.train.torch

    torch = _torch()
    config: FinetuneConfig = loop["config"]
    schedule: Schedule = loop["schedule"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    has_votes = loop["has_votes"]

    module, _ = build_model(config, loop["output_mean"], loop["output_scale"], loop["initial_sigma"],
                            loop["search_dirs"], loop["storage_options"])
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_epoch": 0, "best_srcc": -math.inf, "stale": 0,
                             "optimizer": None, "stage_step": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = checkpoints.load(checkpoint, CHECKPOINT_FILE)
        module.load_state_dict(state["model"])
        state["resumed_after"] = [*state.get("resumed_after", []), state["epoch"]]
        log.info("rank %d resumes after epoch %d", rank, state["epoch"])
    module.to(device)
    # The buffers (the pixel normalisation) are the same on every worker: nothing to broadcast each step.
    model = ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"broadcast_buffers": False})
    uneven = model.join if isinstance(model, torch.nn.parallel.DistributedDataParallel) else contextlib.nullcontext

    train_shard = ray.train.get_dataset_shard(TRAIN_DATASET)
    val_data = ray.train.get_dataset_shard(VALIDATION_DATASET)
    batch_size = loop["worker_batch_size"]
    trainable = [p for p in module.parameters() if p.requires_grad]
    fault = loop.get("fault_injection")

    optimizer, optimizer_stage = None, None
    stage_step = state["stage_step"]
    for epoch in range(state["epoch"] + 1, schedule.epochs + 1):
        stage_index, stage, loss_name = schedule.at(epoch)
        if optimizer_stage != stage_index:
            optimizer = _optimizer(stage, module, config)
            resumed_here = state["optimizer"] is not None and state.get("optimizer_stage") == stage_index
            if resumed_here:
                optimizer.load_state_dict(state["optimizer"])
            else:
                stage_step = 0
            state["optimizer"] = None
            optimizer_stage = stage_index
        torch.manual_seed(config.seed + 7919 * epoch + rank)  # dropout, per epoch: the same after a resume
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 1000 * epoch + rank)
        model.train()
        sums = torch.zeros(2, dtype=torch.float64)
        epoch_started = time.perf_counter()
        with uneven():
            for step, batch in enumerate(train_shard.iter_batches(
                    batch_size=batch_size, batch_format="numpy", local_shuffle_buffer_size=4 * batch_size,
                    local_shuffle_seed=config.seed + 1000 * epoch + rank)):
                if (fault and rank == fault.get("rank", 0) and epoch == fault["epoch"] and step == fault["step"]
                        and not os.path.exists(fault["marker"])):
                    open(fault["marker"], "w").close()
                    _await_reports_taken()
                    os._exit(1)  # a worker dies mid-epoch, as one killed by the OOM killer or a lost node would
                pixels, scores, votes = _batch_tensors(batch, device, has_votes)
                images = _augment(module.normalised(pixels), config, generator)
                _warm_up(optimizer, stage, stage_step)
                optimizer.zero_grad(set_to_none=True)
                with _autocast(device, config.amp):
                    loss = model(images, loss_name, scores, votes)
                loss.backward()
                if schedule.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, schedule.grad_clip)
                optimizer.step()
                stage_step += 1
                sums[0] += float(loss.detach()) * len(scores)
                sums[1] += len(scores)

        train_seconds = time.perf_counter() - epoch_started
        gathered = _gather(predict_batches(module, val_data.iter_batches(batch_size=max(batch_size, 64),
                                                                          batch_format="numpy"),
                                           device, config.amp, take=lambda i: i % world == rank))
        train_sums = _gather(sums.tolist())
        val = {name: np.concatenate([part[name] for part in gathered]) for name in ("keys", "labels", "predictions")}
        metrics_val = split_metrics(val["predictions"], val["labels"], loop["label_kind"], config.threshold,
                                    loss_name == "bce")
        srcc = metrics_val["srcc"] if math.isfinite(metrics_val["srcc"]) else -math.inf
        train_loss = sum(s[0] for s in train_sums) / max(1.0, sum(s[1] for s in train_sums))
        improved = srcc > state["best_srcc"] or state["best_epoch"] == 0
        if improved:
            state.update(best_epoch=epoch, best_srcc=srcc, stale=0)
        else:
            state["stale"] += 1
        record = {"epoch": epoch, "stage": stage_index, "loss": loss_name, "train_loss": train_loss,
                  "val_srcc": metrics_val["srcc"], "val_plcc": metrics_val["plcc"], "val_mse": metrics_val["mse"],
                  "emd_sigma": float(module.objective.sigma.detach()),
                  # This worker's training throughput (read and decode included where not cached).
                  "images_per_s_per_worker": float(sums[1]) / max(train_seconds, 1e-9),
                  "worker_peak_rss_mb": _peak_rss_mb(),
                  "gpu_peak_mb": (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
                  "seconds": time.perf_counter() - epoch_started}
        state["history"].append(record)
        stop = config.patience is not None and state["stale"] >= config.patience
        metrics = {**record, "val_srcc_for_selection": srcc if math.isfinite(srcc) else -1e9,
                   "best_epoch": state["best_epoch"], "stopped": stop}
        checkpoints.report(metrics, {
            **state, "epoch": epoch, "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
            "optimizer": optimizer.state_dict(), "optimizer_stage": stage_index, "stage_step": stage_step,
        } if rank == 0 else None, CHECKPOINT_FILE)
        if stop:
            break


# -- the driver ----------------------------------------------------------------------------------


@dataclass(eq=False)
class FinetuneResult:
    record: dict[str, Any]
    clip_path: str
    head_path: str
    record_path: str
    predictions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # split -> keys, labels, predictions


def _use_gpu(use_gpu: bool | None, device: str) -> bool:
    if use_gpu is not None:
        return use_gpu
    if device == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) >= 1
    return device == "cuda"


def _train_storage(storage_path: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Ray Train's storage arguments: an object store is reached through the job's own filesystem (its endpoint,
    retries and options), not through pyarrow's reading of the environment."""
    from pipeline.io.storage import filesystem, is_local, pyarrow_filesystem

    if is_local(storage_path):
        return {"storage_path": storage_path}
    # No listing cache and no shared instance: Ray Train asks whether a run's snapshot exists, and a cached
    # listing from an earlier run in the same process would say no, so the rerun would start from scratch.
    options = {**(storage_options or {}), "use_listings_cache": False, "skip_instance_cache": True}
    fs, path = filesystem(storage_path, options)
    return {"storage_path": path, "storage_filesystem": pyarrow_filesystem(fs)}


def _write_file(path: str, data: bytes, storage_options: Mapping[str, Any] | None) -> str:
    from pipeline.io.storage import filesystem, write_bytes_atomic

    fs, inner = filesystem(path, storage_options)
    write_bytes_atomic(fs, inner, data)
    return hashlib.sha256(data).hexdigest()


def _safetensors_bytes(state_dict: Mapping[str, Any]) -> bytes:
    from safetensors.torch import save

    return save({key: value.detach().cpu().contiguous() for key, value in state_dict.items()})


def finetune(inputs: Sequence[str], labels: LabelTable, out: str, config: FinetuneConfig = FinetuneConfig(),
             schedule: Schedule | None = None, *, workers: int = 1, join_on: str = "key",
             ray_address: str | None = None, cpus_per_worker: float = 1.0, use_gpu: bool | None = None,
             storage_path: str | None = None, run_name: str | None = None, max_failures: int = 3,
             search_dirs: Sequence[str] = (), storage_options: Mapping[str, Any] | None = None,
             decode: DecodeConfig | None = None, read_cpus: float = 0.5, cache: bool = False,
             fault_injection: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None
             ) -> FinetuneResult:
    """Fine-tune on the labelled images of ``inputs`` and write ``out``/{clip,head}.safetensors + finetune.json.

    ``storage_path`` keeps Ray Train's checkpoints (default: a temporary folder, removed afterwards, so nothing
    resumes); with it, a rerun with the same ``run_name`` (default: derived from ``out``) resumes.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_session import connect_ray
    from pipeline.training.losses import check_losses

    torch = _torch()
    started = time.monotonic()
    schedule = schedule or load_schedule()
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    check_losses(schedule.losses, labels.kind, (float(np.min(labels.scores)), float(np.max(labels.scores))))
    if labels.kind == LabelKind.BINARY and "bce" not in schedule.losses:
        log.warning("keep/trash labels trained by regression on 0/1 (the schedule has no bce stage)")
    connect_ray(ray_address)

    data = labelled_images(inputs, labels, config, join_on, storage_options, decode, read_cpus, cache)
    if min(data.rows["train"], data.rows["val"]) < workers:
        raise InputError(f"too few labelled images for {workers} workers: {data.rows}")
    log.info("labelled images per split %s in %d shards", data.rows, data.shards)
    bce = schedule.losses == {"bce"}
    output_mean, output_scale = (0.0, 1.0) if bce else (data.label_mean, data.label_std)
    loop = dict(config=config, schedule=schedule, has_votes=data.has_votes and "emd" in schedule.losses,
                label_kind=labels.kind, output_mean=output_mean, output_scale=output_scale,
                initial_sigma=data.vote_spread, worker_batch_size=max(1, math.ceil(config.batch_size / workers)),
                search_dirs=tuple(search_dirs), storage_options=dict(storage_options or {}),
                fault_injection=dict(fault_injection) if fault_injection else None)
    train_ds, val_ds = data.split(TRAIN), data.split(VALIDATION)
    use_gpu = _use_gpu(use_gpu, config.model.device)
    owned_storage = storage_path is None
    storage_path = storage_path or tempfile.mkdtemp(prefix="aesthetics-finetune-")
    run_name = run_name or "finetune-" + hashlib.sha256(out.encode()).hexdigest()[:12]
    try:
        trainer = TorchTrainer(
            finetune_worker, train_loop_config=loop,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(name=run_name, **_train_storage(storage_path, storage_options),
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 checkpoint_config=CheckpointConfig(
                                     num_to_keep=2, checkpoint_score_attribute="val_srcc_for_selection",
                                     checkpoint_score_order="max")),
            datasets={TRAIN_DATASET: train_ds, VALIDATION_DATASET: val_ds},
            dataset_config=DataConfig(datasets_to_split=[TRAIN_DATASET]))
        fit_started = time.monotonic()
        result = trainer.fit()
        fit_seconds = time.monotonic() - fit_started
        if result.error is not None:
            raise result.error
        candidates = [(metrics.get("val_srcc_for_selection", -math.inf), metrics.get("epoch", 0), ckpt)
                      for ckpt, metrics in (result.best_checkpoints or [])]
        if not candidates:
            raise RuntimeError("Ray Train finished without a checkpoint")
        # Best SRCC; among equals the earliest epoch, as the workers' own bookkeeping picks.
        best_checkpoint = max(candidates, key=lambda c: (c[0], -c[1]))[2]
        best = checkpoints.load(best_checkpoint, CHECKPOINT_FILE)
        latest = checkpoints.load(result.checkpoint, CHECKPOINT_FILE)
    finally:
        if owned_storage:
            shutil.rmtree(storage_path, ignore_errors=True)

    model, clip = build_model(config, output_mean, output_scale, data.vote_spread, search_dirs, storage_options)
    model.load_state_dict(best["model"])
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    predictions, metrics = {}, {}
    for code in (VALIDATION, TEST):
        if data.rows[SPLIT_NAMES[code]]:
            split_ds = val_ds if code == VALIDATION else data.split(code)
            predicted = predict_batches(model, split_ds.iter_batches(batch_size=64, batch_format="numpy"),
                                        device, config.amp)
            predictions[SPLIT_NAMES[code]] = predicted
            metrics[SPLIT_NAMES[code]] = split_metrics(predicted["predictions"], predicted["labels"], labels.kind,
                                                       config.threshold, bce)

    model.to("cpu")
    full = clip.model.state_dict()
    full.update({f"visual.{key}": value for key, value in model.visual.state_dict().items()})
    out = out.rstrip("/")
    clip_path, head_path, record_path = (f"{out}/{name}" for name in (CLIP_FILE, HEAD_FILE, RECORD_FILE))
    clip_sha = _write_file(clip_path, _safetensors_bytes(full), storage_options)
    head_state = model.export_head()
    head_sha = _write_file(head_path, _safetensors_bytes(head_state), storage_options)
    from pipeline.models.heads import detect_head_format

    record = finite_or_none({
        "format": RECORD_FORMAT,
        "clip_file": clip_path, "clip_sha256": clip_sha, "clip_arch": config.scored_arch,
        "head_file": head_path, "head_sha256": head_sha, "head_format": detect_head_format(head_state).value,
        "embed_dim": model.embed_dim, "base_model": clip.identity, "label_kind": labels.kind,
        "output": "logit of keep (boundary 0)" if bce else "score in label units",
        "config": dataclasses.asdict(config), "schedule": schedule.to_dict(),
        "best_epoch": int(best["best_epoch"]), "epochs_run": int(latest["epoch"]), "history": latest["history"],
        "rows": data.rows, "metrics": metrics, "resumed_after_epochs": latest.get("resumed_after", []), "emd_sigma": float(model.objective.sigma.detach()),
        "workers": workers, "use_gpu": use_gpu, "shards": data.shards, "run_name": run_name,
        "train_storage": None if owned_storage else storage_path,
        "seconds": round(time.monotonic() - started, 2), "fit_seconds": round(fit_seconds, 2),
        "torch": torch.__version__,
        "score_with": (f"aesthetics score --model {config.scored_arch} --pretrained {clip_path} "
                       f"--pretrained-sha256 {clip_sha} --head {head_path},sha256={head_sha}"),
        **(extra or {}),
    })
    _write_file(record_path, json.dumps(record, indent=2, sort_keys=True, allow_nan=False).encode(), storage_options)
    return FinetuneResult(record, clip_path, head_path, record_path, predictions)
