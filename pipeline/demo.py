"""`make demo`: build a sample dataset with img2dataset, score it on a local Ray, print the table.

Real photographs (scikit-image's bundled ones and degraded variants) are served on 127.0.0.1,
img2dataset writes WebDataset shards and sidecars from them, and `aesthetics score` scores them.

The default model (ViT-L-14-quickgelu, OpenAI weights) is used when its weights can be had
without asking the network: a file given with --pretrained / $PRETRAINED, or a copy already in
the Hugging Face cache. Otherwise the demo says so loudly and uses the tiny random-weight model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from pipeline import cli
from pipeline.config import DEFAULT_HEAD, KNOWN_HEADS, HeadSpec, WeightsSpec
from pipeline.models.weights import file_name_of, sha256_of
from pipeline.sample_data import build_sample_dataset

# Where the product's own checkout keeps the reference head files (absent elsewhere).
SHARED_HEADS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "laion-aesthetics" / "heads"
SHARED_V2_HEAD = SHARED_HEADS / file_name_of(KNOWN_HEADS[DEFAULT_HEAD].weights.uri)
HF_CACHE_OPENAI_L14 = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub" / \
    "models--timm--vit_large_patch14_clip_224.openai"


def _default_weights_available(pretrained: str | None) -> bool:
    return bool(pretrained) or HF_CACHE_OPENAI_L14.exists()


def random_v2_head(folder: Path, embed_dim: int = 768) -> tuple[str, str]:
    """A seeded random head in the V2 file format for ``embed_dim``-wide embeddings (768: ViT-L/14's), for
    machines that have no real head file. (path, sha256)."""
    generator = torch.Generator().manual_seed(0)
    sizes = [embed_dim, 1024, 128, 64, 16, 1]
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(sizes, sizes[1:])):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) / fan_in ** 0.5
        state[f"layers.{index}.bias"] = torch.zeros(fan_out)
    state["layers.7.bias"] = torch.tensor([5.0])  # centre the meaningless scores where LAION's are
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"random-v2-{embed_dim}.pth"
    torch.save(state, path)
    return str(path), sha256_of(path)


def v2_head_or_stand_in(scratch: Path) -> tuple[tuple[HeadSpec, ...], tuple[str, ...]]:
    """(heads, weights_dirs): the real LAION V2 head from ../shared when it is there, else a seeded random
    head in its format written under ``scratch``. What tests and benchmarks score with."""
    if SHARED_V2_HEAD.exists():
        return (KNOWN_HEADS[DEFAULT_HEAD],), (str(SHARED_HEADS),)
    path, digest = random_v2_head(scratch)
    return (HeadSpec("random-v2", WeightsSpec(path, digest)),), ()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="folder for the sample data and the scores")
    parser.add_argument("--images", type=int, default=None, help="photos to make (default: every subject x variant)")
    parser.add_argument("--per-shard", type=int, default=10)
    parser.add_argument("--pretrained", default=os.environ.get("PRETRAINED"),
                        help="ViT-L-14-quickgelu OpenAI weights file (path or URI)")
    args = parser.parse_args(argv)

    out = Path(args.out).absolute()
    print(f"building sample shards with img2dataset under {out / 'shards'} ...", flush=True)
    dataset = build_sample_dataset(out, n_images=args.images, images_per_shard=args.per_shard)
    print(f"  {len(dataset.tar_paths)} shards, {len(dataset.expected_keys)} images, "
          f"{dataset.n_failed} failed downloads, built in {dataset.build_seconds:.1f}s", flush=True)

    score_args = ["score", "--input", dataset.shards_dir, "--output", str(out / "scores"),
                  "--shards-per-unit", "4", "--batch-size", "32", "--decode-batch-size", "32"]
    if _default_weights_available(args.pretrained):
        if args.pretrained:
            score_args += ["--pretrained", args.pretrained]
    else:
        score_args += ["--model", "tiny-random", "--precision", "fp32"]
    if SHARED_V2_HEAD.exists():
        score_args += ["--weights-dir", str(SHARED_HEADS)]
    elif "--model" in score_args:
        path, digest = random_v2_head(out / "weights")
        print(f"no LAION head file here: using a seeded random V2-format head ({path})", file=sys.stderr)
        score_args += ["--head", f"{path},sha256={digest}"]
    print("running: aesthetics " + " ".join(score_args), flush=True)
    return cli.main(score_args)


if __name__ == "__main__":
    sys.exit(main())
