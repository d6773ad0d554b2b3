"""The few statistics every benchmark prints, written once.

Percentiles are nearest-rank over the sorted sample (no interpolation), so a p95 is a
latency some run really had; ``cell`` is the "median / p95" column the tables share and
``summary`` the "median, p95, max" line every benchmark prints.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(name: str, values: Sequence[float], *, width: int = 40, indent: int = 2) -> str:
    """``name  median … p95 … max … ms (n=…)`` of ``values`` (milliseconds)."""
    label = f"{' ' * indent}{name:<{width}}"
    if not values:
        return f"{label} (no samples)"
    return (
        f"{label} median {statistics.median(values):8.1f}  p95 {percentile(values, 0.95):8.1f}"
        f"  max {max(values):8.1f} ms  (n={len(values)})"
    )


def cell(values: Sequence[float], *, width: int = 6, digits: int = 0) -> str:
    """``median / p95 ms`` for a table cell; a dash when there is no sample."""
    if not values:
        return f"{'-':>{2 * width + 10}}"
    median, p95 = statistics.median(values), percentile(values, 0.95)
    return f"{median:{width + 2}.{digits}f} / {p95:{width}.{digits}f} ms"
