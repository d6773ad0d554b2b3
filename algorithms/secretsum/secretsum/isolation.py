"""Two methods that test the isolation around peer connections (not part of the sum).

- ``listen_for_peers(seconds)``: listens on port 8888 and answers every connection with a
  banner line; meanwhile asks for its siblings (``get_sibling_addresses``) and connects to
  each once through the address it was given. Returns how many connections it accepted
  and how many siblings it reached: with one sibling, 1 and 1 — anything more accepted
  came from somewhere that should not reach it.
- ``probe_reach(targets, gateway_ports)``: tries one TCP connection to each ``host:port``
  in ``targets`` and to each port in ``gateway_ports`` on the proxy's host, and says which
  answered with the listener's banner (a connection that is accepted and closed, as a
  forwarder does for a run it was not made for, is not a reach).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from vantage6.algorithm.client import AlgorithmClient
from vantage6.algorithm.tools.decorators import algorithm_client
from vantage6.algorithm.tools.util import info

PORT = 8888
BANNER = b"secretsum-listener\n"


@algorithm_client
def listen_for_peers(client: AlgorithmClient, seconds: float = 60.0) -> dict[str, Any]:
    accepted: list[str] = []
    server = socket.create_server(("0.0.0.0", PORT), reuse_port=False)
    server.settimeout(0.5)
    stop = time.monotonic() + seconds

    def accept() -> None:
        while time.monotonic() < stop:
            try:
                connection, peer = server.accept()
            except OSError:
                continue
            with connection:
                accepted.append(peer[0])
                connection.sendall(BANNER)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    reached = 0
    siblings: list[dict[str, Any]] = []
    while not siblings and time.monotonic() < stop:
        answer = client.vpn.get_sibling_addresses()
        siblings = answer if isinstance(answer, list) else []
        if not siblings:
            time.sleep(1)
    for address in siblings:
        while time.monotonic() < stop - 5:
            if _banner(str(address["ip"]), int(address["port"])):
                reached += 1
                break
            time.sleep(0.5)
    info(f"reached {reached} of {len(siblings)} siblings; accepted from {accepted}")
    thread.join()
    server.close()
    return {"accepted": len(accepted), "siblings": len(siblings), "reached": reached}


def probe_reach(targets: list[str], gateway_ports: list[int] | None = None) -> dict[str, bool]:
    host = os.environ.get("HOST", "").removeprefix("http://").removeprefix("https://")
    tries = [(t.rpartition(":")[0], int(t.rpartition(":")[2])) for t in targets]
    tries += [(host, port) for port in gateway_ports or []]
    return {f"{h}:{p}": _banner(h, p) for h, p in tries}


def _banner(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3) as connection:
            connection.settimeout(3)
            return connection.recv(64) == BANNER
    except OSError:
        return False
