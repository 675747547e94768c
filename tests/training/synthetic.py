"""Synthetic labelled data whose true relation is known: unit embeddings, a planted linear score, AVA-style
votes around it, and a scored output written the way the scoring job writes one."""

from __future__ import annotations

import pathlib

import numpy as np
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.evaluate import spearman
from pipeline.io.writer import to_output_table
from pipeline.training.labels import AVA_VOTE_BINS

PLANTED_MEAN, PLANTED_SPREAD, VOTE_SPREAD = 5.0, 1.5, 1.3


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def planted_scores(embeddings: np.ndarray, seed: int = 1) -> np.ndarray:
    """A linear function of the embedding, scaled to AVA's range: what a head should recover."""
    direction = np.random.default_rng(seed).normal(size=embeddings.shape[1])
    raw = embeddings.astype(np.float64) @ direction
    return PLANTED_MEAN + PLANTED_SPREAD * (raw - raw.mean()) / raw.std()


def assert_recovers_planted_score(trained, predictions: np.ndarray, truth: np.ndarray, held_out: np.ndarray,
                                  label: str) -> None:
    """A trained head ranks the held-out rows as the planted score does, and its own metrics agree."""
    recovered = spearman(predictions[held_out], truth[held_out])
    print(f"\n{label}: held-out SRCC vs planted score {recovered:.4f} (n={len(predictions[held_out])}, "
          f"best epoch {trained.best_epoch}/{trained.epochs_run}), test {trained.metrics['test']}")
    assert recovered > 0.95
    assert trained.metrics["test"]["srcc"] > 0.95 and trained.metrics["val"]["srcc"] > 0.95


def ava_votes(scores: np.ndarray, voters: int = 200, spread: float = VOTE_SPREAD, seed: int = 2) -> np.ndarray:
    """(N, 10) vote counts drawn from a discretised normal around each score."""
    rng = np.random.default_rng(seed)
    bins = np.arange(1, AVA_VOTE_BINS + 1)
    shares = np.exp(-0.5 * ((bins[None, :] - scores[:, None]) / spread) ** 2)
    shares /= shares.sum(axis=1, keepdims=True)
    return np.stack([rng.multinomial(voters, share) for share in shares])


def ava_text(image_ids: list[str], votes: np.ndarray) -> str:
    """AVA.txt lines: index image_id c1..c10 sem1 sem2 challenge_id."""
    return "".join(f"{i + 1} {image_id} {' '.join(map(str, counts))} 0 0 1396\n"
                   for i, (image_id, counts) in enumerate(zip(image_ids, votes)))


def keys_for(n: int) -> list[str]:
    return [f"{i:09d}" for i in range(n)]


def write_scored(folder: pathlib.Path, keys: list[str], embeddings: np.ndarray, statuses: list[str] | None = None,
                 urls: list[str] | None = None, extra: dict[str, np.ndarray] | None = None) -> pathlib.Path:
    """A scored output folder (one Hive-partitioned file) with the job's column types, embeddings included."""
    n = len(keys)
    statuses = statuses or ["ok"] * n
    batch = {
        schema.KEY: np.asarray(keys, dtype=object),
        schema.SHARD: np.full(n, "file:///shards/00000.tar", dtype=object),
        schema.UNIT: np.full(n, "u00000", dtype=object),
        schema.URL: np.asarray(urls if urls is not None else [f"http://127.0.0.1/{k}.jpg" for k in keys], dtype=object),
        schema.STATUS: np.asarray(statuses, dtype=object),
        schema.ERROR: np.asarray([None if s == "ok" else "why" for s in statuses], dtype=object),
        schema.AESTHETIC_SCORE: np.where(np.asarray(statuses) == "ok", 5.0, np.nan).astype(np.float32),
        schema.MODEL: np.full(n, "synthetic", dtype=object),
        schema.HEAD: np.full(n, "synthetic@000000000000", dtype=object),
        schema.EMBEDDING: embeddings.astype(np.float16),
        **(extra or {}),
    }
    band = folder / f"{schema.SCORE_BAND}=5-6"
    band.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_output_table(batch), band / "u00000.parquet")
    return folder


def planted_set(rows: int, dim: int) -> dict[str, np.ndarray]:
    """``rows`` unit embeddings of ``dim`` dimensions, their planted score (``truth``), AVA-style ``votes``
    drawn around it and the votes' ``means``; ``stored`` is the embeddings as a scored output holds them (fp16)."""
    embeddings = unit_vectors(rows, dim)
    truth = planted_scores(embeddings)
    votes = ava_votes(truth)
    return dict(keys=np.asarray(keys_for(rows), dtype=object), embeddings=embeddings, truth=truth, votes=votes,
                means=votes @ np.arange(1, 11) / votes.sum(axis=1),
                stored=embeddings.astype(np.float16).astype(np.float32))
