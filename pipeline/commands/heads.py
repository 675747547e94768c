"""`aesthetics train-head`, `evaluate` and `select-uncertain`: learn heads from labels, measure score columns
against labels, and pick the images to label next. Thin shells over :mod:`pipeline.training` and
:mod:`pipeline.evaluate`; the heavy imports happen when a command runs, not when the parser is built."""

from __future__ import annotations

import argparse
import math
from typing import Any

from pipeline.commands.options import storage_option
from pipeline.errors import ExitCode

TRAIN_EPILOG = """\
examples:
  # AVA: mean vote regression on embeddings written by `aesthetics score --write-embeddings`
  aesthetics train-head --scores s3://bucket/ava-scored --labels AVA.txt --join-on url_stem --out ava-l14.pth
  # EMD over the vote distribution, an MLP in the LAION V2 layout, a small learning-rate grid on Ray
  aesthetics train-head --scores OUT --labels AVA.txt --arch mlp --loss emd --lr 1e-3 --lr 3e-4 --ray --out h.pth
  # keep/trash: the better half of AVA is "keep"; list 200 unlabelled images nearest the boundary
  aesthetics train-head --scores OUT --labels AVA.txt --keep-percentile 50 --uncertain 200 --out keep.pth
  # more labelled rows than fit one machine: data-parallel over 8 Ray Train workers (a GPU each on a GPU cluster)
  aesthetics train-head --scores OUT --labels AVA.txt --workers 8 --train-storage s3://bucket/runs --out big.pth
then score with it:  aesthetics score ... --head sac+logos+ava1-l14-linearMSE --head h.pth,sha256=<printed sha256>
"""


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"hidden widths must be comma-separated integers, got {text!r}") from None


def _add_common(parser: argparse.ArgumentParser, many: bool = False) -> None:
    if many:
        parser.add_argument("--scores", required=True, action="append", metavar="[NAME=]OUTPUT",
                            help="a scoring job's output prefix (committed units only) or a Parquet file/folder; "
                                 "repeat to compare outputs (e.g. frozen=out/heads finetuned=out/finetuned) on "
                                 "the labelled rows they all scored")
    else:
        parser.add_argument("--scores", required=True,
                            help="a scoring job's output prefix (committed units only) or a Parquet file/folder")
    parser.add_argument("--join-on", default="key",
                        help="match labels to scored rows by 'key' (default), 'url_stem' (the url's file name "
                             "without extension, e.g. AVA image ids) or any column of the scored data")
    parser.add_argument("--storage-option", action="append", type=storage_option,
                        help="fsspec option KEY=VALUE (no credentials)")


def _add_labels(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--labels", required=required,
                        help="AVA.txt, a CSV key,score[,group], or a keep/trash CSV key,label[,group]")
    parser.add_argument("--labels-format", default="auto", choices=("auto", "ava", "csv", "keep-trash"))


def register(commands: Any) -> None:
    train = commands.add_parser(
        "train-head", help="train a linear or MLP head on stored CLIP embeddings against labels",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(train)
    _add_labels(train)
    train.add_argument("--out", required=True, help="head file to write (.pth); its record goes beside it (.json)")
    train.add_argument("--arch", action="append", choices=("linear", "mlp", "relu-mlp"),
                       help="linear (V1 format), mlp (V2 linearMSE layout), relu-mlp (reluMSE); repeat for a grid")
    train.add_argument("--loss", action="append", choices=("auto", "mse", "l1", "emd", "bce"),
                       help="mse/l1 on the score, emd on the vote distribution (AVA), bce on keep/trash; "
                            "default auto: bce for keep/trash labels, else mse")
    train.add_argument("--lr", action="append", type=float, help="learning rate (default 1e-3); repeat for a grid")
    train.add_argument("--weight-decay", action="append", type=float, help="AdamW weight decay (default 1e-4)")
    train.add_argument("--hidden", type=_widths, help="4 MLP widths, default 1024,128,64,16 (LAION's)")
    train.add_argument("--dropout", type=float)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--max-epochs", type=int)
    train.add_argument("--patience", type=int, help="epochs without a better validation loss before stopping")
    train.add_argument("--val-fraction", type=float)
    train.add_argument("--test-fraction", type=float)
    train.add_argument("--seed", type=int)
    train.add_argument("--threshold", type=float, help="good/bad cut for the accuracy metric (default 5, AVA)")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"))
    keep = train.add_mutually_exclusive_group()
    keep.add_argument("--keep-threshold", type=float, help="keep/trash mode: keep where score >= this")
    keep.add_argument("--keep-percentile", type=float,
                      help="keep/trash mode: keep images at or above this percentile of the label scores")
    train.add_argument("--ray", action="store_true", help="run the grid's trials as Ray tasks")
    train.add_argument("--workers", type=int, metavar="N",
                       help="data-parallel training with Ray Train over N workers; the embeddings are streamed, "
                            "never gathered (one config only: no grid, no --uncertain)")
    train.add_argument("--ray-address",
                       help="Ray cluster to use with --ray or --workers (default: local, or RAY_ADDRESS)")
    train.add_argument("--cpus-per-trial", type=float, default=1.0,
                       help="CPUs each Ray trial (with --workers: each Ray Train worker) asks for")
    train.add_argument("--train-storage",
                       help="with --workers: where Ray Train keeps its checkpoint (default: a temporary local "
                            "folder; give a shared path such as s3://bucket/prefix on a multi-node cluster)")
    train.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs each Ray trial asks for")
    train.add_argument("--uncertain", type=int, default=0, metavar="N",
                       help="also list the N unlabelled scored images nearest the decision boundary")
    train.add_argument("--uncertain-out", help="where that list goes (default: <out stem>-uncertain.csv)")
    train.add_argument("--max-cosine", type=float,
                       help="skip uncertain candidates more similar than this to one already listed (e.g. 0.95)")
    train.set_defaults(run=cmd_train_head)

    evaluate = commands.add_parser("evaluate", help="compare score columns with labels (PLCC, SRCC, MSE, "
                                                    "accuracy, burst top-1/MRR), as a table and a plot")
    _add_common(evaluate, many=True)
    _add_labels(evaluate)
    evaluate.add_argument("--column", action="append",
                          help="score column to evaluate; repeat for several (default: every score column)")
    evaluate.add_argument("--threshold", type=float,
                          help="label good/bad cut for accuracy (default 5 for scores, 0.5 for keep/trash)")
    evaluate.add_argument("--prediction-threshold", type=float,
                          help="score cut for accuracy (default: the label threshold)")
    evaluate.add_argument("--group-column",
                          help="scored column with a group (burst) id, when the labels have no group column")
    evaluate.add_argument("--table", help="write the metrics as CSV here (and Markdown beside it)")
    evaluate.add_argument("--plot", help="write a PNG plot here")
    evaluate.set_defaults(run=cmd_evaluate)

    select = commands.add_parser("select-uncertain",
                                 help="list unlabelled images whose score is nearest a decision boundary")
    _add_common(select)
    source = select.add_mutually_exclusive_group(required=True)
    source.add_argument("--column", help="score column to use (e.g. aesthetic_score)")
    source.add_argument("--head", help="head file applied to the stored embeddings")
    select.add_argument("--boundary", type=float, required=True,
                        help="decision boundary: e.g. 5 for AVA-scale scores, 0 for a bce (keep/trash) head")
    select.add_argument("--count", type=int, default=100)
    _add_labels(select, required=False)
    select.add_argument("--max-cosine", type=float, help="skip near-duplicates of images already listed")
    select.add_argument("--out", required=True, help="CSV to write: key,score,margin,label(empty),...")
    select.set_defaults(run=cmd_select_uncertain)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(args.storage_option or [])


def _train_config(args: argparse.Namespace) -> Any:
    from pipeline.training.train_head import TrainConfig

    values = {name: getattr(args, name) for name in (
        "hidden", "dropout", "batch_size", "max_epochs", "patience", "val_fraction", "test_fraction", "seed",
        "threshold", "device") if getattr(args, name) is not None}
    for name in ("arch", "loss", "lr", "weight_decay"):
        if getattr(args, name):
            values[name] = getattr(args, name)[0]
    return TrainConfig(**values)


def _grid(args: argparse.Namespace) -> dict[str, list[Any]]:
    return {name: list(getattr(args, name)) for name in ("arch", "loss", "lr", "weight_decay")
            if getattr(args, name) and len(getattr(args, name)) > 1}


def _fmt(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def cmd_train_head(args: argparse.Namespace) -> int:
    from pipeline.training.run import run_train_head

    report = run_train_head(
        args.scores, args.labels, args.out, label_format=args.labels_format, join_on=args.join_on,
        keep_threshold=args.keep_threshold, keep_percentile=args.keep_percentile, config=_train_config(args),
        grid=_grid(args), use_ray=args.ray, ray_address=args.ray_address, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, uncertain_count=args.uncertain,
        uncertain_out=args.uncertain_out, max_cosine=args.max_cosine, workers=args.workers,
        train_storage=args.train_storage, storage_options=_options(args))
    print(f"labelled rows: {report.labelled_rows} ({report.unmatched_labels} labels had no scored ok row)")
    from tabulate import tabulate

    print(tabulate([(t.config.arch, t.config.loss, f"{t.config.lr:g}", f"{t.config.weight_decay:g}",
                     f"{t.best_epoch}/{t.epochs_run}", _fmt(t.metrics["val"]["srcc"]), _fmt(t.metrics["val"]["plcc"]),
                     _fmt(t.metrics["val"]["mse"]), _fmt(t.metrics["val"]["accuracy"])) for t in report.trials],
                   headers=["arch", "loss", "lr", "weight_decay", "best epoch", "val SRCC", "val PLCC", "val MSE",
                            "val accuracy"], tablefmt="pipe", disable_numparse=True))
    record = report.record
    test = record["metrics"].get("test")
    if test:
        print(f"best head on the test split: SRCC {_fmt(test['srcc'])}, PLCC {_fmt(test['plcc'])}, "
              f"MSE {_fmt(test['mse'])}, accuracy {_fmt(test['accuracy'])} (n={test['n']})")
    print(f"head:   {record['head_file']} ({record['head_format']}, {record['embed_dim']}-d)")
    print(f"sha256: {record['sha256']}")
    print(f"record: {record['record_file']}")
    print(f"score with it: aesthetics score ... --head {record['head_file']},sha256={record['sha256']}")
    if report.uncertain_file:
        print(f"images to label next: {report.uncertain_file} (fill in the label column with keep or trash)")
    return ExitCode.OK


def _named_outputs(values: list[str]) -> str | dict[str, str]:
    """One output as given; several as name -> output (``NAME=OUTPUT``, else ``output1``, ``output2``...)."""
    import re

    from pipeline.errors import UsageError

    pairs = []
    for i, value in enumerate(values, 1):
        match = re.fullmatch(r"([A-Za-z][\w.-]*)=(.+)", value)  # a path with '=' in it has a '/' before it
        pairs.append((match.group(1), match.group(2)) if match else (f"output{i}", value))
    if len(pairs) == 1:
        return pairs[0][1]
    named = dict(pairs)
    if len(named) < len(pairs):
        raise UsageError("--scores: each output needs its own name")
    return named


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate import run_evaluate

    evaluation = run_evaluate(
        _named_outputs(args.scores), args.labels, label_format=args.labels_format, columns=args.column, join_on=args.join_on,
        threshold=args.threshold, prediction_threshold=args.prediction_threshold, group_column=args.group_column,
        table_path=args.table, plot_path=args.plot, storage_options=_options(args))
    print(f"{len(evaluation.frame)} labelled rows ({evaluation.unmatched_labels} labels had no scored ok row), "
          f"accuracy threshold {evaluation.threshold:g}")
    print(evaluation.to_markdown())
    for path, what in ((args.table, "table"), (args.plot, "plot")):
        if path:
            print(f"{what}: {path}")
    return ExitCode.OK


def cmd_select_uncertain(args: argparse.Namespace) -> int:
    from pipeline.training.active import select_uncertain, write_label_sheet
    from pipeline.training.labels import read_labels

    labelled = ()
    if args.labels:
        labelled = read_labels(args.labels, args.labels_format, _options(args)).keys
    sheet = select_uncertain(args.scores, args.boundary, args.count, column=args.column, head_path=args.head,
                             labelled_keys=labelled, join_on=args.join_on, max_cosine=args.max_cosine,
                             storage_options=_options(args))
    write_label_sheet(sheet, args.out, _options(args))
    print(f"{len(sheet)} images nearest {args.boundary:g} written to {args.out} "
          f"(margins {_fmt(float(sheet['margin'].min()) if len(sheet) else math.nan)}"
          f"..{_fmt(float(sheet['margin'].max()) if len(sheet) else math.nan)}); fill in 'label' with keep or trash")
    return ExitCode.OK
