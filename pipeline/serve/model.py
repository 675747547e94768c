"""The served model: uploads scored by the batch job's own stages, text embedded by the same CLIP.

:class:`Scorer` runs an upload through :class:`pipeline.stages.decode.Decode` (the guarded decoder, the
reference preprocessing, the quality metrics) and :class:`pipeline.stages.embed.EmbedScore` (the model,
the heads, the prompt sets), as one batch of rows, exactly as ``score`` runs a batch of tar members. Only
the batch's composition differs from the job's, so the same image bytes get the same pixels, and scores
equal to the stored ones up to float32 rounding (see ``tests/serve``).

:class:`ScoringModel` is the Ray Serve deployment around it: the model is loaded once per replica, and
concurrent requests are grouped by ``@serve.batch`` into one forward pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from typing import Any, Sequence

import numpy as np
from ray import serve

from pipeline import schema as S
from pipeline.config import DecodeConfig
from pipeline.quality import QUALITY_COLUMNS
from pipeline.serve.config import ModelSpec

_OK = S.Status.OK.value


class IdentityMismatch(RuntimeError):
    """The loaded CLIP is not the one whose embeddings the output stores."""


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class Scorer:
    """Image bytes -> scores, attribute profile, quality metrics and embedding; text -> CLIP text embedding."""

    def __init__(self, spec: ModelSpec, torch_threads: int | None = None) -> None:
        from pipeline.analysis.select import same_model
        from pipeline.models.clip import image_geometry
        from pipeline.stages.decode import Decode
        from pipeline.stages.embed import EmbedScore

        image_size, interpolation = image_geometry(spec.model)
        # Decoded as the rows were (records before the decode options were recorded: the defaults).
        decode = DecodeConfig(max_pixels=spec.max_pixels, quality_metrics=True, **spec.decode)
        self.decode = Decode(decode, image_size, interpolation)
        self.embed = EmbedScore(spec.model, spec.heads, write_embeddings=True, search_dirs=spec.weights_dirs,
                                storage_options=dict(spec.storage_options), prompts=spec.prompts,
                                torch_threads=torch_threads, caption_similarity=False)
        matching = [r for r in spec.recorded_identities if same_model(self.embed.model_identity, r)]
        if not matching:
            raise IdentityMismatch(f"the loaded model is {self.embed.model_identity}, but the output's embeddings "
                                   f"were made with {list(spec.recorded_identities)}")
        self.identity = matching[0]  # as the rows' `model` column spells it
        self.model_config = spec.model
        prompt_columns = set(self.embed.prompt_bank.columns) if self.embed.prompt_bank else set()
        self.head_columns = tuple(c for c in self.embed.score_columns if c not in prompt_columns)
        self.prompt_columns = tuple(c for c in self.embed.score_columns if c in prompt_columns)
        self.tiny_random = spec.tiny_random

    def info(self) -> dict[str, Any]:
        return {
            "model": self.identity,
            "loaded_model": self.embed.model_identity,
            "device": str(self.embed.clip.device),
            "precision": self.embed.clip.precision,
            "heads": list(self.embed.head_bank.identities),
            "head_columns": list(self.head_columns),
            "prompt_columns": list(self.prompt_columns),
            "prompt_sets": self.embed.prompt_identity,
            "quality_columns": list(QUALITY_COLUMNS),
            "tiny_random": self.tiny_random,
        }

    def score(self, images: Sequence[bytes]) -> list[dict[str, Any]]:
        """One result per image, in order: ``status`` ok with the numbers, or the status and error the batch
        job would have written for those bytes."""
        n = len(images)
        column = np.empty(n, dtype=object)
        for i, data in enumerate(images):  # element-wise: numpy must not see bytes as sequences
            column[i] = data
        batch = {S.IMAGE: column, S.STATUS: np.full(n, _OK, dtype=object), S.ERROR: np.full(n, None, dtype=object)}
        out = self.embed(self.decode(batch))
        results = []
        for i in range(n):
            result: dict[str, Any] = {"status": out[S.STATUS][i], "error": out[S.ERROR][i],
                                      "sha256": hashlib.sha256(images[i]).hexdigest(),
                                      "width": int(out[S.WIDTH][i]), "height": int(out[S.HEIGHT][i]),
                                      "batch": n}  # how many uploads shared the forward pass
            if result["status"] == _OK:
                result["scores"] = {c: _finite(out[c][i]) for c in self.head_columns}
                result["prompts"] = {c: _finite(out[c][i]) for c in self.prompt_columns}
                result["quality"] = {c: _finite(out[c][i]) for c in QUALITY_COLUMNS}
                result["embedding"] = out[S.EMBEDDING][i].astype(np.float32)
            results.append(result)
        return results

    def embed_texts(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Unit text embeddings, computed as :func:`pipeline.analysis.select.embed_query` computes them."""
        import torch
        import torch.nn.functional as F

        clip = self.embed.clip
        tokens = clip.tokenizer(list(texts)).to(clip.device)
        with torch.inference_mode():
            text = F.normalize(clip.model.encode_text(tokens).float(), dim=-1)
        return list(text.cpu().numpy().astype(np.float32))


# A replica that cannot load its model fails the same way each time: give up after a few tries, not Serve's 20.
@serve.deployment(name="model", max_ongoing_requests=64, health_check_period_s=10, max_constructor_retry_count=3)
class ScoringModel:
    """A Serve replica holding one :class:`Scorer`; concurrent calls are batched into one forward pass."""

    def __init__(self, spec: ModelSpec, max_batch_size: int, batch_wait_s: float,
                 torch_threads: int | None = None) -> None:
        self.scorer = Scorer(spec, torch_threads)
        for method in (self.score, self.embed_text):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_s)

    def info(self) -> dict[str, Any]:
        return self.scorer.info()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score(self, images: list[bytes]) -> list[dict[str, Any]]:
        # In a thread: the replica's event loop keeps answering health checks and queueing the next batch.
        return await asyncio.to_thread(self.scorer.score, images)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def embed_text(self, texts: list[str]) -> list[np.ndarray]:
        return await asyncio.to_thread(self.scorer.embed_texts, texts)
