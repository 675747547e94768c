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
from tests.tolerances import as_float64, assert_within, gamma, unit_mean

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

    def rows(self, *texts: str) -> torch.Tensor:
        """The raw vectors of ``texts``, as encode_text gives them."""
        self.tokenizer(list(texts))
        return self.table[[self.ids[text] for text in texts]]


@pytest.fixture
def tower() -> _StubTextTower:
    return _StubTextTower()


def _stub_clip(tower: _StubTextTower) -> SimpleNamespace:
    return SimpleNamespace(tokenizer=tower.tokenizer, model=SimpleNamespace(encode_text=tower.encode_text),
                           device=torch.device("cpu"), embed_dim=DIM)


def _images(n: int = 7, dim: int = DIM) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(1)), dim=1)


def _similarity(images: torch.Tensor, *sides: tuple[np.ndarray, float]) -> tuple[np.ndarray, np.ndarray]:
    """The exact (float64) score of a set against unit ``images`` -- the similarity to the first side's
    direction, minus that to the second's if given -- and the bound on a float32 PromptBank score's distance
    from it. ``sides`` are :func:`tests.tolerances.unit_mean` results (direction, bound on the float32
    direction's distance from it). Per side: the dot product of D terms plus the subtraction, gamma_{D+1}
    |x| . |d|, and the direction's error, at most ||x|| eps (Cauchy-Schwarz)."""
    x = as_float64(images)
    value = x @ sides[0][0] - (x @ sides[1][0] if len(sides) > 1 else 0.0)
    bound = sum(gamma(x.shape[1] + 1) * np.abs(x) @ np.abs(direction) + np.linalg.norm(x, axis=1) * error
                for direction, error in sides)
    return value, bound


def _best_class(images: torch.Tensor, positives: list,
                negatives: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A best_class set's exact score, its bound, and the class each image takes: the one whose positive +
    negative similarity is highest, which must win by more than the rounding of those sums can move them
    (else float32 might pick another)."""
    pairs = [_similarity(images, p) + _similarity(images, n) for p, n in zip(positives, negatives)]
    sums = np.stack([p + n for p, _, n, _ in pairs], axis=1)
    sum_bounds = np.stack([bp + bn for _, bp, _, bn in pairs], axis=1) + gamma(1) * np.abs(sums)
    best = sums.argmax(axis=1)
    rows = np.arange(len(best))
    runner_up = np.where(np.arange(sums.shape[1]) == best[:, None], -np.inf, sums + sum_bounds).max(axis=1)
    assert (sums[rows, best] - sum_bounds[rows, best] > runner_up).all(), "a near tie between classes"
    value = np.stack([p - n for p, _, n, _ in pairs], axis=1)[rows, best]
    bound = np.stack([bp + bn for _, bp, _, bn in pairs], axis=1)[rows, best]
    return value, bound, best


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
    expected, bound = _similarity(images, unit_mean(tower.rows("good")), unit_mean(tower.rows("bad")))
    assert_within(bank.score(images)["score_prompt_pair"], expected, bound, "pair")


def test_ensembling_averages_unit_vectors_and_renormalises(tower) -> None:
    bank = PromptBank.build(_stub_clip(tower), _sets("""
        version: 1
        sets:
          pos_only: {positive: [a, b, c]}
          with_classes: {positive: ["x {class}", "y {class}"], negative: "z {class}", classes: [p, q]}
    """))
    images = _images()
    scores = bank.score(images)
    expected, bound = _similarity(images, unit_mean(tower.rows("a", "b", "c")))
    assert_within(scores["score_prompt_pos_only"], expected, bound, "pos_only")
    expected, bound = _similarity(images, unit_mean(tower.rows("x p", "y p", "x q", "y q")),
                                  unit_mean(tower.rows("z p", "z q")))
    assert_within(scores["score_prompt_with_classes"], expected, bound, "with_classes")
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
    images = _images(20)
    scores = bank.score(images)
    assert np.abs(scores["score_prompt_forward"]).min() > 0
    # Each is within its float32 bound of the exact value (the other's negative), so of each other by twice it.
    _, bound = _similarity(images, unit_mean(tower.rows("good", "fine")), unit_mean(tower.rows("bad", "awful")))
    assert_within(scores["score_prompt_forward"], -scores["score_prompt_backward"], 2 * bound, "swapped pair")
    classes = ("a", "b", "c")
    _, bound, _ = _best_class(images, [unit_mean(tower.rows(f"good {c}")) for c in classes],
                              [unit_mean(tower.rows(f"bad {c}")) for c in classes])
    assert_within(scores["score_prompt_forward_context"], -scores["score_prompt_backward_context"], 2 * bound,
                  "swapped best_class")


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
    classes = ("dog", "cat", "car")
    expected, bound, best = _best_class(images, [unit_mean(tower.rows(f"good {c}", f"great {c}")) for c in classes],
                                        [unit_mean(tower.rows(f"bad {c}")) for c in classes])
    assert_within(bank.score(images)["score_prompt_context"], expected, bound, "best_class")
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


class _RecordingTextTower:
    """Stands in for the CLIP model: runs its text tower and keeps each batch of tokens and embeddings."""

    def __init__(self, model) -> None:
        self.model, self.tokens, self.embeddings = model, [], []

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.encode_text(tokens)
        self.tokens.append(tokens.clone())
        self.embeddings.append(embeddings.detach().clone())
        return embeddings


def test_default_prompt_bank_on_tiny_random(tiny_clip) -> None:
    prompt_sets = load_prompt_sets("default")
    recorder = _RecordingTextTower(tiny_clip.model)
    bank = PromptBank.build(dataclasses.replace(tiny_clip, model=recorder), prompt_sets)
    images = _images(5, tiny_clip.embed_dim)
    scores = bank.score(images)
    assert list(scores) == list(prompt_sets.columns)
    for values in scores.values():
        assert values.dtype == np.float32 and values.shape == (5,) and np.isfinite(values).all()
        assert np.abs(values).max() <= 2  # a difference of two cosines

    # The fixed pair by hand, from the real tokenizer's tokens and what the text tower made of them. (The
    # tower's float32 output for a prompt may depend on the batch it ran in, so it is taken as it came out.)
    tokens, embeddings = torch.cat(recorder.tokens), torch.cat(recorder.embeddings)

    def tower_output(text: str) -> torch.Tensor:
        (row,) = torch.nonzero((tokens == tiny_clip.tokenizer([text])[0]).all(dim=1))[:, 0].tolist()
        return embeddings[row]

    expected, bound = _similarity(images, unit_mean(tower_output("an outstanding picture")),
                                  unit_mean(tower_output("a horrible picture")))
    assert_within(scores["score_prompt_aesthetic"], expected, bound, "aesthetic")


def test_a_changed_prompt_changes_the_identity() -> None:
    prompt_sets = load_prompt_sets("default")
    first = prompt_sets.sets[0]
    changed = dataclasses.replace(prompt_sets, sets=(dataclasses.replace(first, positive=("a nice picture",)),
                                                     *prompt_sets.sets[1:]))
    assert changed.identity != prompt_sets.identity
