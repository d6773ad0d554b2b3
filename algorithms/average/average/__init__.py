"""Federated average of one numeric column: a vantage6 4.x algorithm.

Two methods, dispatched by ``vantage6.algorithm.tools.wrap.wrap_algorithm`` from the
task input ``{"method": ..., "kwargs": {...}}``:

- ``partial_average(column_name)`` runs at each data station on the node's database
  (read by ``@data(1)``) and returns the column's ``{"sum": ..., "count": ...}``;
- ``central_average(column_name, organizations=None)`` creates a ``partial_average``
  subtask through the node's proxy (``@algorithm_client``), waits for the partial
  results, and returns ``{"average": ...}`` (with the totals it was computed from).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from vantage6.algorithm.client import AlgorithmClient
from vantage6.algorithm.tools.decorators import algorithm_client, data
from vantage6.algorithm.tools.util import info


@algorithm_client
def central_average(
    client: AlgorithmClient,
    column_name: str,
    organizations: list[int] | None = None,
) -> dict[str, Any]:
    """Combine the partial sums and counts of every organization into one average.

    ``organizations`` defaults to all organizations of the collaboration.
    """
    if organizations is None:
        organizations = [org["id"] for org in client.organization.list()]
    info(f"creating partial_average subtask for organizations {organizations}")
    task = client.task.create(
        input_={"method": "partial_average", "kwargs": {"column_name": column_name}},
        organizations=organizations,
        name="partial_average",
        description=f"partial sums of column {column_name!r}",
    )
    info(f"waiting for the results of subtask {task['id']}")
    partials = client.wait_for_results(task_id=task["id"])
    total = sum(partial["sum"] for partial in partials)
    count = sum(partial["count"] for partial in partials)
    return {
        "average": total / count if count else None,
        "sum": total,
        "count": count,
        "organizations": len(partials),
    }


@data(1)
def partial_average(df: pd.DataFrame, column_name: str) -> dict[str, Any]:
    """Sum and count of the non-missing values of ``column_name`` in this node's data."""
    column = pd.to_numeric(df[column_name], errors="raise").dropna()
    info(f"partial_average over {len(column)} values of {column_name!r}")
    # .item() gives plain Python numbers, which the JSON serializer accepts.
    return {"sum": column.sum().item(), "count": int(column.count())}
