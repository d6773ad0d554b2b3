"""The few statistics every benchmark prints, written once.

Percentiles are nearest-rank over the sorted sample (no interpolation), so a p95 is a
latency some run really had; ``cell`` is the "median / p95" column the tables share and
``summary`` the "median, p95, max" line every benchmark prints.

Under ``benchmarks/run_all.py`` (which sets :data:`RESULTS_ENV` to a file), every
statistic printed through :func:`summary` or a named :func:`cell`, and every
:func:`record`, is also appended to that file as one JSON line, so the runner's table is
built from the very numbers the benchmark printed.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

#: The file (JSON lines) that ``run_all.py`` collects results in; unset: nothing is kept.
RESULTS_ENV = "FEDNODE_BENCH_RESULTS"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(name: str, values: Sequence[float], *, width: int = 40, indent: int = 2) -> str:
    """``name  median … p95 … max … ms (n=…)`` of ``values`` (milliseconds)."""
    label = f"{' ' * indent}{name:<{width}}"
    record_values(name, values)
    if not values:
        return f"{label} (no samples)"
    return (
        f"{label} median {statistics.median(values):8.1f}  p95 {percentile(values, 0.95):8.1f}"
        f"  max {max(values):8.1f} ms  (n={len(values)})"
    )


def cell(
    values: Sequence[float], *, width: int = 6, digits: int = 0, name: str | None = None
) -> str:
    """``median / p95 ms`` for a table cell; a dash when there is no sample. With a
    ``name`` the values are recorded for ``run_all.py`` too."""
    if name is not None:
        record_values(name, values)
    if not values:
        return f"{'-':>{2 * width + 10}}"
    median, p95 = statistics.median(values), percentile(values, 0.95)
    return f"{median:{width + 2}.{digits}f} / {p95:{width}.{digits}f} ms"


def record_values(name: str, values: Sequence[float], *, unit: str = "ms", ratio: str = "") -> None:
    """Record median, p95 and max of ``values`` for ``run_all.py`` (no-op outside it)."""
    if not values:
        record(name, median=None, p95=None, max_=None, n=0, unit=unit, ratio=ratio)
        return
    record(
        name,
        median=statistics.median(values),
        p95=percentile(values, 0.95),
        max_=max(values),
        n=len(values),
        unit=unit,
        ratio=ratio,
    )


def record(
    name: str,
    *,
    median: float | None,
    p95: float | None = None,
    max_: float | None = None,
    n: int = 1,
    unit: str = "ms",
    ratio: str = "",
) -> None:
    """Record one row for ``run_all.py``'s table (a single number: ``median`` only)."""
    target = os.environ.get(RESULTS_ENV)
    if not target:
        return
    row = {
        "benchmark": Path(sys.argv[0]).stem,
        "name": name.strip(),
        "median": median,
        "p95": p95,
        "max": max_,
        "n": n,
        "unit": unit,
        "ratio": ratio,
    }
    with Path(target).open("a") as out:
        out.write(json.dumps(row) + "\n")
