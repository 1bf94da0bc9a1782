"""Rows of results (dicts) as text: the one CSV writer (exact), the one Markdown table writer (rounded) and
the one value formatter (booleans `true`/`false`, as MLproject and MLflow params write them)."""

import csv
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np


def value_text(value: Any) -> str:
    """A value as MLflow params and CSV files show it: `true`/`false`, "" for None, else `str`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def cell(value: Any, digits: int | None = None) -> str:
    """A value as a Markdown table shows it: floats rounded (`digits` decimals, else 3 significant
    digits below 100 and thousands separators above), NaN and None as "n/a"/""."""
    if isinstance(value, bool) or value is None:
        return value_text(value)
    if not isinstance(value, float) or math.isinf(value):
        return str(value)
    if math.isnan(value):
        return "n/a"
    if digits is not None:
        return f"{value:.{digits}f}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key of every row, in first-seen order."""
    return list(dict.fromkeys(k for row in rows for k in row))


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """CSV with a header (`columns`: default every key seen); floats in full precision, None empty."""
    names = list(columns) if columns is not None else columns_of(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        # repr(float(v)): full precision, also for NumPy floats (whose own repr is "np.float64(...)").
        writer.writerow({k: (repr(float(v)) if isinstance(v, float) else value_text(v)) for k, v in row.items()})
    return buffer.getvalue()


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *,
                   headers: Mapping[str, str] | None = None, digits: Mapping[str, int] | None = None,
                   right: Sequence[str] = ()) -> str:
    """A Markdown table of `columns` (titled by `headers`); strings kept, other values through `cell` with the
    column's `digits`; columns in `right` right-aligned."""
    headers, digits = dict(headers or {}), dict(digits or {})
    lines = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |",
             "|" + "|".join("---:" if c in right else "---" for c in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(v if isinstance(v := row.get(c), str) else cell(v, digits.get(c))
                                       for c in columns) + " |")
    return "\n".join(lines) + "\n"


def confusion_rows(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The confusion matrix as its non-zero cells, the most frequent first: true and predicted class, count
    and share of the true class's examples. A sparse matrix: at most one row per example at any class count."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    cells, counts = np.unique(np.stack([labels, predictions], axis=1), axis=0, return_counts=True)
    support = np.bincount(labels, minlength=len(class_names)).tolist()
    order = np.argsort(-counts, kind="stable")
    return [{"true": class_names[t], "predicted": class_names[p], "count": int(c), "fraction_of_true": c / support[t]}
            for (t, p), c in zip(cells[order].tolist(), counts[order].tolist())]
