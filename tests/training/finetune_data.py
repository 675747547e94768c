"""Real photographs (the demo's subjects, seeded crops of them) degraded by a planted rule, through img2dataset
into WebDataset shards, with AVA.txt labels: the score falls with blur and darkness, which pixels show and a
random-weights CLIP's frozen embedding barely does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from pipeline.sample_data import build_shards, make_photos, serve_directory, write_url_list
from tests.training import synthetic

MAX_BLUR = 4.0  # Gaussian radius, in pixels of the 256-pixel side img2dataset resizes to
DARKEST = 0.15  # brightness factor of the darkest copy


@dataclass(frozen=True)
class PlantedShards:
    shards_dir: str
    ava_path: str
    csv_path: str
    planted: dict[str, float]  # key -> the planted score
    keys: list[str]


def planted_score(blur: float, brightness: float, darkness_weight: float) -> float:
    """1..10: 10 for a sharp, fully bright copy, 1 for the most blurred (and, by ``darkness_weight``, darkest)."""
    sharpness = 1 - blur / MAX_BLUR
    light = (brightness - DARKEST) / (1 - DARKEST)
    return 1 + 9 * ((1 - darkness_weight) * sharpness + darkness_weight * light)


def build(root: Path, n_images: int, images_per_shard: int, seed: int = 0,
          darkness_weight: float = 0.0) -> PlantedShards:
    rng = np.random.default_rng(seed)
    photos = make_photos(root / "photos", 0, n_images=n_images, seed=seed)
    scores = {}
    for photo in photos:
        blur, brightness = rng.uniform(0, MAX_BLUR), rng.uniform(DARKEST, 1)
        image = Image.open(photo.path)
        image.load()
        radius = blur * max(image.size) / 256
        image = image.filter(ImageFilter.GaussianBlur(radius)).point(lambda v: int(v * brightness))
        image.save(photo.path, quality=95)
        scores[photo.path.name] = planted_score(blur, brightness, darkness_weight)
    with serve_directory(root / "photos") as base:
        write_url_list(photos, base, root / "urls.parquet", 0, non_image=False)
        tars = build_shards(root / "urls.parquet", str(root / "shards"), number_sample_per_shard=images_per_shard)
    import pyarrow.parquet as pq

    planted = {}
    for tar in tars:
        for row in pq.read_table(tar[:-4] + ".parquet").to_pylist():
            if row["status"] == "success":
                planted[row["key"]] = scores[row["url"].rsplit("/", 1)[-1]]
    keys = sorted(planted)
    # 50 voters per image, spread around the planted score: AVA's format, whose mean vote is the label.
    votes = np.stack([np.bincount(np.clip(np.rint(rng.normal(planted[k], 1.0, 50)), 1, 10).astype(int) - 1,
                                  minlength=10) for k in keys])
    (root / "AVA.txt").write_text(synthetic.ava_text(keys, votes))
    (root / "labels.csv").write_text("key,score\n" + "".join(f"{k},{planted[k]:.4f}\n" for k in keys))
    return PlantedShards(str(root / "shards"), str(root / "AVA.txt"), str(root / "labels.csv"), planted, keys)
