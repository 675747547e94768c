"""`aesthetics serve`: the page and HTTP API over a scored output, on Ray Serve (see :mod:`pipeline.serve`)."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import time
from typing import Any

from pipeline.commands.options import add_storage_options
from pipeline.errors import ExitCode, UsageError

TOKEN_ENV = "AESTHETICS_SERVE_TOKEN"


def _token(args: argparse.Namespace) -> tuple[str | None, bool]:
    """(token, generated here). A token is read from a file or the environment, never from the command line
    (which every user of the machine can read in the process list)."""
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as error:
            raise UsageError(f"serve: cannot read --token-file: {error}") from None
        return token, False
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip(), False
    if args.host is not None:
        return secrets.token_urlsafe(24), True
    return None, False


def config_from_args(args: argparse.Namespace):
    from pipeline.config import TINY_MODEL, ModelConfig
    from pipeline.serve.config import ServeConfig

    token, generated = _token(args)
    model = None
    if args.model or args.pretrained:
        if args.model == TINY_MODEL:
            model = ModelConfig(name=TINY_MODEL, precision=args.precision or "fp32")
        elif not (args.model and args.pretrained):
            raise UsageError("serve: --model and --pretrained go together")
        else:
            model = ModelConfig(name=args.model, pretrained=args.pretrained, pretrained_sha256=args.pretrained_sha256,
                                precision=args.precision or "fp16")
    config = ServeConfig(
        output=args.output, host=args.host or "127.0.0.1", port=args.port, token=token,
        storage_options=dict(args.storage_option or []), weights_dirs=tuple(args.weights_dir or ()), model=model,
        prompts=None if args.prompts == "none" else args.prompts,
        max_upload_bytes=int(args.max_upload_mb * 2**20), max_upload_pixels=args.max_upload_pixels,
        model_replicas=args.replicas, model_cpus=args.cpus, model_gpus=args.gpus, api_cpus=args.api_cpus,
        max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000.0)
    return config, generated


def cmd_serve(args: argparse.Namespace) -> int:
    from ray import serve

    from pipeline.ray_session import connect_ray
    from pipeline.serve.app import start
    from pipeline.serve.config import plan_model

    config, generated = config_from_args(args)
    spec = plan_model(config)  # reads the records and the prompt file before Ray starts
    connect_ray(args.ray_address)
    start(config, spec)
    page = config.url
    if generated:
        print(f"token (generated; pass --token-file to choose one): open {page}?token={config.token}")
    elif config.token_required:
        print(f"token required: open {page}?token=<token>, or send 'Authorization: Bearer <token>'")
    print(f"serving {config.output} at {page} ({'token required' if config.token_required else 'loopback only'}); "
          f"Ctrl-C stops it", flush=True)
    if spec.tiny_random:
        print("WARNING: the output was scored with the tiny random-weight model; scores mean nothing.",
              file=sys.stderr)
    # A service manager stops it with SIGTERM: shut Serve down then too, as on Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return ExitCode.OK


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "serve", help="a page and HTTP API: score an uploaded image, search by text, browse rows (Ray Serve)",
        description="Serve OUTPUT on Ray Serve: POST an image for its scores, attribute profile, quality "
                    "metrics and nearest neighbours; search by text with a minimum score; browse rows and images.")
    parser.add_argument("output", help="scored output prefix (scored with --write-embeddings for search)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; any other needs a token)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token-file", help=f"file holding the access token (else ${TOKEN_ENV}; generated and "
                                             f"printed when --host is given without one)")
    parser.add_argument("--model", help="open_clip model (default: the one the records name)")
    parser.add_argument("--pretrained", help="open_clip tag or path/URI of the weights the scores were made with")
    parser.add_argument("--pretrained-sha256")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"),
                        help="with --model (default: the recorded precision)")
    parser.add_argument("--weights-dir", action="append", help="folder searched first for weight files")
    parser.add_argument("--prompts", default="default",
                        help="prompt sets of the attribute profile: 'default', a YAML path/URI, or 'none'")
    parser.add_argument("--max-upload-mb", type=float, default=20.0)
    parser.add_argument("--max-upload-pixels", type=int, default=40_000_000)
    parser.add_argument("--replicas", type=int, default=1, help="model replicas")
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs per model replica")
    parser.add_argument("--gpus", type=float, default=None,
                        help="GPUs per model replica (default: 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--api-cpus", type=float, default=0.5, help="CPUs of the API replica")
    parser.add_argument("--max-batch-size", type=int, default=16, help="uploads scored in one forward pass")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="how long a batch waits for more uploads before it runs")
    parser.add_argument("--ray-address", help="Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    add_storage_options(parser)
    parser.set_defaults(run=cmd_serve)
