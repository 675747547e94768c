"""`aesthetics finetune`: fine-tune the CLIP image tower with an aesthetic head on Ray Train, from WebDataset
shards and labels (see :mod:`pipeline.training.finetune`). A thin shell: the heavy imports happen when it runs."""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

from pipeline.commands.options import storage_option
from pipeline.errors import ExitCode

EPILOG = """\
examples:
  # seed 001's recipe (the default schedule) on AVA, the whole ViT-L/14 tower, 8 GPU workers, resumable
  aesthetics finetune --input s3://bucket/ava-shards/ --labels AVA.txt --join-on url_stem \\
      --pretrained s3://bucket/weights/open_clip_model.safetensors --pretrained-sha256 <hex> \\
      --workers 8 --train-storage s3://bucket/runs --out s3://bucket/ft/ava-l14
  # only the last 4 blocks, a LAION MLP head, a schedule of your own
  aesthetics finetune --input shards/ --labels scores.csv --trainable-blocks 4 --arch mlp \\
      --schedule my-schedule.yaml --out ft/
then score with it (the command is printed, with both sha256s):
  aesthetics score ... --model ViT-L-14-quickgelu --pretrained ft/clip.safetensors --pretrained-sha256 <hex> \\
      --head ft/head.safetensors,sha256=<hex>
"""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "finetune", help="fine-tune the CLIP image tower with an aesthetic head on Ray Train (seed 001's recipe)",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", required=True,
                        help="WebDataset shards: a folder/prefix, a glob or tars (repeatable)")
    parser.add_argument("--labels", required=True,
                        help="AVA.txt, a CSV key,score[,group], or a keep/trash CSV key,label[,group]")
    parser.add_argument("--labels-format", default="auto", choices=("auto", "ava", "csv", "keep-trash"))
    parser.add_argument("--join-on", default="key",
                        help="match labels to images by 'key' (default), 'url_stem' (AVA image ids) or a column")
    keep = parser.add_mutually_exclusive_group()
    keep.add_argument("--keep-threshold", type=float, help="keep/trash mode: keep where score >= this")
    keep.add_argument("--keep-percentile", type=float, help="keep/trash mode: keep at or above this percentile")
    parser.add_argument("--out", required=True,
                        help="folder/prefix for clip.safetensors, head.safetensors and finetune.json")
    parser.add_argument("--schedule", help="schedule YAML (default: seed 001's three stages, see the README)")
    parser.add_argument("--model", default="ViT-L-14-quickgelu",
                        help="open_clip architecture to start from ('tiny-random' for tests)")
    parser.add_argument("--pretrained", default="openai", help="open_clip tag or a path/URI of a weights file")
    parser.add_argument("--pretrained-sha256", help="pin for --pretrained when it is a file")
    parser.add_argument("--weights-dir", action="append", default=[], help="where to look for weights files")
    parser.add_argument("--trainable-blocks", type=int, metavar="N",
                        help="train only the tower's last N blocks (0: a head on the frozen tower); default all")
    parser.add_argument("--arch", choices=("linear", "mlp", "relu-mlp"), default="linear", help="head layout")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (split over the workers)")
    parser.add_argument("--head-lr-scale", type=float, default=1.0, help="head learning rate / tower learning rate")
    parser.add_argument("--patience", type=int, help="stop after N epochs without a better validation SRCC")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flip", action="store_true", help="augment: flip half the images")
    parser.add_argument("--crop-scale", type=float, default=1.0,
                        help="augment: random crops of this share of the side, resized back (1: off)")
    parser.add_argument("--no-amp", action="store_true", help="train in fp32 on GPU too (default: bf16 autocast)")
    parser.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this (overrides the file)")
    parser.add_argument("--warmup-steps", type=int, help="linear warm-up steps at each stage's start (overrides)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (a GPU each where there are GPUs)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--train-storage",
                        help="where Ray Train keeps checkpoints (local or s3://); a rerun with the same storage "
                             "and --run-name resumes. Default: a temporary folder, nothing resumes")
    parser.add_argument("--run-name", help="Ray Train run name (default: derived from --out)")
    parser.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before giving up")
    parser.add_argument("--cache", action="store_true",
                        help="decode the labelled images once into the object store instead of every epoch")
    parser.add_argument("--ray-address", help="Ray cluster (default: local, or RAY_ADDRESS)")
    parser.add_argument("--storage-option", action="append", type=storage_option,
                        help="fsspec option KEY=VALUE (no credentials)")
    parser.set_defaults(run=cmd_finetune)


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4f}"


def cmd_finetune(args: argparse.Namespace) -> int:
    from pipeline.config import ModelConfig
    from pipeline.training.finetune import FinetuneConfig, finetune
    from pipeline.training.labels import read_labels
    from pipeline.training.run import prepare_labels
    from pipeline.training.schedule import load_schedule

    options = dict(args.storage_option or [])
    pretrained = "" if args.model == "tiny-random" and args.pretrained == "openai" else args.pretrained
    model = ModelConfig(name=args.model, pretrained=pretrained or "openai", pretrained_sha256=args.pretrained_sha256,
                        device=args.device, seed=args.seed)
    config = FinetuneConfig(model=model, trainable_blocks=args.trainable_blocks, arch=args.arch,
                            batch_size=args.batch_size, head_lr_scale=args.head_lr_scale, patience=args.patience,
                            val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
                            flip=args.flip, crop_scale=args.crop_scale, amp=not args.no_amp)
    schedule = load_schedule(args.schedule, options)
    if args.grad_clip is not None:
        schedule = schedule.replace(grad_clip=args.grad_clip)
    if args.warmup_steps is not None:
        schedule = schedule.replace(stages=tuple(dataclasses.replace(stage, warmup_steps=args.warmup_steps)
                                                 for stage in schedule.stages))
    labels = prepare_labels(read_labels(args.labels, args.labels_format, options), args.keep_threshold,
                            args.keep_percentile)
    use_gpu = {"auto": None, "cpu": False, "cuda": True}[args.device]
    result = finetune(args.input, labels, args.out, config, schedule, workers=args.workers, join_on=args.join_on,
                      ray_address=args.ray_address, cpus_per_worker=args.cpus_per_worker, use_gpu=use_gpu,
                      storage_path=args.train_storage, run_name=args.run_name, max_failures=args.max_failures,
                      search_dirs=args.weights_dir, storage_options=options, cache=args.cache,
                      extra={"labels": args.labels, "inputs": args.input, "join_on": args.join_on})
    record = result.record
    print(f"labelled images per split: {record['rows']} in {record['shards']} shards, {record['workers']} workers")
    print("| epoch | stage | loss | train loss | val SRCC | val PLCC | images/s/worker |")
    print("|---|---|---|---|---|---|---|")
    for row in record["history"]:
        print(f"| {row['epoch']} | {row['stage']} | {row['loss']} | {_fmt(row['train_loss'])} | "
              f"{_fmt(row['val_srcc'])} | {_fmt(row['val_plcc'])} | {_fmt(row.get('images_per_s_per_worker'))} |")
    for split, metrics in record["metrics"].items():
        print(f"{split} (best epoch {record['best_epoch']}): SRCC {_fmt(metrics['srcc'])}, PLCC {_fmt(metrics['plcc'])}, "
              f"MSE {_fmt(metrics['mse'])} (n={metrics['n']})")
    print(f"clip:   {record['clip_file']}  sha256 {record['clip_sha256']}")
    print(f"head:   {record['head_file']}  sha256 {record['head_sha256']}")
    print(f"record: {result.record_path}")
    print(f"score with it: {record['score_with']}")
    return ExitCode.OK
