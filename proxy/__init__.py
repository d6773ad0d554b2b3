"""The proxy: the aiohttp application algorithms call, the only door to the server.

An algorithm container reaches nothing but this proxy (``HOST``/``PORT`` in its
environment). Every request must carry the run's container token; the proxy finds the run
it belongs to (``RunRegistry``), refuses finished runs and anything outside the allow-list
of the vantage6 4.x ``AlgorithmClient`` (``proxy.routes``), forwards the rest to the
server with the same token over one shared connection pool (``proxy.upstream``), encrypts
a subtask's input for each receiving organization and decrypts results for the algorithm
(``proxy.payloads``, through the node's ``ProxyCrypto``), and records each request as a
span in the run's trace and an access-log line (``proxy.middlewares``).

The node composes it; this package never imports ``node/`` or ``executors/``::

    from proxy import ProxyServer, make_proxy_app
"""

from proxy.app import ProxyServer, make_proxy_app
from proxy.limits import ProxyLimits
from proxy.protocols import (
    ProxyCrypto,
    ProxyCryptoError,
    ProxyRun,
    RequestMetrics,
    RunInfo,
    RunRegistry,
    RunTable,
    TaskCreations,
)

__all__ = [
    "ProxyCrypto",
    "ProxyCryptoError",
    "ProxyLimits",
    "ProxyRun",
    "ProxyServer",
    "RequestMetrics",
    "RunInfo",
    "RunRegistry",
    "RunTable",
    "TaskCreations",
    "make_proxy_app",
]
