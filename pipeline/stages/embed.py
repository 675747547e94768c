"""The embed + score stage: decoded pixels in, CLIP embedding and aesthetic scores out.

A callable class for ``Dataset.map_batches`` with an actor pool: the model and heads are loaded once per
actor in ``__init__``; ``__call__`` maps a column batch to a column batch. Only rows whose status is ``ok``
reach the model; every other row passes through with its status and error untouched and NaN scores. A row
whose score comes out non-finite is marked ``score_error``; one bad row never fails the batch.

With ``prompts`` (a prompt YAML path/URI, ``"default"``, or parsed :class:`PromptSets`), the zero-shot
prompt sets are embedded once in ``__init__`` with the text tower and each batch also gets one
``score_prompt_<set>`` column per set, from the same unit image embeddings (one more matmul).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pipeline.long_lived import long_lived

with long_lived():  # an actor's first import of torch
    import torch
    import torch.nn.functional as F

from pipeline import schema
from pipeline.config import HeadSpec, ModelConfig
from pipeline.models.clip import LoadedClip, load_clip, resolve_precision
from pipeline.models.heads import HeadBank, load_head_bank
from pipeline.models.prompts import PromptBank, PromptSets, build_prompt_bank, embed_texts
from pipeline.schema import Status

Loader = Callable[[], "tuple[LoadedClip, HeadBank]"]
_OK = Status.OK.value


def load_clip_and_heads(
    model: ModelConfig,
    heads: Sequence[HeadSpec],
    search_dirs: Sequence[str] = (),
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[LoadedClip, HeadBank]:
    """The production loader: heads first (small, and a missing one fails before a 1.7 GB download)."""
    bank = load_head_bank(heads, search_dirs, storage_options)
    clip = load_clip(model, search_dirs=search_dirs, storage_options=storage_options)
    bank.check_embedding_dim(clip.embed_dim, clip.identity)
    return clip, bank.to(clip.device)


class EmbedScore:
    """``map_batches`` callable: PIXELS (N, S, S, 3) uint8 + STATUS/ERROR -> scores, identities, embeddings.

    Score columns: ``aesthetic_score`` (first head), ``score_<head>`` (other heads), then
    ``score_prompt_<set>`` (prompt sets, when ``prompts`` is given).
    """

    def __init__(
        self,
        model: ModelConfig,
        heads: Sequence[HeadSpec],
        write_embeddings: bool = False,
        search_dirs: Sequence[str] = (),
        storage_options: Mapping[str, Any] | None = None,
        loader: Loader | None = None,
        prompts: str | PromptSets | None = None,
        torch_threads: int | Callable[[], int] | None = None,
        caption_similarity: bool = False,
    ):
        if torch_threads is not None:  # before the model loads: loading runs on them too
            torch.set_num_threads(torch_threads() if callable(torch_threads) else torch_threads)
        if loader is None:
            loader = functools.partial(load_clip_and_heads, model, tuple(heads), tuple(search_dirs),
                                       dict(storage_options or {}))
        with long_lived():  # the model lives as long as the actor; its loader imports open_clip
            self.clip, self.head_bank = loader()
        expected_names = tuple(spec.name for spec in heads)
        if self.head_bank.names != expected_names:
            raise ValueError(f"loader returned heads {self.head_bank.names}, expected {expected_names}")
        self.head_bank.check_embedding_dim(self.clip.embed_dim, self.clip.identity)
        recorded = resolve_precision(model.precision, self.clip.device)
        if self.clip.precision != recorded:  # the unit records say the config's precision: it must be what runs
            raise ValueError(f"the model runs in {self.clip.precision}, but the run records {recorded}")
        if self.head_bank.device != self.clip.device:
            self.head_bank = self.head_bank.to(self.clip.device)

        self.write_embeddings = write_embeddings
        self.caption_similarity = caption_similarity
        self.model_identity = self.clip.identity
        self.primary_head_identity = self.head_bank.identities[0]
        # Zero-shot prompt sets: their text vectors are computed once, here; each batch scores them beside the heads.
        self.prompt_bank: PromptBank | None = (
            build_prompt_bank(self.clip, prompts, storage_options) if prompts is not None else None)
        self.prompt_identity = self.prompt_bank.identity if self.prompt_bank else None
        prompt_names = self.prompt_bank.names if self.prompt_bank else ()
        # Names for error messages, in score-column order: heads, then prompt sets.
        self._score_names = expected_names + tuple(f"prompt {name}" for name in prompt_names)
        self.score_columns = ((schema.AESTHETIC_SCORE,) + tuple(schema.score_column(n) for n in expected_names[1:])
                              + (self.prompt_bank.columns if self.prompt_bank else ()))
        if len(set(self.score_columns)) != len(self.score_columns):
            raise ValueError(f"head names {expected_names} and prompt sets {prompt_names} map to clashing "
                             f"columns {self.score_columns}")

        device = self.clip.device
        size = self.clip.image_size
        self._pixel_shape = (size, size, 3)
        # (x / 255 - mean) / std  ==  x * scale - shift: two in-place ops on the device, no temporaries.
        std = torch.tensor(self.clip.std, dtype=torch.float32)
        mean = torch.tensor(self.clip.mean, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(device)
        self._shift = (mean / std).view(1, 3, 1, 1).to(device)
        # Ray Data may run two batches at once in threads (ResourcesConfig.concurrent_batches_per_actor):
        # each thread stages its pixels in its own pinned buffer while the other's batch has the device.
        self._host = threading.local()
        self._device = threading.Lock()

        if model.channels_last:
            self.clip.model.visual.to(memory_format=torch.channels_last)
        self._autocast = self.clip.autocast_dtype
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = (
            torch.compile(self.clip.model.encode_image, dynamic=False) if model.compile else None)

    # -- the hot path ------------------------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = schema.restore_null_text(dict(batch))
        status = np.array(batch[schema.STATUS], dtype=object)  # copies: we write into both
        error = np.array(batch[schema.ERROR], dtype=object)
        n = len(status)
        n_heads = len(self.score_columns)
        scores = np.full((n_heads, n), np.nan, dtype=np.float32)  # head-major: each column is contiguous
        embeddings = np.zeros((n, self.clip.embed_dim), dtype=np.float16) if self.write_embeddings else None
        similarity = np.full(n, np.nan, dtype=np.float32) if self.caption_similarity else None

        rows = np.flatnonzero(status == _OK)
        if rows.size:
            rows, pixels, take = self._ok_pixels(batch[schema.PIXELS], rows, status, error)
        if rows.size:
            images = self._model_input(self._to_device(pixels, take))
            captions = _captions(batch, rows) if similarity is not None else None
            with self._device:  # one batch at a time on the model; the other thread prepares the next
                row_scores, row_embeddings, row_similarity = self._embed_and_score(images, len(rows), captions)
            finite = np.isfinite(row_scores).all(axis=1)
            for i in np.flatnonzero(~finite):
                status[rows[i]] = Status.SCORE_ERROR.value
                error[rows[i]] = "non-finite score: " + ", ".join(
                    f"{name}={value}" for name, value in zip(self._score_names, row_scores[i]))
            if similarity is not None:
                similarity[rows[finite]] = row_similarity[finite]
            rows, row_scores = rows[finite], row_scores[finite]
            scores[:, rows] = row_scores.T
            if embeddings is not None:
                embeddings[rows] = row_embeddings[finite]

        out = {key: value for key, value in batch.items() if key != schema.PIXELS}
        out[schema.STATUS] = status
        out[schema.ERROR] = error
        for column, values in zip(self.score_columns, scores):
            out[column] = values
        out[schema.MODEL] = np.full(n, self.model_identity, dtype=object)
        out[schema.HEAD] = np.full(n, self.primary_head_identity, dtype=object)
        if embeddings is not None:
            out[schema.EMBEDDING] = embeddings
        if similarity is not None:
            out[schema.CLIP_SIMILARITY] = similarity
        return out

    def _ok_pixels(self, pixels: Any, rows: np.ndarray, status: np.ndarray,
                   error: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(rows scored, a uint8 (M, S, S, 3) array, which of its rows to take: None for all of them)."""
        if isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8:
            if pixels.shape[1:] != self._pixel_shape:
                # A whole batch of the wrong size is a wiring error (decode and model disagree), not a bad row.
                raise ValueError(f"{schema.PIXELS} has shape {pixels.shape}, but {self.model_identity} "
                                 f"takes (N, {self._pixel_shape[0]}, {self._pixel_shape[1]}, 3) uint8")
            return rows, pixels, (None if rows.size == len(pixels) else rows)
        # Ragged object column (rows of different shapes): keep the well-formed ones, flag the others.
        good, arrays = [], []
        for row in rows:
            array = np.asarray(pixels[row])
            if array.shape == self._pixel_shape and array.dtype == np.uint8:
                good.append(row)
                arrays.append(array)
            else:
                status[row] = Status.SCORE_ERROR.value
                error[row] = (f"pixels have shape {array.shape} and dtype {array.dtype}; "
                              f"expected {self._pixel_shape} uint8")
        if not arrays:
            return np.empty(0, dtype=np.int64), np.empty((0,) + self._pixel_shape, dtype=np.uint8), None
        return np.asarray(good, dtype=np.int64), np.stack(arrays), None

    def _to_device(self, pixels: np.ndarray, take: np.ndarray | None) -> torch.Tensor:
        """The selected rows as a uint8 NHWC tensor on the model's device, copied once on the host."""
        device = self.clip.device
        if device.type != "cuda":
            if take is not None:
                pixels = pixels[take]
            elif not (pixels.flags.writeable and pixels.flags.c_contiguous):
                pixels = np.array(pixels, order="C")  # torch wants writable memory it may alias
            return torch.from_numpy(pixels)
        count = len(pixels) if take is None else len(take)
        pinned = getattr(self._host, "pinned", None)  # reused host staging buffer for async copies to CUDA
        if pinned is None or pinned.shape[0] < count:
            pinned = self._host.pinned = torch.empty((count,) + self._pixel_shape, dtype=torch.uint8,
                                                      pin_memory=True)
        staging = pinned[:count]
        if take is None:
            staging.numpy()[...] = pixels
        else:
            np.take(pixels, take, axis=0, out=staging.numpy())  # gather straight into pinned memory
        # Safe to reuse the buffer next call: __call__ waits for the scores, which come after this copy.
        return staging.to(device, non_blocking=True)

    def _model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """(K, S, S, 3) uint8 on the device -> the model's normalised input (padded to a compiled shape).

        The NCHW view keeps NHWC memory (channels-last), which the patch convolution takes as it is;
        ``channels_last=True`` gives its weights the same order."""
        with torch.inference_mode():
            images = pixels.permute(0, 3, 1, 2).float()
            images = images.mul_(self._scale).sub_(self._shift).to(self.clip.input_dtype)
            if self._compiled is not None:
                images = _padded(images, _bucket(len(images)))
        return images

    def _embed_and_score(self, images: torch.Tensor, count: int, captions: Sequence[str | None] | None = None
                         ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The model's input for ``count`` images -> (count, H + P) float32 scores (heads, then prompt sets),
        if kept (count, D) fp16 unit embeddings, and with ``captions`` each image's cosine with its caption
        (NaN where there is none)."""
        with torch.inference_mode():
            encode = self._compiled or self.clip.model.encode_image
            with _autocast(self.clip.device, self._autocast):
                features = encode(images)[:count].float()
            unit = F.normalize(features, dim=-1)
            row_scores = self.head_bank.score_matrix(unit)
            if self.prompt_bank is not None:
                row_scores = torch.cat([row_scores, self.prompt_bank.score_matrix(unit)], dim=1)
            row_similarity = self._caption_cosines(unit, captions) if captions is not None else None
            row_scores = row_scores.cpu().numpy()
            row_embeddings = unit.half().cpu().numpy() if self.write_embeddings else None
        return row_scores, row_embeddings, row_similarity

    def _caption_cosines(self, unit: torch.Tensor, captions: Sequence[str | None]) -> np.ndarray:
        """Cosine of each unit image embedding with its caption's unit text embedding (open_clip's tokenizer
        truncates a caption to the model's context), NaN for a row without a caption."""
        similarity = np.full(len(captions), np.nan, dtype=np.float32)
        present = [i for i, caption in enumerate(captions) if caption]
        if present:
            text = embed_texts(self.clip, [captions[i] for i in present])
            similarity[present] = (unit[present] * text).sum(dim=-1).cpu().numpy()
        return similarity


def _captions(batch: Mapping[str, Any], rows: np.ndarray) -> list[str | None]:
    """The rows' captions, None for a missing or blank one."""
    column = batch.get(schema.CAPTION)
    if column is None:
        return [None] * len(rows)
    return [c if isinstance(c, str) and c.strip() else None for c in (column[i] for i in rows)]


def _bucket(count: int) -> int:
    """The batch size a compiled model runs ``count`` images at: a power of two (at least 8), so that the
    batches of a run, whose sizes vary with their failed rows, compile a handful of shapes, not one each."""
    return max(8, 1 << (count - 1).bit_length())


def _padded(images: torch.Tensor, size: int) -> torch.Tensor:
    if len(images) == size:
        return images
    padding = torch.zeros_like(images[:1]).expand(size - len(images), *images.shape[1:])
    return torch.cat([images, padding]).contiguous(memory_format=torch.channels_last)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
