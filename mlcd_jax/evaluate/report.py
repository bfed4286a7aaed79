"""Evaluation results as a printed table and as JSON."""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from typing import Any

from mlcd_jax import fileio

# A column whose name contains one of these holds accuracies in [0, 1]; the table prints them as percentages.
ACCURACY_MARKERS: tuple[str, ...] = ("top1", "top5", "acc", "_r@")


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(value)
    if any(m in column for m in ACCURACY_MARKERS) and 0.0 <= value <= 1.0:
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def results_table(rows: list[dict], columns: Sequence[str]) -> str:
    """Aligned plain-text table of ``rows`` (one per model) in ``columns``; a missing value prints ``-``.

    Accuracies in [0, 1] (columns named like :data:`ACCURACY_MARKERS`) print as ``97.3%``, other floats
    with 4 significant digits; numbers are right-aligned, text left-aligned.
    """
    if not columns:
        raise ValueError("results_table needs at least one column")
    cells = [[_cell(c, row.get(c)) for c in columns] for row in rows]
    numeric = [all(isinstance(row.get(c), numbers.Number) for row in rows if row.get(c) is not None) for c in columns]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(width) if right else v.ljust(width) for v, width, right in zip(values, widths, numeric)
        ).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    """``rows`` in ``columns`` as a Markdown table (a model card's), cells as :func:`results_table` prints them."""
    cells = [[_cell(c, row.get(c)) for c in columns] for row in rows]
    return "\n".join("| " + " | ".join(r) + " |" for r in [list(columns), ["---"] * len(columns), *cells])


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays → Python numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_results(rows: list[dict], path: fileio.PathLike) -> None:
    """Writes ``rows`` as a JSON list to ``path`` (local or ``gs://``) atomically, creating its folder."""
    fileio.write_atomic(path, json.dumps(rows, indent=2, default=_json_default) + "\n")
