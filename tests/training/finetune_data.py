"""Real photographs (the demo's subjects, seeded crops of them) degraded by a planted rule, through img2dataset
into WebDataset shards, with AVA.txt labels: the score falls with blur and darkness, which pixels show and a
random-weights CLIP's frozen embedding barely does."""

from __future__ import annotations

import dataclasses
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


def _shards_with_scores(root: Path, photos: list, scores: dict[str, float], images_per_shard: int) -> dict[str, float]:
    """The photographs served on 127.0.0.1 and made into shards by img2dataset; each downloaded key's planted
    score (``scores`` is by file name)."""
    import pyarrow.parquet as pq

    with serve_directory(root / "photos") as base:
        write_url_list(photos, base, root / "urls.parquet", 0, non_image=False)
        tars = build_shards(root / "urls.parquet", str(root / "shards"), number_sample_per_shard=images_per_shard)
    planted = {}
    for tar in tars:
        for row in pq.read_table(tar[:-4] + ".parquet").to_pylist():
            if row["status"] == "success":
                planted[row["key"]] = scores[row["url"].rsplit("/", 1)[-1]]
    return planted


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
    planted = _shards_with_scores(root, photos, scores, images_per_shard)
    keys = sorted(planted)
    # 50 voters per image, spread around the planted score: AVA's format, whose mean vote is the label.
    votes = np.stack([np.bincount(np.clip(np.rint(rng.normal(planted[k], 1.0, 50)), 1, 10).astype(int) - 1,
                                  minlength=10) for k in keys])
    (root / "AVA.txt").write_text(synthetic.ava_text(keys, votes))
    (root / "labels.csv").write_text("key,score\n" + "".join(f"{k},{planted[k]:.4f}\n" for k in keys))
    return PlantedShards(str(root / "shards"), str(root / "AVA.txt"), str(root / "labels.csv"), planted, keys)


# -- a rule beyond the frozen tower: a faint texture its patch projection cannot see ----------------------------
TEXTURE_RMS = 8.0  # grey levels (0..255) of the strongest texture
SIDE, PATCH = 224, 32  # the tiny model's input side and patch: the images are made at this size, so img2dataset
# (which never upscales) and the decode stage (224 -> 224) leave every pixel where it was, on the patch grid


def null_texture(seed: int = 12345) -> np.ndarray:
    """A grey 32 x 32 texture (unit RMS, grey levels) that the frozen ``tiny-random`` tower's patch projection maps
    to zero: it lies in the null space of the tower's conv1 weights (64 filters of 3 x 32 x 32 numbers) taken
    through the pixel normalisation, so an image with the texture tiled on the patch grid has the same frozen
    embedding as without it, up to the rounding and JPEG coding of the pixels. Fine-tuning can turn a filter
    towards it."""
    import torch

    from pipeline.config import ModelConfig
    from pipeline.models.clip import load_clip

    clip = load_clip(ModelConfig(name="tiny-random", device="cpu", precision="fp32"))
    weight = clip.model.visual.conv1.weight.detach().double()  # (64, 3, 32, 32), on normalised pixels
    std = torch.tensor(clip.std, dtype=torch.float64).view(1, 3, 1, 1)
    grey = (weight / std / 255).sum(1).reshape(weight.shape[0], -1).numpy()  # the filters on grey-level pixels
    draw = np.random.default_rng(seed).choice([-1.0, 1.0], size=grey.shape[1])
    texture = draw - grey.T @ np.linalg.solve(grey @ grey.T, grey @ draw)
    return (texture / np.sqrt(np.mean(texture ** 2))).reshape(PATCH, PATCH)


def build_texture(root: Path, n_images: int, images_per_shard: int, seed: int = 0,
                  rms: float = TEXTURE_RMS) -> PlantedShards:
    """Demo photographs, centre-cropped to 224 x 224, each with :func:`null_texture` tiled on it at a random
    strength; the planted score falls with it: 10 without texture, 1 at ``rms`` grey levels. Labels as a
    ``key,score`` CSV (``csv_path`` and ``ava_path`` are the same file)."""
    rng = np.random.default_rng(seed)
    tile = np.tile(null_texture(), (SIDE // PATCH, SIDE // PATCH))[..., None]
    photos = make_photos(root / "photos", 0, n_images=n_images, seed=seed)
    scores = {}
    for photo in photos:
        strength = rng.uniform(0, 1)
        image = Image.open(photo.path).convert("RGB")
        scale = SIDE / min(image.size)
        image = image.resize((max(SIDE, round(image.size[0] * scale)), max(SIDE, round(image.size[1] * scale))),
                             Image.Resampling.LANCZOS)
        left, top = (image.size[0] - SIDE) // 2, (image.size[1] - SIDE) // 2
        pixels = np.asarray(image.crop((left, top, left + SIDE, top + SIDE)), dtype=np.float64)
        pixels = np.clip(np.rint(pixels + rms * strength * tile), 0, 255).astype(np.uint8)
        path = photo.path.with_suffix(".png")  # lossless here; img2dataset codes it as JPEG at quality 95
        photo.path.unlink()
        Image.fromarray(pixels).save(path)
        scores[path.name] = 1 + 9 * (1 - strength)
    photos = [dataclasses.replace(p, path=p.path.with_suffix(".png"), image_format="png", width=SIDE, height=SIDE)
              for p in photos]
    planted = _shards_with_scores(root, photos, scores, images_per_shard)
    keys = sorted(planted)
    (root / "labels.csv").write_text("key,score\n" + "".join(f"{k},{planted[k]:.4f}\n" for k in keys))
    return PlantedShards(str(root / "shards"), str(root / "labels.csv"), str(root / "labels.csv"), planted, keys)


def frozen_head(labels, config, shards: str) -> dict:
    """The fair baseline: the best of a ``train-head`` grid (linear and MLP, two learning rates; best by validation
    SRCC) on the frozen tower's embeddings of the same images, decoded by the same stages, in the same splits.
    Returns its val/test SRCC and its test predictions by key."""
    import torch

    from pipeline.training import finetune as ft
    from pipeline.training.train_head import TrainConfig, TrainingSet, config_grid, train_many

    data = ft.labelled_images([shards], labels, config, cache=True)
    model, _ = ft.build_model(config, 0.0, 1.0, 1.0)
    model.eval()
    keys, embeddings, scores = [], [], []
    with torch.no_grad():
        for code in (0, 1, 2):
            for batch in data.split(code).iter_batches(batch_size=64, batch_format="numpy"):
                pixels = torch.from_numpy(np.array(batch[ft.PIXELS]))
                embeddings.append(torch.nn.functional.normalize(model.visual(model.normalised(pixels)), dim=-1))
                keys += list(batch[ft.KEY])
                scores.append(batch[ft.SCORE])
    # In key order: the head's minibatches then do not depend on the order Ray Data delivered the rows in.
    order = np.argsort(np.asarray(keys, dtype=str), kind="stable")
    keys = np.asarray(keys, dtype=object)[order]
    embeddings = torch.cat(embeddings).numpy()[order]
    training = TrainingSet(keys, embeddings, np.concatenate(scores)[order])
    grid = config_grid(TrainConfig(seed=config.seed, val_fraction=config.val_fraction,
                                   test_fraction=config.test_fraction), arch=["linear", "mlp"], lr=[1e-3, 1e-2])
    best = train_many(training, grid)[0]
    test = best.split == 2
    return {"val": best.metrics["val"]["srcc"], "test": best.metrics["test"]["srcc"], "arch": best.config.arch,
            "lr": best.config.lr, "test_keys": keys[test], "test_predictions": best.predict(embeddings[test])}


def paired_bootstrap(keys_a, predictions_a, keys_b, predictions_b, planted: dict, draws: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """SRCC(a) - SRCC(b) against the planted scores over the same test images, and its 2.5% and 97.5%
    percentiles over ``draws`` resamplings of those images (the noise of a test split this size)."""
    from scipy.stats import spearmanr

    by_key = dict(zip(keys_b, predictions_b))
    keys = list(keys_a)
    a = np.asarray(predictions_a, dtype=np.float64)
    b = np.asarray([by_key[k] for k in keys], dtype=np.float64)
    truth = np.asarray([planted[k] for k in keys], dtype=np.float64)
    difference = spearmanr(a, truth)[0] - spearmanr(b, truth)[0]
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(draws):
        pick = rng.integers(0, len(keys), len(keys))
        samples.append(spearmanr(a[pick], truth[pick])[0] - spearmanr(b[pick], truth[pick])[0])
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return float(difference), float(low), float(high)


@dataclass(frozen=True)
class Comparison:
    """Fine-tuning against the frozen-embedding head on the same test images."""

    tuned: dict  # the fine-tune's record
    frozen: dict  # frozen_head's result
    difference: float  # test SRCC, fine-tuned minus frozen
    low: float  # the paired bootstrap's 95% interval of the difference
    high: float

    def line(self) -> str:
        metrics = self.tuned["metrics"]
        return (f"n_test={metrics['test']['n']}: fine-tuned val {metrics['val']['srcc']:.3f} test "
                f"{metrics['test']['srcc']:.3f} (best epoch {self.tuned['best_epoch']}); frozen-embedding head "
                f"({self.frozen['arch']}, lr {self.frozen['lr']}) val {self.frozen['val']:.3f} test "
                f"{self.frozen['test']:.3f}; test difference {self.difference:.3f}, paired bootstrap 95% "
                f"[{self.low:.3f}, {self.high:.3f}]")


def compare_on_texture(root: Path, n_images: int, images_per_shard: int, config, schedule) -> Comparison:
    """:func:`build_texture`, fine-tuned by one Ray Train worker and set against :func:`frozen_head`."""
    from pipeline.training import finetune as ft
    from pipeline.training.labels import read_labels

    textured = build_texture(root, n_images, images_per_shard)
    labels = read_labels(textured.csv_path)
    tuned = ft.finetune([textured.shards_dir], labels, str(root / "out"), config, schedule, workers=1,
                        cpus_per_worker=1, cache=True)
    frozen = frozen_head(labels, config, textured.shards_dir)
    test = tuned.predictions["test"]
    difference, low, high = paired_bootstrap(test["keys"], test["predictions"], frozen["test_keys"],
                                             frozen["test_predictions"], textured.planted)
    return Comparison(tuned.record, frozen, difference, low, high)
