"""The same sum with MPyC (PyPI ``mpyc``), a real multi-party computation framework.

MPyC runs one program per party; the parties connect to each other over TCP (party ``i``
listens on its port and connects to every party after it) and compute on Shamir secret
shares. Here each organization's run is a party: its index is its organization's rank
among the subtask's organizations, it listens on 8888 (the declared port), and it is told
the other parties' addresses with the vantage6 4 API (``get_sibling_addresses``) — the
node's forwarders, which carry MPyC's connections through the relay like any other TCP.

- ``central_mpc_sum(column_name, organizations=None)`` creates the ``partial_mpc_sum``
  subtask and returns the total the parties computed (each party learns it; all agree).
- ``partial_mpc_sum(column_name, parties)`` inputs this organization's column sum as a
  secret-shared ``SecInt`` and outputs only the sum over all parties.
"""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any

import pandas as pd
from vantage6.algorithm.client import AlgorithmClient
from vantage6.algorithm.tools.decorators import algorithm_client, data
from vantage6.algorithm.tools.util import info

PORT = 8888


@algorithm_client
def central_mpc_sum(
    client: AlgorithmClient, column_name: str, organizations: list[int] | None = None
) -> dict[str, Any]:
    if organizations is None:
        organizations = [org["id"] for org in client.organization.list()]
    task = client.task.create(
        input_={
            "method": "partial_mpc_sum",
            "kwargs": {"column_name": column_name, "parties": len(organizations)},
        },
        organizations=organizations,
        name="partial_mpc_sum",
        description=f"MPyC sum of {column_name!r}",
    )
    results = client.wait_for_results(task_id=task["id"])
    totals = {int(result["total"]) for result in results}
    if len(totals) != 1:
        raise RuntimeError(f"the parties disagree: {sorted(totals)}")
    return {"sum": totals.pop(), "parties": len(results)}


@algorithm_client
@data(1)
def partial_mpc_sum(
    df: pd.DataFrame,
    client: AlgorithmClient,
    column_name: str,
    parties: int,
    timeout: float = 240.0,
) -> dict[str, Any]:
    value = int(pd.to_numeric(df[column_name], errors="raise").dropna().sum())
    deadline = time.monotonic() + timeout
    siblings = _siblings(client, parties - 1, deadline)
    own = int(client.organization_id)
    order = sorted([own, *(int(s["organization_id"]) for s in siblings)])
    by_org = {int(s["organization_id"]): f"{s['ip']}:{s['port']}" for s in siblings}
    # MPyC reads its parties from the command line when mpyc.runtime is imported: an empty
    # host marks this party (it listens on that port).
    sys.argv = [sys.argv[0], "--no-log", "-I", str(order.index(own))]
    for org in order:
        sys.argv += ["-P", f":{PORT}" if org == own else by_org[org]]
    info(f"MPyC party {order.index(own)} of {order}: {sys.argv[1:]}")
    mpc = importlib.import_module("mpyc.runtime").mpc
    secint = mpc.SecInt(64)

    async def compute() -> int:
        await mpc.start()
        inputs = mpc.input(secint(value))
        total = await mpc.output(mpc.sum(inputs))
        await mpc.shutdown()
        return int(total)

    return {"total": mpc.run(compute())}


def _siblings(client: AlgorithmClient, count: int, deadline: float) -> list[dict[str, Any]]:
    while True:
        addresses = client.vpn.get_sibling_addresses()
        if isinstance(addresses, list) and len(addresses) >= count:
            return sorted(addresses, key=lambda a: a["organization_id"])[:count]
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {addresses!r} of {count} siblings registered")
        time.sleep(1)
