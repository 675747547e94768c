"""The README's "Layout of the code" names every module and package of the library."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import pipeline

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_module_and_package_of_pipeline_is_named_in_the_layout_section():
    text = README.read_text(encoding="utf-8")
    layout = text.split("## Layout of the code", 1)[1].split("\n## ", 1)[0]
    names = [f"`{m.name}/`" if m.ispkg else f"`{m.name}.py`" for m in pkgutil.iter_modules(pipeline.__path__)
             if m.name != "__init__"]
    missing = [name for name in names if name not in layout]
    assert not missing, f"the README's layout section does not name {missing}"
    assert "`data/`" in layout
