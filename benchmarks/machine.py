"""The machine a benchmark ran on, in one line for its CSV (`machine` column), and the CSV writer the
scripts share; imported by the scripts beside it (`python benchmarks/NAME.py` puts this folder on the path)."""

from __future__ import annotations

import csv
import os
import platform
from pathlib import Path


def machine() -> str:
    """e.g. "x86_64 AMD EPYC 9R14 x2, 24 GiB": architecture, CPU model, CPU count, memory."""
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{platform.machine()} {model or platform.processor()} x{os.cpu_count()}, {memory:.0f} GiB"


def write_rows(path: Path, rows: list[dict], context: dict | None = None, *, append: bool = False) -> None:
    """`rows` to the CSV at `path` (its folder made), each after `context`'s columns. The header comes
    first in a new file; with `append` an existing file gets rows only."""
    context = context or {}
    new = not (append and path.exists())
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w" if new else "a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[*context, *rows[0]])
        if new:
            writer.writeheader()
        writer.writerows({**context, **row} for row in rows)
