"""What the two sums share: the subtask at every organization, and waiting for siblings."""

from __future__ import annotations

import time
from typing import Any

from vantage6.algorithm.client import AlgorithmClient
from vantage6.algorithm.tools.util import info


def run_subtask(
    client: AlgorithmClient,
    method: str,
    column_name: str,
    organizations: list[int] | None,
    what: str,
) -> list[dict[str, Any]]:
    """``method`` of ``column_name`` at the organizations (all, if ``None``); each one's
    result once all have one. Every run gets ``parties``, the number of organizations."""
    if organizations is None:
        organizations = [org["id"] for org in client.organization.list()]
    task = client.task.create(
        input_={
            "method": method,
            "kwargs": {"column_name": column_name, "parties": len(organizations)},
        },
        organizations=organizations,
        name=method,
        description=f"{what} of {column_name!r}",
    )
    info(f"waiting for the results of subtask {task['id']} ({method})")
    results: list[dict[str, Any]] = client.wait_for_results(task_id=task["id"])
    return results


def sibling_addresses(client: AlgorithmClient, count: int, deadline: float) -> list[dict[str, Any]]:
    """The other organizations' runs of this subtask, once all have registered a port."""
    while True:
        addresses = client.vpn.get_sibling_addresses()
        if isinstance(addresses, list) and len(addresses) >= count:
            info(f"siblings: {[(a['organization_id'], a['ip'], a['port']) for a in addresses]}")
            return sorted(addresses, key=lambda a: a["organization_id"])[:count]
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {addresses!r} of {count} siblings registered")
        time.sleep(1)
