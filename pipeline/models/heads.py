"""LAION aesthetic heads: recognise their file formats and score embeddings with all of them at once.

Three formats exist, told apart by their state-dict keys:

- V1 linear (LAION-AI/aesthetic-predictor): ``weight`` (1, D), ``bias`` (1,).
- V2 linear MLP (improved-aesthetic-predictor, ``*-linearMSE.pth``): ``layers.{0,2,4,6,7}``, Linear layers
  with Dropout between and no activation. In eval mode dropout is the identity, so the whole MLP is one
  affine map of the embedding; we fold it exactly (in float64) into ``w . x + b``.
- ReLU MLP (``*-reluMSE.pth``): ``layers.{0,3,6,9,11}``, ReLU after every Linear but the last. Not foldable:
  evaluated as an MLP.

A :class:`HeadBank` stacks the folded heads into one (D, H) matrix, so scoring any number of linear heads
costs one matmul; the MLP heads run beside it.
"""

from __future__ import annotations

import copy
import enum
import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.config import HeadSpec
from pipeline.errors import WeightsError
from pipeline.models.weights import resolve_weights, sha256_of

# Indices of the Linear layers inside ``nn.Sequential`` as the improved-aesthetic-predictor defines them.
_LINEAR_MLP_LAYERS = (0, 2, 4, 6, 7)  # Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear
_RELU_MLP_LAYERS = (0, 3, 6, 9, 11)  # (Linear, ReLU, Dropout) x 3, Linear, ReLU, Linear


class HeadFormat(str, enum.Enum):
    LINEAR = "linear"  # V1
    LINEAR_MLP = "linear-mlp"  # V2, foldable
    RELU_MLP = "relu-mlp"


class HeadFormatError(WeightsError, ValueError):
    """A state dict that is none of the known head formats, or whose shapes do not chain."""


class EmbeddingDimMismatch(WeightsError, ValueError):
    """A head trained on one CLIP model applied to another model's embeddings."""


def detect_head_format(state_dict: Mapping[str, torch.Tensor]) -> HeadFormat:
    keys = set(state_dict)
    if keys == {"weight", "bias"}:
        return HeadFormat.LINEAR
    for layers, head_format in ((_LINEAR_MLP_LAYERS, HeadFormat.LINEAR_MLP), (_RELU_MLP_LAYERS, HeadFormat.RELU_MLP)):
        if keys == {f"layers.{i}.{p}" for i in layers for p in ("weight", "bias")}:
            return head_format
    raise HeadFormatError(
        f"unrecognised aesthetic head: state-dict keys {sorted(keys)}; expected V1 'weight','bias', "
        f"V2 'layers.{{{','.join(map(str, _LINEAR_MLP_LAYERS))}}}.*' or "
        f"ReLU 'layers.{{{','.join(map(str, _RELU_MLP_LAYERS))}}}.*'")


def _linear_layers(state_dict: Mapping[str, torch.Tensor],
                   head_format: HeadFormat) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (weight, bias) pairs in order, with shapes checked to chain and end in one output."""
    if head_format is HeadFormat.LINEAR:
        layers = [(state_dict["weight"], state_dict["bias"])]
    else:
        indices = _LINEAR_MLP_LAYERS if head_format is HeadFormat.LINEAR_MLP else _RELU_MLP_LAYERS
        layers = [(state_dict[f"layers.{i}.weight"], state_dict[f"layers.{i}.bias"]) for i in indices]
    width = layers[0][0].shape[1] if layers[0][0].ndim == 2 else None
    for position, (weight, bias) in enumerate(layers):
        if weight.ndim != 2 or bias.shape != (weight.shape[0],) or weight.shape[1] != width:
            raise HeadFormatError(
                f"{head_format.value} head: layer {position} has weight {tuple(weight.shape)} and bias "
                f"{tuple(bias.shape)}, which do not follow a {width}-wide input")
        width = weight.shape[0]
    if width != 1:
        raise HeadFormatError(f"{head_format.value} head ends in {width} outputs, expected 1 score")
    return layers


def fold_affine(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, float]:
    """Compose Linear layers with nothing between them into one ``w . x + b``, in float64."""
    weight = layers[0][0].double()
    bias = layers[0][1].double()
    for next_weight, next_bias in layers[1:]:
        weight = next_weight.double() @ weight
        bias = next_weight.double() @ bias + next_bias.double()
    return weight.reshape(-1), float(bias.reshape(()))


def _relu_mlp(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> nn.Sequential:
    modules: list[nn.Module] = []
    for position, (weight, bias) in enumerate(layers):
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        linear.weight.data.copy_(weight.float())
        linear.bias.data.copy_(bias.float())
        modules.append(linear)
        if position < len(layers) - 1:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules).eval().requires_grad_(False)


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A content digest for a head built in memory (a head read from a file uses the file's sha256)."""
    hasher = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        hasher.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        hasher.update(tensor.numpy().tobytes())
    return hasher.hexdigest()


def head_identity(name: str, sha256: str) -> str:
    """``name@<sha256[:12]>``: what output rows and unit records say for a head."""
    return f"{name}@{sha256[:12]}"


def pinned_head_identity(spec: HeadSpec) -> str | None:
    """The identity a head will have, known without reading its file when its sha256 is pinned."""
    return head_identity(spec.name, spec.weights.sha256) if spec.weights.sha256 else None


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value
class Head:
    """One head, either folded to ``affine_weight . x + affine_bias`` or kept as an MLP."""

    name: str
    sha256: str
    format: HeadFormat
    input_dim: int
    affine_weight: torch.Tensor | None = None  # (D,) float64, for foldable formats
    affine_bias: float | None = None
    mlp: nn.Sequential | None = None  # for unfoldable formats

    @property
    def identity(self) -> str:
        return head_identity(self.name, self.sha256)

    @property
    def foldable(self) -> bool:
        return self.mlp is None

    @classmethod
    def from_state_dict(cls, name: str, state_dict: Mapping[str, torch.Tensor], sha256: str | None = None) -> "Head":
        head_format = detect_head_format(state_dict)
        try:
            layers = _linear_layers(state_dict, head_format)
        except HeadFormatError as error:
            raise HeadFormatError(f"head {name!r}: {error}") from None
        digest = sha256 or state_dict_digest(state_dict)
        input_dim = int(layers[0][0].shape[1])
        if head_format is HeadFormat.RELU_MLP:
            return cls(name, digest, head_format, input_dim, mlp=_relu_mlp(layers))
        weight, bias = fold_affine(layers)
        return cls(name, digest, head_format, input_dim, affine_weight=weight, affine_bias=bias)


def load_head_state_dict(path: Any) -> dict[str, torch.Tensor]:
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        # map_location: the improved predictor's files were saved from CUDA.
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch and safetensors raise many kinds for a bad file
        headline = str(error).strip().split(". ")[0].splitlines()[0][:160] if str(error).strip() else ""
        raise HeadFormatError(f"{path} is not a head file (a torch state dict or safetensors): "
                              f"{type(error).__name__}: {headline}") from error
    if not isinstance(state_dict, Mapping):
        raise HeadFormatError(f"{path}: expected a state dict, got {type(state_dict).__name__}")
    return dict(state_dict)


class HeadBank:
    """Several heads over the same embedding space, scored together.

    ``score_matrix`` returns (N, H) float32 in the order the heads were given; ``score`` returns a dict.
    """

    def __init__(self, heads: Sequence[Head], device: str | torch.device = "cpu"):
        if not heads:
            raise ValueError("a HeadBank needs at least one head")
        names = [head.name for head in heads]
        if len(set(names)) != len(names):
            raise ValueError(f"head names must be unique, got {names}")
        dims = {head.input_dim for head in heads}
        if len(dims) != 1:
            raise EmbeddingDimMismatch(
                "heads expect different embedding sizes: "
                + ", ".join(f"{head.name}: {head.input_dim}" for head in heads))
        self.heads = tuple(heads)
        self.input_dim = dims.pop()
        self.device = torch.device(device)
        self._affine_columns = [i for i, head in enumerate(heads) if head.foldable]
        self._mlp_columns = [i for i, head in enumerate(heads) if not head.foldable]
        folded = [heads[i] for i in self._affine_columns]
        # Folded in float64, applied in float32: the rounding of the stack is ~1e-7 relative.
        self._affine_weight = (torch.stack([h.affine_weight for h in folded], dim=1).float().to(self.device)
                               if folded else None)  # (D, H_affine)
        self._affine_bias = (torch.tensor([h.affine_bias for h in folded], dtype=torch.float32, device=self.device)
                             if folded else None)
        self._mlps = [copy.deepcopy(heads[i].mlp).to(self.device) for i in self._mlp_columns]

    @classmethod
    def from_state_dicts(cls, pairs: Iterable[tuple[str, Mapping[str, torch.Tensor]]],
                         device: str | torch.device = "cpu") -> "HeadBank":
        return cls([Head.from_state_dict(name, state_dict) for name, state_dict in pairs], device)

    def to(self, device: str | torch.device) -> "HeadBank":
        return HeadBank(self.heads, device)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(head.name for head in self.heads)

    @property
    def identities(self) -> tuple[str, ...]:
        return tuple(head.identity for head in self.heads)

    def check_embedding_dim(self, embed_dim: int, model_identity: str = "the CLIP model") -> None:
        wrong = [head for head in self.heads if head.input_dim != embed_dim]
        if wrong:
            raise EmbeddingDimMismatch(
                f"{model_identity} produces {embed_dim}-d embeddings but "
                + ", ".join(f"head {head.name!r} expects {head.input_dim}-d" for head in wrong)
                + ": use heads trained on embeddings of this CLIP model (e.g. the *l14* heads for ViT-L/14)")

    def score_matrix(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised float32 embeddings, on this bank's device -> (N, H) float32 scores."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.input_dim:
            raise EmbeddingDimMismatch(
                f"heads {list(self.names)} expect (N, {self.input_dim}) embeddings, got {tuple(embeddings.shape)}")
        embeddings = embeddings.float()
        if not self._mlps:
            return torch.addmm(self._affine_bias, embeddings, self._affine_weight)
        scores = embeddings.new_empty((embeddings.shape[0], len(self.heads)))
        if self._affine_weight is not None:
            scores[:, self._affine_columns] = torch.addmm(self._affine_bias, embeddings, self._affine_weight)
        for column, mlp in zip(self._mlp_columns, self._mlps):
            scores[:, column] = mlp(embeddings)[:, 0]
        return scores

    def score(self, embeddings: torch.Tensor) -> dict[str, np.ndarray]:
        """Head name -> (N,) float32 numpy scores."""
        with torch.inference_mode():
            matrix = self.score_matrix(embeddings.to(self.device)).cpu().numpy()
        return {name: np.ascontiguousarray(matrix[:, i]) for i, name in enumerate(self.names)}


def load_head_bank(
    specs: Sequence[HeadSpec],
    search_dirs: Sequence[str] = (),
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
) -> HeadBank:
    """Resolve, verify and load each head file (first spec first: it is the primary score)."""
    heads = []
    for spec in specs:
        path = resolve_weights(spec.weights, search_dirs, cache_dir, storage_options)
        state_dict = load_head_state_dict(path)  # its errors name the file already
        try:
            heads.append(Head.from_state_dict(spec.name, state_dict, sha256_of(path)))
        except HeadFormatError as error:
            raise HeadFormatError(f"{path}: {error}") from None
    return HeadBank(heads, device)
