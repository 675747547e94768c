"""CLIP loading: the tiny random model, weights files by path/URI/search dir, and the offline tag error."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.models.clip import build_random_init_clip_for_benchmark, load_clip, pinned_clip_identity, resolve_device
from pipeline.models.weights import WeightsChecksumMismatch, WeightsNotFound, sha256_of
from tests.conftest import TEST_ARCH


def _tiny(**overrides) -> ModelConfig:
    return ModelConfig(name="tiny-random", device="cpu", **overrides)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_model_loads_offline_with_a_random_identity() -> None:
    loaded = load_clip(_tiny())
    assert loaded.identity == "tiny-random(seed=0)"
    assert loaded.embed_dim == 768 and loaded.image_size == 224
    assert loaded.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert loaded.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert loaded.interpolation == "bicubic"
    assert loaded.device == torch.device("cpu") and not loaded.model.training
    assert loaded.precision == "fp32" and loaded.input_dtype == torch.float32  # fp16 asked on CPU -> fp32
    assert loaded.tokenizer(["a photo of a cat"]).shape == (1, 77)
    with torch.inference_mode():
        features = loaded.model.encode_image(torch.zeros(2, 3, 224, 224))
    assert features.shape == (2, 768)


def test_tiny_model_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = load_clip(_tiny())
    assert torch.equal(torch.rand(3), expected_next)
    assert _same_weights(first.model, load_clip(_tiny()).model)
    other = load_clip(_tiny(seed=1))
    assert other.identity == "tiny-random(seed=1)" and not _same_weights(first.model, other.model)


def test_bf16_on_cpu_is_honoured_when_asked() -> None:
    loaded = load_clip(_tiny(precision="bf16"))
    assert loaded.precision == "bf16" and loaded.input_dtype == torch.bfloat16
    with torch.inference_mode():
        assert loaded.model.encode_image(torch.zeros(1, 3, 224, 224, dtype=torch.bfloat16)).shape == (1, 768)


def test_tiny_model_refuses_weights() -> None:
    with pytest.raises(ValueError, match="random weights"):
        load_clip(_tiny(pretrained="s3://bucket/weights.safetensors"))


def _loaded_equals(loaded, state_dict: dict[str, torch.Tensor]) -> bool:
    got = loaded.model.state_dict()
    return all(torch.equal(got[k], v) for k, v in state_dict.items())


def test_weights_file_by_path_and_file_uri(weights_file) -> None:
    path, state_dict = weights_file
    digest = sha256_of(path)
    for pretrained in (str(path), path.as_uri()):
        loaded = load_clip(ModelConfig(name=TEST_ARCH, pretrained=pretrained, pretrained_sha256=digest,
                                       precision="fp32", device="cpu"))
        assert loaded.identity == f"{TEST_ARCH}/open_clip_model.safetensors@{digest[:12]}"
        assert _loaded_equals(loaded, state_dict)


def test_weights_file_from_a_search_dir(weights_file, tmp_path: Path) -> None:
    path, state_dict = weights_file
    config = ModelConfig(name=TEST_ARCH, pretrained="https://example.invalid/w/open_clip_model.safetensors",
                         pretrained_sha256=sha256_of(path), precision="fp32", device="cpu")
    loaded = load_clip(config, search_dirs=[str(path.parent)], cache_dir=str(tmp_path))
    assert _loaded_equals(loaded, state_dict)


def test_weights_file_with_the_wrong_digest_is_refused(weights_file) -> None:
    path, _ = weights_file
    with pytest.raises(WeightsChecksumMismatch):
        load_clip(ModelConfig(name=TEST_ARCH, pretrained=str(path), pretrained_sha256="0" * 64, device="cpu"))


def test_unreachable_hub_says_which_file_to_provide(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hub(cfg):
        raise OSError("Name or service not known")

    def must_not_build(*args, **kwargs):
        raise AssertionError("no model may be built without its weights")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", no_hub)
    monkeypatch.setattr(open_clip, "create_model", must_not_build)
    with pytest.raises(WeightsNotFound) as caught:
        load_clip(ModelConfig(name="ViT-L-14-quickgelu", pretrained="openai", device="cpu"))
    message = str(caught.value)
    assert "timm/vit_large_patch14_clip_224.openai" in message
    assert "open_clip_model.safetensors" in message and "--weights-dir" in message


def test_unknown_tag_empty_pretrained_and_unknown_model_are_errors() -> None:
    with pytest.raises(ValueError, match="openai"):  # lists the known tags
        load_clip(ModelConfig(name="ViT-L-14-quickgelu", pretrained="opnai", device="cpu"))
    with pytest.raises(ValueError, match="neither"):
        load_clip(ModelConfig(name="ViT-L-14-quickgelu", pretrained="", device="cpu"))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_clip(ModelConfig(name="ViT-Nope", device="cpu"))


def test_random_init_route_is_labelled_as_such() -> None:
    loaded = build_random_init_clip_for_benchmark(ModelConfig(name="tiny-random", precision="fp32", device="cpu"))
    assert loaded.identity == "tiny-random/random-init(seed=0)"


def test_device_resolution() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")


def test_pinned_identity_matches_what_loading_reports(weights_file) -> None:
    path, _ = weights_file
    config = ModelConfig(name=TEST_ARCH, pretrained=str(path), pretrained_sha256=sha256_of(path),
                         precision="fp32", device="cpu")
    assert pinned_clip_identity(config) == load_clip(config).identity
    assert pinned_clip_identity(_tiny(seed=3)) == "tiny-random(seed=3)"
    assert pinned_clip_identity(ModelConfig()) is None  # an unpinned tag: only the fetched file can tell
