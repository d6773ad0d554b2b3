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

from .subtasks import run_subtask, sibling_addresses

PORT = 8888


@algorithm_client
def central_mpc_sum(
    client: AlgorithmClient, column_name: str, organizations: list[int] | None = None
) -> dict[str, Any]:
    results = run_subtask(client, "partial_mpc_sum", column_name, organizations, "MPyC sum")
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
    siblings = sibling_addresses(client, parties - 1, deadline)
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
