"""An additive secret-shared sum: organizations add their numbers without showing them.

A vantage6 4.x algorithm that needs its runs at different organizations to talk to each
other directly, through the vantage6 4 VPN API (``client.vpn``) only:

- ``central_secret_sum(column_name, organizations=None)`` creates a
  ``partial_secret_sum`` subtask for the organizations, waits for their results and adds
  them up (modulo a prime): the total of the column over all organizations.
- ``partial_secret_sum(column_name, parties)`` sums the column locally, splits the sum into
  ``parties`` random shares modulo the prime, keeps one, listens on port 8888 (declared
  with ``EXPOSE 8888`` and the label ``p8888=shares``), sends one share to each sibling
  (the same subtask's runs at the other organizations, ``get_sibling_addresses``) and
  returns its own share plus those it received. No single result reveals an
  organization's sum; only all of them together give the total.
- ``central_mpc_sum`` / ``partial_mpc_sum`` (:mod:`.mpc`): the same total computed by
  MPyC, a multi-party computation framework from PyPI, whose parties connect to each
  other through the addresses the vantage6 4 API gives.
- ``listen_for_peers`` / ``probe_reach`` (:mod:`.isolation`): for the isolation tests.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from typing import Any

import pandas as pd
from vantage6.algorithm.client import AlgorithmClient
from vantage6.algorithm.tools.decorators import algorithm_client, data
from vantage6.algorithm.tools.util import info, warn

from .isolation import listen_for_peers, probe_reach
from .mpc import central_mpc_sum, partial_mpc_sum
from .subtasks import run_subtask, sibling_addresses

__all__ = [
    "central_mpc_sum",
    "central_secret_sum",
    "listen_for_peers",
    "partial_mpc_sum",
    "partial_secret_sum",
    "probe_reach",
]

PRIME = 2**61 - 1
PORT = 8888


@algorithm_client
def central_secret_sum(
    client: AlgorithmClient, column_name: str, organizations: list[int] | None = None
) -> dict[str, Any]:
    """The column's total over the organizations, from their secret-shared partials."""
    partials = run_subtask(
        client, "partial_secret_sum", column_name, organizations, "secret-shared sum"
    )
    total = sum(int(partial["partial"]) for partial in partials) % PRIME
    return {"sum": total, "parties": len(partials)}


@algorithm_client
@data(1)
def partial_secret_sum(
    df: pd.DataFrame,  # @data's frames come first, then @algorithm_client's client
    client: AlgorithmClient,
    column_name: str,
    parties: int,
    timeout: float = 240.0,
) -> dict[str, Any]:
    """This organization's share of the total (see the module docstring)."""
    value = int(pd.to_numeric(df[column_name], errors="raise").dropna().sum())
    shares = [secrets.randbelow(PRIME) for _ in range(parties - 1)]
    shares.insert(0, (value - sum(shares)) % PRIME)
    received: list[int] = []
    listener = _listen(received, expected=parties - 1)
    deadline = time.monotonic() + timeout
    siblings = sibling_addresses(client, parties - 1, deadline)
    for address, share in zip(siblings, shares[1:], strict=True):
        _send_share(address, share, deadline)
    while len(received) < parties - 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"received {len(received)} of {parties - 1} shares")
        time.sleep(0.1)
    listener.close()
    return {"partial": (shares[0] + sum(received)) % PRIME}


def _listen(received: list[int], *, expected: int) -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", PORT))
    server.listen(16)

    def accept() -> None:
        while len(received) < expected:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                line = connection.makefile("rb").readline(1024)
                try:
                    received.append(int(json.loads(line)["share"]))
                except (ValueError, KeyError, TypeError):
                    warn("a peer sent something that is not a share")
                    continue
                connection.sendall(b"ok\n")

    threading.Thread(target=accept, daemon=True).start()
    return server


def _send_share(address: dict[str, Any], share: int, deadline: float) -> None:
    """Deliver one share; the peer may not listen yet, so try again until the deadline."""
    while True:
        try:
            with socket.create_connection((address["ip"], int(address["port"])), timeout=10) as s:
                s.sendall(json.dumps({"share": share}).encode() + b"\n")
                if s.makefile("rb").readline(16).strip() == b"ok":
                    return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not reach {address}: {exc}") from None
        time.sleep(0.5)
