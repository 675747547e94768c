"""Prompt files, their validation, and PromptBank scores: against a stub text tower whose vectors are known
exactly, and on the tiny random CLIP for shapes."""

from __future__ import annotations

import dataclasses
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from pipeline.config import ConfigError, ModelConfig
from pipeline.models.prompts import (
    DEFAULT_PROMPTS_FILE,
    PromptBank,
    PromptConfigError,
    load_prompt_sets,
    parse_prompt_sets,
    prompt_column,
)

DIM = 16


class _StubTextTower:
    """Each distinct text gets a fixed random vector (not unit length, so normalisation is exercised)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.table = torch.randn(512, DIM, generator=torch.Generator().manual_seed(0)) * 3

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[self.ids.setdefault(text, len(self.ids))] for text in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens[:, 0]]

    def unit(self, text: str) -> torch.Tensor:
        self.tokenizer([text])
        return F.normalize(self.table[self.ids[text]], dim=0)


@pytest.fixture
def tower() -> _StubTextTower:
    return _StubTextTower()


def _stub_clip(tower: _StubTextTower) -> SimpleNamespace:
    return SimpleNamespace(tokenizer=tower.tokenizer, model=SimpleNamespace(encode_text=tower.encode_text),
                           device=torch.device("cpu"), embed_dim=DIM)


def _images(n: int = 7, dim: int = DIM) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(1)), dim=1)


def _sets(text: str, **kwargs):
    return parse_prompt_sets(yaml.safe_load(textwrap.dedent(text)), "test.yaml", **kwargs)


# -- the file format --------------------------------------------------------------------------------


def test_the_default_file_has_pairs_context_ensembles_and_attributes() -> None:
    prompt_sets = load_prompt_sets("default")
    assert prompt_sets.source == str(DEFAULT_PROMPTS_FILE)
    by_name = {s.name: s for s in prompt_sets.sets}
    assert by_name["aesthetic"].positive == ("an outstanding picture",)
    assert by_name["aesthetic"].negative == ("a horrible picture",)
    assert by_name["aesthetic_ensemble"].classes and by_name["aesthetic_context"].combine == "best_class"
    assert {"composition", "lighting", "framing"} <= set(by_name)
    assert all(column.startswith("score_prompt_") for column in prompt_sets.columns)
    assert prompt_sets.identity.startswith("prompts:prompts.yaml@")


def test_column_names() -> None:
    assert prompt_column("lighting") == "score_prompt_lighting"


def test_a_class_list_can_come_from_a_file_beside_the_yaml(tmp_path) -> None:
    (tmp_path / "rooms.txt").write_text("# hotel rooms\nbedroom\n\nbathroom\n")
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        version: 1
        class_lists: {rooms: {file: rooms.txt}}
        sets:
          hotel: {positive: "a beautiful {class}", negative: "an ugly {class}", classes: rooms}
    """))
    (hotel,) = load_prompt_sets(str(tmp_path / "p.yaml")).sets
    assert hotel.classes == ("bedroom", "bathroom")
    assert hotel.prompts_by_class(hotel.positive) == [["a beautiful bedroom"], ["a beautiful bathroom"]]


@pytest.mark.parametrize("document, message", [
    ("version: 2\nsets: {a: {positive: x}}", "'version' must be 1"),
    ("version: 1\nsets: {}", "'sets' must be a non-empty mapping"),
    ("version: 1\nprompts: {}\nsets: {a: {positive: x}}", "unknown top-level key"),
    ("version: 1\nsets: {Bad-Name: {positive: x}}", "must match"),
    ("version: 1\nsets: {a: {negative: x}}", "sets.a: 'positive' is required"),
    ("version: 1\nsets: {a: {positive: x, weight: 2}}", "unknown key(s) ['weight']"),
    ("version: 1\nsets: {a: {positive: []}}", "sets.a.positive: must be a string or a non-empty list"),
    ("version: 1\nsets: {a: {positive: ['x', 3]}}", "every entry must be a non-empty string"),
    ("version: 1\nsets: {a: {positive: 'a {class}'}}", "has a {class} slot, but the set has no 'classes'"),
    ("version: 1\nsets: {a: {positive: 'a dog', classes: [dog]}}", "has no {class} slot"),
    ("version: 1\nsets: {a: {positive: 'a {class}', classes: pets}}", "no class list named 'pets'"),
    ("version: 1\nsets: {a: {positive: x, combine: max}}", "sets.a.combine: must be one of"),
    ("version: 1\nsets: {a: {positive: x, combine: best_class}}", "best_class needs 'classes'"),
])
def test_schema_errors_name_the_file_and_key(document: str, message: str) -> None:
    with pytest.raises(PromptConfigError, match="test.yaml") as caught:
        _sets(document)
    assert message in str(caught.value)
    assert isinstance(caught.value, ConfigError)  # the CLI reports it as a configuration error


def test_unreadable_and_invalid_files_are_clear_errors(tmp_path) -> None:
    with pytest.raises(PromptConfigError, match="cannot read prompt file"):
        load_prompt_sets(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("sets: [unclosed")
    with pytest.raises(PromptConfigError, match="not valid YAML"):
        load_prompt_sets(str(tmp_path / "bad.yaml"))


# -- scoring, against exactly known text vectors -----------------------------------------------------


def test_a_fixed_pair_scores_cos_positive_minus_cos_negative(tower) -> None:
    bank = PromptBank.build(_stub_clip(tower), _sets("""
        version: 1
        sets: {pair: {positive: good, negative: bad}}
    """))
    images = _images()
    expected = images @ tower.unit("good") - images @ tower.unit("bad")
    np.testing.assert_allclose(bank.score(images)["score_prompt_pair"], expected.numpy(), atol=1e-6)


def test_ensembling_averages_unit_vectors_and_renormalises(tower) -> None:
    bank = PromptBank.build(_stub_clip(tower), _sets("""
        version: 1
        sets:
          pos_only: {positive: [a, b, c]}
          with_classes: {positive: ["x {class}", "y {class}"], negative: "z {class}", classes: [p, q]}
    """))
    images = _images()
    averaged = F.normalize(tower.unit("a") + tower.unit("b") + tower.unit("c"), dim=0)
    scores = bank.score(images)
    np.testing.assert_allclose(scores["score_prompt_pos_only"], (images @ averaged).numpy(), atol=1e-6)
    positive = F.normalize(sum(tower.unit(t) for t in ("x p", "y p", "x q", "y q")), dim=0)
    negative = F.normalize(tower.unit("z p") + tower.unit("z q"), dim=0)
    np.testing.assert_allclose(scores["score_prompt_with_classes"], (images @ positive - images @ negative).numpy(),
                               atol=1e-6)
    # Ensembles cost one vector per side, however many prompts: 1 + 2 + the zero column.
    assert bank.prompt_count == 4


def test_swapping_positive_and_negative_flips_the_sign(tower) -> None:
    bank = PromptBank.build(_stub_clip(tower), _sets("""
        version: 1
        sets:
          forward: {positive: [good, fine], negative: [bad, awful]}
          backward: {positive: [bad, awful], negative: [good, fine]}
          forward_context: {positive: "good {class}", negative: "bad {class}", classes: [a, b, c], combine: best_class}
          backward_context: {positive: "bad {class}", negative: "good {class}", classes: [a, b, c], combine: best_class}
    """))
    scores = bank.score(_images(20))
    assert np.abs(scores["score_prompt_forward"]).min() > 0
    np.testing.assert_array_equal(scores["score_prompt_forward"], -scores["score_prompt_backward"])
    np.testing.assert_allclose(scores["score_prompt_forward_context"], -scores["score_prompt_backward_context"],
                               atol=1e-7)


def test_best_class_takes_the_pair_of_the_class_the_image_matches_best(tower) -> None:
    bank = PromptBank.build(_stub_clip(tower), _sets("""
        version: 1
        sets:
          context:
            positive: ["good {class}", "great {class}"]
            negative: "bad {class}"
            classes: [dog, cat, car]
            combine: best_class
    """))
    images = _images(30)
    pos = torch.stack([F.normalize(tower.unit(f"good {c}") + tower.unit(f"great {c}"), dim=0)
                       for c in ("dog", "cat", "car")])
    neg = torch.stack([tower.unit(f"bad {c}") for c in ("dog", "cat", "car")])
    pos_sim, neg_sim = images @ pos.T, images @ neg.T
    best = (pos_sim + neg_sim).argmax(dim=1)
    expected = pos_sim[torch.arange(30), best] - neg_sim[torch.arange(30), best]
    np.testing.assert_allclose(bank.score(images)["score_prompt_context"], expected.numpy(), atol=1e-6)
    assert len(set(best.tolist())) > 1  # the images really pick different contexts


def test_columns_come_in_file_order_and_a_wrong_dimension_is_refused(tower) -> None:
    bank = PromptBank.build(_stub_clip(tower), _sets("""
        version: 1
        sets:
          z_last: {positive: a, negative: b}
          ctx: {positive: "a {class}", negative: "b {class}", classes: [x, y], combine: best_class}
          a_first: {positive: c}
    """))
    matrix = bank.score_matrix(_images())
    assert matrix.shape == (7, 3) and matrix.dtype == torch.float32
    assert list(bank.score(_images())) == ["score_prompt_z_last", "score_prompt_ctx", "score_prompt_a_first"]
    with pytest.raises(ValueError, match="16-d"):
        bank.score_matrix(torch.zeros(2, DIM + 1))


# -- the real text tower ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip():
    from pipeline.models.clip import load_clip

    return load_clip(ModelConfig(name="tiny-random", device="cpu", precision="fp32", seed=0))


def test_default_prompt_bank_on_tiny_random(tiny_clip) -> None:
    prompt_sets = load_prompt_sets("default")
    bank = PromptBank.build(tiny_clip, prompt_sets)
    images = _images(5, tiny_clip.embed_dim)
    scores = bank.score(images)
    assert list(scores) == list(prompt_sets.columns)
    for values in scores.values():
        assert values.dtype == np.float32 and values.shape == (5,) and np.isfinite(values).all()
        assert np.abs(values).max() <= 2  # a difference of two cosines

    # The fixed pair by hand, through the real tokenizer and text tower.
    with torch.inference_mode():
        text = F.normalize(tiny_clip.model.encode_text(tiny_clip.tokenizer(
            ["an outstanding picture", "a horrible picture"])).float(), dim=-1)
    expected = (images @ text[0] - images @ text[1]).numpy()
    np.testing.assert_allclose(scores["score_prompt_aesthetic"], expected, atol=1e-5)


def test_a_changed_prompt_changes_the_identity() -> None:
    prompt_sets = load_prompt_sets("default")
    first = prompt_sets.sets[0]
    changed = dataclasses.replace(prompt_sets, sets=(dataclasses.replace(first, positive=("a nice picture",)),
                                                     *prompt_sets.sets[1:]))
    assert changed.identity != prompt_sets.identity
