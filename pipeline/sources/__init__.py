"""Input formats: each module here with a module-level ``SOURCE`` is one (see :class:`base.Source`).

Modules are found, not listed, so a new format is one new module. They are imported on first use,
not with the package: the read stage imports this package, and a format's module imports the read stage.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from typing import Any, Mapping, Sequence

from pipeline.errors import InputError
from pipeline.sources.base import Listing, Source, StorageError, UnitPlan, WorkItem, WorkUnit, list_entries

__all__ = ["Listing", "Source", "StorageError", "UnitPlan", "WorkItem", "WorkUnit", "describe", "get_source",
           "list_input", "list_items", "resolve_format", "source_for_row", "source_names"]


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, Source]:
    found: dict[str, Source] = {}
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        source = getattr(importlib.import_module(f"{__name__}.{module.name}"), "SOURCE", None)
        if source is not None:
            found[source.name] = source
    return found


def source_names() -> tuple[str, ...]:
    return tuple(_registry())


def get_source(name: str) -> Source:
    """The format ``name``; ``auto`` (a config not yet resolved against its listing) reads img2dataset shards."""
    return _registry()["webdataset" if name == "auto" else name]


def resolve_format(listing: Listing, wanted: str, inputs: Sequence[str]) -> Source:
    """The format to read a listing as: ``wanted``, or with ``auto`` the one format that claims it."""
    if wanted != "auto":
        return get_source(wanted)
    claiming = [source for source in _registry().values() if source.claims(listing)]
    if len(claiming) == 1:
        return claiming[0]
    where = ", ".join(inputs)
    if not claiming:
        raise InputError(f"nothing to score under {where}: no input format ({', '.join(_registry())}) "
                         f"recognises it; give --input-format to say what the input is")
    names = " or ".join(s.name for s in claiming)
    raise InputError(f"the input {where} could be read as {names}; say which with --input-format")


def list_input(inputs: Sequence[str], storage_options: Mapping[str, Any] | None, input_config: Any,
               listing: Listing | None = None) -> tuple[Source, Sequence[WorkItem]]:
    """The input's format and work items, for an InputConfig; nothing to score is an InputError.

    ``listing``: the input's listing when the caller made it (pipeline.io.listing); else it is listed here."""
    if listing is None:
        listing = Listing.of(list_entries(inputs, storage_options))
    source = resolve_format(listing, input_config.format, inputs)
    items = source.list_items(listing, input_config.resolved(source.name).options)
    if not len(items):
        raise InputError(f"no {source.name} input to score under {', '.join(inputs)}")
    return source, items


def list_items(config: Any) -> tuple[Source, Sequence[WorkItem]]:
    """:func:`list_input` for a ScoreConfig, listed in full."""
    return list_input(config.input, config.storage_options, config.source)


def describe(input_config: Any) -> dict[str, Any]:
    """A resolved InputConfig as JSON, as run summaries keep it (``InputConfig(**it)`` reads it back)."""
    options = input_config.options
    return {"format": input_config.format,
            "options": dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)}


def source_for_row(shard: str, member: str | None) -> Source:
    """The format an output row was read from, by its ``shard`` and member."""
    for source in _registry().values():
        if source.owns_row(shard, member):
            return source
    raise ValueError(f"no input format reads back a row of {shard!r} (member {member!r})")
