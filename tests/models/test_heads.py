"""Head formats, V2 folding, the ReLU MLP and the HeadBank, against the real LAION files where present."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import KNOWN_HEADS
from pipeline.models.heads import (
    EmbeddingDimMismatch,
    Head,
    HeadBank,
    HeadFormat,
    HeadFormatError,
    detect_head_format,
    load_head_bank,
    load_head_state_dict,
    pinned_head_identity,
)
from tests.tolerances import assert_within, folded_error_bound, head_reference, linear_layers, mlp_error_bound

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "laion-aesthetics"
HEADS_DIR = REFERENCE / "heads"
V2_HEADS = ("sac+logos+ava1-l14-linearMSE", "ava+logos-l14-linearMSE")
RELU_HEAD = "ava+logos-l14-reluMSE"


def _require_reference() -> None:
    if not HEADS_DIR.is_dir():
        pytest.skip(f"reference LAION heads not found at {HEADS_DIR}")


def _reference_state_dict(name: str) -> dict[str, torch.Tensor]:
    _require_reference()
    return load_head_state_dict(HEADS_DIR / (name + ".pth"))


def _rating_embeddings(model_dir: str) -> torch.Tensor:
    directory = REFERENCE / "rating-embeddings" / model_dir
    if not directory.is_dir():
        pytest.skip(f"reference rating embeddings not found at {directory}")
    vectors = np.concatenate([np.load(directory / f"rating{i}.npy") for i in range(10)])
    return torch.from_numpy(vectors.astype(np.float32))


def _random_unit_vectors(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    vectors = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return vectors / vectors.norm(dim=1, keepdim=True)


class ImprovedPredictorMLP(nn.Module):
    """The improved-aesthetic-predictor's own module definitions, as published, for comparison."""

    def __init__(self, input_size: int, relu: bool):
        super().__init__()
        if relu:
            self.layers = nn.Sequential(
                nn.Linear(input_size, 1024), nn.ReLU(), nn.Dropout(0.2),
                nn.Linear(1024, 128), nn.ReLU(), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.ReLU(), nn.Dropout(0.1),
                nn.Linear(64, 16), nn.ReLU(),
                nn.Linear(16, 1))
        else:
            self.layers = nn.Sequential(
                nn.Linear(input_size, 1024), nn.Dropout(0.2),
                nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _layer_by_layer(state_dict: dict[str, torch.Tensor], relu: bool, embeddings: torch.Tensor) -> np.ndarray:
    """The published module, run in float64 on the same weights: the reference, within the float64 bound
    (``mlp_error_bound(..., dtype=np.float64)``) of exact."""
    module = ImprovedPredictorMLP(embeddings.shape[1], relu)
    module.load_state_dict(state_dict)
    with torch.no_grad():
        return module.eval().double()(embeddings.double())[:, 0].numpy()


def _synthetic_linear_mlp(dim: int = 32, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    widths = (dim, 24, 12, 8, 4, 1)
    return {
        f"layers.{index}.{part}": (torch.randn(widths[i + 1], widths[i], generator=generator) if part == "weight"
                                   else torch.randn(widths[i + 1], generator=generator))
        for i, index in enumerate((0, 2, 4, 6, 7)) for part in ("weight", "bias")
    }


def test_formats_of_the_reference_files_are_detected() -> None:
    _require_reference()
    expected = {
        "sa_0_4_vit_l_14_linear": HeadFormat.LINEAR,
        "sa_0_4_vit_b_32_linear": HeadFormat.LINEAR,
        "sa_0_4_vit_b_16_linear": HeadFormat.LINEAR,
        "sac+logos+ava1-l14-linearMSE": HeadFormat.LINEAR_MLP,
        "ava+logos-l14-linearMSE": HeadFormat.LINEAR_MLP,
        "ava+logos-l14-reluMSE": HeadFormat.RELU_MLP,
    }
    for name, head_format in expected.items():
        assert detect_head_format(_reference_state_dict(name)) is head_format, name


@pytest.mark.parametrize("head_name, embeddings_dir", [
    ("sa_0_4_vit_l_14_linear", "vit_l_14"),
    ("sa_0_4_vit_b_32_linear", "vit_b_32"),
])
def test_v1_head_orders_the_rating_embeddings(head_name: str, embeddings_dir: str) -> None:
    _require_reference()
    embeddings = _rating_embeddings(embeddings_dir)
    bank = load_head_bank([KNOWN_HEADS[head_name]], [str(HEADS_DIR)])  # also checks the sha256 pin
    scores = bank.score(embeddings)[head_name]
    assert scores.dtype == np.float32 and scores.shape == (10,)
    assert np.all(np.diff(scores) > 0), scores


@pytest.mark.parametrize("head_name", V2_HEADS)
def test_folded_v2_head_equals_the_layer_by_layer_mlp(head_name: str) -> None:
    state_dict = _reference_state_dict(head_name)
    embeddings = _random_unit_vectors(256, 768)
    folded = HeadBank.from_state_dicts([(head_name, state_dict)]).score(embeddings)[head_name]
    reference = _layer_by_layer(state_dict, relu=False, embeddings=embeddings)
    # The folded float32 score is within its rounding bound (the float32 fold of the layers, and the float32
    # dot product) of the exact layer-by-layer value; the float64 reference within its own.
    layers = linear_layers(state_dict)
    bound = folded_error_bound(layers, embeddings) + mlp_error_bound(layers, embeddings, dtype=np.float64)[:, 0]
    assert_within(folded, reference, bound, "folded head against the layer-by-layer MLP")


def test_primary_v2_head_orders_the_rating_embeddings() -> None:
    _require_reference()
    bank = load_head_bank([KNOWN_HEADS["sac+logos+ava1-l14-linearMSE"]], [str(HEADS_DIR)])
    scores = bank.score(_rating_embeddings("vit_l_14"))["sac+logos+ava1-l14-linearMSE"]
    assert np.all(np.diff(scores) > 0), scores


def test_folding_is_exact_on_a_synthetic_mlp() -> None:
    state_dict = _synthetic_linear_mlp()
    head = Head.from_state_dict("synthetic", state_dict)
    assert head.foldable and head.affine_weight.dtype == torch.float64
    embeddings = _random_unit_vectors(64, 32).double()
    layered = embeddings
    for index in (0, 2, 4, 6, 7):
        weight, bias = state_dict[f"layers.{index}.weight"], state_dict[f"layers.{index}.bias"]
        layered = layered @ weight.double().T + bias.double()
    folded = embeddings @ head.affine_weight + head.affine_bias
    # Exact up to float64 rounding: each side within its float64 bound of the exact value.
    layers = linear_layers(state_dict)
    bound = (folded_error_bound(layers, embeddings, dtype=np.float64, stored=np.float64)
             + mlp_error_bound(layers, embeddings, dtype=np.float64)[:, 0])
    assert_within(folded, layered[:, 0], bound, "float64 fold")


def test_relu_head_is_evaluated_as_the_published_mlp() -> None:
    state_dict = _reference_state_dict(RELU_HEAD)
    head = Head.from_state_dict(RELU_HEAD, state_dict)
    assert head.format is HeadFormat.RELU_MLP and not head.foldable
    embeddings = _random_unit_vectors(128, 768)
    reference = _layer_by_layer(state_dict, relu=True, embeddings=embeddings)
    layers = linear_layers(state_dict)
    float64_bound = mlp_error_bound(layers, embeddings, relu=True, dtype=np.float64)[:, 0]
    # The head's module is the published MLP: the same layers and ReLUs, compared in float64 where the
    # rounding bound is tight (~1e-10 here; float32's is ~0.2, as errors are carried through |W| of 5 layers).
    with torch.no_grad():
        own = copy.deepcopy(head.mlp).double()(embeddings.double())[:, 0].numpy()
    assert_within(own, reference, 2 * float64_bound, "the head's MLP in float64")
    # The bank runs that module in float32: within the float32 bound of the exact value.
    scores = HeadBank([head]).score(embeddings)[RELU_HEAD]
    assert_within(scores, reference, mlp_error_bound(layers, embeddings, relu=True)[:, 0] + float64_bound,
                  "the bank's float32 scores")
    assert np.isfinite(scores).all() and scores.std() > 0


def test_bank_scores_every_head_at_once_in_order() -> None:
    _require_reference()
    names = ("sac+logos+ava1-l14-linearMSE", RELU_HEAD, "sa_0_4_vit_l_14_linear", "ava+logos-l14-linearMSE")
    bank = load_head_bank([KNOWN_HEADS[name] for name in names], [str(HEADS_DIR)])
    assert bank.names == names
    assert bank.identities[0] == "sac+logos+ava1-l14-linearMSE@" + KNOWN_HEADS[names[0]].weights.sha256[:12]
    assert bank.identities == tuple(pinned_head_identity(KNOWN_HEADS[name]) for name in names)
    embeddings = _random_unit_vectors(32, 768)
    together = bank.score(embeddings)
    matrix = bank.score_matrix(embeddings)
    assert matrix.shape == (32, 4) and matrix.dtype == torch.float32
    for column, name in enumerate(names):
        # Stacked with other heads or alone, the matmul may add in another order (another BLAS kernel):
        # each result is within the float32 bound of the exact score of the head's float32 parameters.
        exact, bound = head_reference(bank.heads[column], embeddings)
        alone = HeadBank([bank.heads[column]]).score(embeddings)[name]
        assert_within(alone, exact, bound, f"{name} alone")
        assert_within(together[name], exact, bound, f"{name} in the bank")
        assert_within(matrix[:, column].numpy(), exact, bound, f"{name} in the score matrix")


def test_identity_uses_the_given_digest_or_the_state_dict_content() -> None:
    state_dict = _synthetic_linear_mlp()
    assert Head.from_state_dict("h", state_dict, "ab" * 32).identity == "h@" + "ab" * 6
    first = Head.from_state_dict("h", state_dict).identity
    assert first == Head.from_state_dict("h", {k: v.clone() for k, v in state_dict.items()}).identity
    assert first != Head.from_state_dict("h", _synthetic_linear_mlp(seed=2)).identity


def test_embedding_dim_mismatch_is_a_clear_error() -> None:
    bank = HeadBank([Head.from_state_dict("b32ish", {"weight": torch.randn(1, 512), "bias": torch.zeros(1)})])
    with pytest.raises(EmbeddingDimMismatch, match="b32ish.*512"):
        bank.check_embedding_dim(768, "ViT-L-14-quickgelu/openai@000000000000")
    with pytest.raises(EmbeddingDimMismatch, match="768"):
        bank.score(_random_unit_vectors(2, 768))
    with pytest.raises(EmbeddingDimMismatch, match="different embedding sizes"):
        l14_like = Head.from_state_dict("l14ish", {"weight": torch.randn(1, 768), "bias": torch.zeros(1)})
        HeadBank([bank.heads[0], l14_like])


def test_unknown_or_inconsistent_state_dicts_are_rejected() -> None:
    with pytest.raises(HeadFormatError, match="unrecognised"):
        detect_head_format({"fc.weight": torch.zeros(1, 4), "fc.bias": torch.zeros(1)})
    broken = _synthetic_linear_mlp()
    broken["layers.2.weight"] = torch.zeros(24, 7)
    with pytest.raises(HeadFormatError, match="broken"):
        Head.from_state_dict("broken", broken)
    with pytest.raises(HeadFormatError, match="outputs"):
        Head.from_state_dict("two", {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)})
