"""Zero-shot prompt scores: CLIP text prompts turned into score columns beside the heads.

A *prompt set* becomes one float32 column, ``score_prompt_<name>``::

    score = cos(image, positive) - cos(image, negative)

positive when the image looks more like the positive prompts than the negative ones (a set without
negatives scores ``cos(image, positive)``). The methods, from prompting CLIP for image aesthetics:

- a fixed pair: one positive and one negative prompt ("an outstanding picture" / "a horrible picture");
- ensembling: several prompts on a side are embedded, each unit vector averaged, the mean re-normalised,
  so any number of phrasings costs one similarity per side;
- context-aware prompts: templates with a ``{class}`` slot filled from a list of class names
  ("an outstanding picture of a {class}"). ``combine: ensemble`` averages over classes and templates;
  ``combine: best_class`` keeps one pair per class (templates averaged) and lets the class whose pair the
  image matches best, by ``cos(pos) + cos(neg)``, pick the pair: the content chooses its own context;
- attribute profiles: sets named for what they measure (composition, lighting, framing, ...), so the columns
  say why an image scored high.

Prompt sets live in YAML (the shipped defaults: ``pipeline/data/prompts.yaml``)::

    version: 1
    class_lists:                      # optional: lists shared by sets
      subjects: [landscape, portrait]  # inline, or {file: subjects.txt} (one per line, beside the YAML)
    sets:
      aesthetic:                      # column score_prompt_aesthetic; [a-z][a-z0-9_]*
        description: fixed pair       # optional
        positive: an outstanding picture        # a string or a list of strings
        negative: a horrible picture            # optional
      aesthetic_context:
        positive: ["an outstanding picture of a {class}"]
        negative: ["a horrible picture of a {class}"]
        classes: subjects              # a class_lists name, or an inline list; needs {class} in every prompt
        combine: best_class            # ensemble (default) or best_class

Text vectors are computed once (per actor) by :meth:`PromptBank.build`; scoring is one matmul of the image
embeddings with every prompt vector of every set, then a few column operations.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import pathlib
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from pipeline import schema
from pipeline.config import ConfigError

DEFAULT_PROMPTS = "default"
DEFAULT_PROMPTS_FILE = pathlib.Path(__file__).resolve().parent.parent / "data" / "prompts.yaml"
CLASS_SLOT = "{class}"
COLUMN_PREFIX = "prompt_"
FORMAT_VERSION = 1
TEXT_BATCH_SIZE = 256  # prompts per encode_text call: bounds activation memory of the text tower
_ZERO_COLUMN = 0


class Combine:
    ENSEMBLE = "ensemble"
    BEST_CLASS = "best_class"
    ALL = (ENSEMBLE, BEST_CLASS)


_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_SET_KEYS = frozenset({"description", "positive", "negative", "classes", "combine"})
_TOP_KEYS = frozenset({"version", "class_lists", "sets"})


class PromptConfigError(ConfigError):
    """A prompt file that does not follow the schema; the message names the file and the key."""


def prompt_column(set_name: str) -> str:
    """The output column of a prompt set: ``score_prompt_<name>``."""
    return schema.score_column(COLUMN_PREFIX + set_name)


@dataclass(frozen=True)
class PromptSet:
    """One score column's prompts, with ``{class}`` templates not yet filled in."""

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    combine: str = Combine.ENSEMBLE
    description: str = ""

    @property
    def column(self) -> str:
        return prompt_column(self.name)

    def prompts_by_class(self, side: Sequence[str]) -> list[list[str]]:
        """The side's prompts per class (one group holding the templates as they are when there are no
        classes)."""
        if not self.classes:
            return [list(side)]
        return [[template.replace(CLASS_SLOT, name) for template in side] for name in self.classes]


@dataclass(frozen=True)
class PromptSets:
    """The parsed prompt file: its sets in file order and where they came from."""

    sets: tuple[PromptSet, ...]
    source: str

    @property
    def digest(self) -> str:
        """sha256 of the expanded content (class files included), so the identity changes with any prompt."""
        content = [dict(name=s.name, positive=s.positive, negative=s.negative, classes=s.classes,
                        combine=s.combine) for s in self.sets]
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    @property
    def identity(self) -> str:
        """``prompts:<file name>@<sha256[:12]>``: what unit records can say beside model and head."""
        return f"prompts:{pathlib.PurePosixPath(self.source).name}@{self.digest[:12]}"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sets)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(s.column for s in self.sets)


# -- parsing -------------------------------------------------------------------------------------


def _fail(where: str, message: str) -> PromptConfigError:
    return PromptConfigError(f"{where}: {message}")


def _strings(value: Any, where: str) -> tuple[str, ...]:
    """A non-empty string or a non-empty list of non-empty strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise _fail(where, f"must be a string or a non-empty list of strings, got {value!r}")
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise _fail(where, f"every entry must be a non-empty string, got {item!r}")
    return tuple(item.strip() for item in items)


def _class_file(reference: Any, base_dir: pathlib.Path | None, where: str) -> tuple[str, ...]:
    if not (isinstance(reference, Mapping) and set(reference) == {"file"} and isinstance(reference["file"], str)):
        raise _fail(where, f"must be a list of class names or {{file: PATH}}, got {reference!r}")
    path = pathlib.Path(reference["file"])
    if not path.is_absolute():
        if base_dir is None:
            raise _fail(where, f"relative class file {path} needs the prompt file's folder; give an absolute path")
        path = base_dir / path
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise _fail(where, f"cannot read class file: {error}") from None
    names = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not names:
        raise _fail(where, f"class file {path} lists no classes")
    return names


def _class_lists(value: Any, base_dir: pathlib.Path | None, where: str) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(where, f"must map list names to class names, got {type(value).__name__}")
    lists = {}
    for name, entries in value.items():
        here = f"{where}.{name}"
        lists[str(name)] = (_strings(entries, here) if isinstance(entries, list)
                            else _class_file(entries, base_dir, here))
    return lists


def _prompt_set(name: Any, body: Any, class_lists: Mapping[str, tuple[str, ...]], where: str) -> PromptSet:
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail(where, f"set name {name!r} must match [a-z][a-z0-9_]* (it becomes a column name)")
    if not isinstance(body, Mapping):
        raise _fail(where, f"must be a mapping with 'positive' (and usually 'negative'), got {body!r}")
    unknown = set(body) - _SET_KEYS
    if unknown:
        raise _fail(where, f"unknown key(s) {sorted(unknown)}; known: {sorted(_SET_KEYS)}")
    if "positive" not in body:
        raise _fail(where, "'positive' is required")
    positive = _strings(body["positive"], f"{where}.positive")
    negative = _strings(body["negative"], f"{where}.negative") if body.get("negative") is not None else ()

    classes: tuple[str, ...] = ()
    reference = body.get("classes")
    if isinstance(reference, str):
        if reference not in class_lists:
            raise _fail(f"{where}.classes", f"no class list named {reference!r}; class_lists has {sorted(class_lists)}")
        classes = class_lists[reference]
    elif reference is not None:
        classes = _strings(reference, f"{where}.classes")

    for side, prompts in (("positive", positive), ("negative", negative)):
        for prompt in prompts:
            if classes and CLASS_SLOT not in prompt:
                raise _fail(f"{where}.{side}", f"{prompt!r} has no {CLASS_SLOT} slot, but the set has classes")
            if not classes and CLASS_SLOT in prompt:
                raise _fail(f"{where}.{side}", f"{prompt!r} has a {CLASS_SLOT} slot, but the set has no 'classes'")

    combine = body.get("combine", Combine.ENSEMBLE)
    if combine not in Combine.ALL:
        raise _fail(f"{where}.combine", f"must be one of {Combine.ALL}, got {combine!r}")
    if combine == Combine.BEST_CLASS and not classes:
        raise _fail(f"{where}.combine", f"{Combine.BEST_CLASS} needs 'classes'")
    description = body.get("description", "")
    if not isinstance(description, str):
        raise _fail(f"{where}.description", f"must be a string, got {description!r}")
    return PromptSet(name, positive, negative, classes, combine, description.strip())


def parse_prompt_sets(document: Any, source: str = "<memory>",
                      base_dir: str | pathlib.Path | None = None) -> PromptSets:
    """Validate a loaded prompt document (see the module docstring) into :class:`PromptSets`."""
    if not isinstance(document, Mapping):
        raise _fail(source, f"a prompt file is a mapping with 'version' and 'sets', got {type(document).__name__}")
    unknown = set(document) - _TOP_KEYS
    if unknown:
        raise _fail(source, f"unknown top-level key(s) {sorted(unknown)}; known: {sorted(_TOP_KEYS)}")
    if document.get("version") != FORMAT_VERSION:
        raise _fail(source, f"'version' must be {FORMAT_VERSION}, got {document.get('version')!r}")
    base = pathlib.Path(base_dir) if base_dir is not None else None
    class_lists = _class_lists(document.get("class_lists"), base, f"{source}: class_lists")
    sets = document.get("sets")
    if not isinstance(sets, Mapping) or not sets:
        raise _fail(source, "'sets' must be a non-empty mapping of set name to prompts")
    parsed = tuple(_prompt_set(name, body, class_lists, f"{source}: sets.{name}") for name, body in sets.items())
    columns = [s.column for s in parsed]
    if len(set(columns)) != len(columns):
        raise _fail(source, f"set names map to clashing columns: {columns}")
    return PromptSets(parsed, source)


def load_prompt_sets(source: str = DEFAULT_PROMPTS, storage_options: Mapping[str, Any] | None = None) -> PromptSets:
    """Prompt sets from ``"default"`` (the shipped file), a local path, or an fsspec URI."""
    if source == DEFAULT_PROMPTS:
        source = str(DEFAULT_PROMPTS_FILE)
    base_dir = None
    try:
        if "://" in source and not source.startswith("file://"):
            from pipeline.io.storage import filesystem

            fs, path = filesystem(source, storage_options)
            with fs.open(path, "rb") as handle:
                text = handle.read().decode("utf-8")
        else:
            path = pathlib.Path(source.removeprefix("file://"))
            text = path.read_text(encoding="utf-8")
            base_dir = path.parent
    except (OSError, UnicodeDecodeError) as error:
        raise PromptConfigError(f"cannot read prompt file {source}: {error}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PromptConfigError(f"{source}: not valid YAML: {error}") from None
    return parse_prompt_sets(document, source, base_dir)


# -- embedding and scoring -----------------------------------------------------------------------


def embed_texts(clip: Any, texts: Sequence[str], batch_size: int = TEXT_BATCH_SIZE) -> torch.Tensor:
    """(T, D) float32 L2-normalised text embeddings, on the model's device. ``clip`` is a LoadedClip."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            tokens = clip.tokenizer(list(texts[start:start + batch_size])).to(clip.device)
            chunks.append(F.normalize(clip.model.encode_text(tokens).float(), dim=-1))
    return torch.cat(chunks) if chunks else torch.empty((0, clip.embed_dim), device=clip.device)


def _flatten(groups: list[list[str]]) -> list[str]:
    return list(itertools.chain.from_iterable(groups))


def _ensemble(vectors: torch.Tensor) -> torch.Tensor:
    """Average unit vectors and re-normalise: one direction standing for all the phrasings."""
    return F.normalize(vectors.mean(dim=0), dim=-1)


@dataclass(frozen=True, eq=False)
class _BestClassLayout:
    """Column indices, into the prompt matrix, of one best_class set's per-class vectors."""

    output: int  # the set's position among the output columns
    positive: torch.Tensor  # (C,) long
    negative: torch.Tensor | None  # (C,) long, or None for a positive-only set


class PromptBank:
    """Every prompt vector of every set in one (D, P) matrix; scores all sets with one matmul.

    Column 0 of the matrix is a zero vector: a set without negatives subtracts its zero similarity, so
    ensemble sets score as one gather-and-subtract over the similarity matrix.
    """

    def __init__(self, prompt_sets: PromptSets, vectors: torch.Tensor, ensemble_positive: Sequence[int],
                 ensemble_negative: Sequence[int], ensemble_outputs: Sequence[int],
                 best_class: Sequence[_BestClassLayout]):
        if vectors.ndim != 2 or not torch.isfinite(vectors).all():
            raise ValueError("prompt vectors must be a finite (P, D) matrix")
        self.prompt_sets = prompt_sets
        self.device = vectors.device
        self.embed_dim = int(vectors.shape[1])
        self._matrix = vectors.float().T.contiguous()  # (D, P)
        self._ensemble_positive = torch.tensor(ensemble_positive, dtype=torch.long, device=self.device)
        self._ensemble_negative = torch.tensor(ensemble_negative, dtype=torch.long, device=self.device)
        self._ensemble_outputs = torch.tensor(ensemble_outputs, dtype=torch.long, device=self.device)
        self._best_class = tuple(best_class)

    @classmethod
    def build(cls, clip: Any, prompt_sets: PromptSets, batch_size: int = TEXT_BATCH_SIZE) -> "PromptBank":
        """Embed every distinct prompt once with ``clip``'s text tower (a LoadedClip) and lay out the sets."""
        texts: dict[str, int] = {}
        for prompt_set in prompt_sets.sets:
            for side in (prompt_set.positive, prompt_set.negative):
                for group in prompt_set.prompts_by_class(side) if side else ():
                    for text in group:
                        texts.setdefault(text, len(texts))
        unit = embed_texts(clip, list(texts), batch_size)

        columns = [torch.zeros(unit.shape[1], device=unit.device)]  # column 0: the "negative" of positive-only sets

        def add(prompts: list[str]) -> int:
            """Append the ensembled vector of ``prompts`` as a matrix column; its index."""
            columns.append(_ensemble(unit[[texts[text] for text in prompts]]))
            return len(columns) - 1

        ensemble_positive, ensemble_negative, ensemble_outputs, best_class = [], [], [], []
        for output, prompt_set in enumerate(prompt_sets.sets):
            positive_groups = prompt_set.prompts_by_class(prompt_set.positive)
            negative_groups = prompt_set.prompts_by_class(prompt_set.negative) if prompt_set.negative else None
            if prompt_set.combine == Combine.ENSEMBLE:
                # Flattened over classes and templates: the mean of all unit prompt vectors on a side.
                ensemble_positive.append(add(_flatten(positive_groups)))
                ensemble_negative.append(add(_flatten(negative_groups)) if negative_groups else _ZERO_COLUMN)
                ensemble_outputs.append(output)
            else:  # best_class: one vector per class and side, templates averaged
                best_class.append(_BestClassLayout(
                    output, torch.tensor([add(group) for group in positive_groups], device=unit.device),
                    torch.tensor([add(group) for group in negative_groups], device=unit.device)
                    if negative_groups else None))
        return cls(prompt_sets, torch.stack(columns), ensemble_positive, ensemble_negative, ensemble_outputs,
                   best_class)

    @property
    def names(self) -> tuple[str, ...]:
        return self.prompt_sets.names

    @property
    def columns(self) -> tuple[str, ...]:
        return self.prompt_sets.columns

    @property
    def identity(self) -> str:
        return self.prompt_sets.identity

    @property
    def prompt_count(self) -> int:
        """Vectors compared with each image (the zero column included)."""
        return int(self._matrix.shape[1])

    def score_matrix(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised image embeddings on this bank's device -> (N, S) float32, sets in file order."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"prompt sets {list(self.names)} were embedded in {self.embed_dim}-d; "
                             f"got image embeddings of shape {tuple(embeddings.shape)}")
        similarity = embeddings.float() @ self._matrix  # (N, P): the one matmul
        scores = similarity.new_empty((similarity.shape[0], len(self.prompt_sets.sets)))
        if len(self._ensemble_outputs):
            scores[:, self._ensemble_outputs] = (similarity[:, self._ensemble_positive]
                                                 - similarity[:, self._ensemble_negative])
        for layout in self._best_class:
            positive = similarity[:, layout.positive]  # (N, C)
            if layout.negative is None:
                scores[:, layout.output] = positive.max(dim=1).values
                continue
            negative = similarity[:, layout.negative]
            best = (positive + negative).argmax(dim=1, keepdim=True)  # the class the image looks most like
            scores[:, layout.output] = (positive.gather(1, best) - negative.gather(1, best))[:, 0]
        return scores

    def score(self, embeddings: torch.Tensor) -> dict[str, np.ndarray]:
        """Column name (``score_prompt_<set>``) -> (N,) float32 numpy scores."""
        with torch.inference_mode():
            matrix = self.score_matrix(embeddings.to(self.device)).cpu().numpy()
        return {column: np.ascontiguousarray(matrix[:, i]) for i, column in enumerate(self.columns)}


def build_prompt_bank(clip: Any, prompts: str | PromptSets,
                      storage_options: Mapping[str, Any] | None = None) -> PromptBank:
    """A PromptBank for ``prompts`` (``"default"``, a path/URI, or already parsed sets) on ``clip``."""
    prompt_sets = prompts if isinstance(prompts, PromptSets) else load_prompt_sets(prompts, storage_options)
    return PromptBank.build(clip, prompt_sets)
