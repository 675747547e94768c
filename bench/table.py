"""The plain-text tables every benchmark prints: a header, a rule, one line per row."""

from __future__ import annotations

from typing import Sequence


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], numbers_right: bool = True) -> str:
    """Columns as wide as their widest cell; right-aligned (for figures) unless ``numbers_right`` is False."""
    lines = [[str(cell) for cell in line] for line in (header, *rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def join(cells: Sequence[str]) -> str:
        text = "  ".join(cell.rjust(w) if numbers_right else cell.ljust(w) for cell, w in zip(cells, widths))
        return text.rstrip()

    return "\n".join([join(lines[0]), join(["-" * w for w in widths])] + [join(line) for line in lines[1:]])
