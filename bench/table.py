"""The plain-text tables every benchmark prints: a header, a rule, one line per row."""

from __future__ import annotations

from typing import Sequence

from tabulate import tabulate


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], numbers_right: bool = True) -> str:
    """Columns as wide as their widest cell; right-aligned (for figures) unless ``numbers_right`` is False."""
    align = "right" if numbers_right else "left"
    return tabulate([[str(c) for c in row] for row in rows], headers=[str(h) for h in header], tablefmt="simple",
                    disable_numparse=True, colalign=(align,) * len(header))
