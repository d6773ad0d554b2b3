"""What every handler and middleware reaches through the app and the request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from opentelemetry.trace import Tracer

from proxy.limits import ProxyLimits
from proxy.protocols import (
    PeerAddresses,
    ProxyCrypto,
    ProxyRun,
    RequestMetrics,
    RunRegistry,
    TaskCreations,
)
from proxy.upstream import Upstream


class AccessLog(Protocol):
    """Where the one line per request goes (a structlog logger)."""

    def info(self, event: str, **kw: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class ProxyContext:
    upstream: Upstream
    runs: RunRegistry
    crypto: ProxyCrypto
    tracer: Tracer | None
    limits: ProxyLimits
    access_log: AccessLog
    #: Bodies being parsed, encrypted or decrypted (``limits.max_body_work`` at once).
    body_work: asyncio.Semaphore
    metrics: RequestMetrics | None = None
    task_creations: TaskCreations | None = None
    #: Rewrites peer addresses to forwarders; ``None``: the server's answer as it is.
    peers: PeerAddresses | None = None
    #: Requests in flight per run id (bounded by ``limits.max_requests_per_run``).
    in_flight: dict[int, int] = field(default_factory=dict)
    #: Connections that carried a request with each run's token (closed ones are pruned
    #: lazily; bounded by ``limits.max_connections_per_run``).
    connections: dict[str, set[asyncio.BaseTransport]] = field(default_factory=dict)


CONTEXT = web.AppKey("fednode.proxy", ProxyContext)
#: The run whose token authenticated the request (set by the guard, in `proxy.middlewares.door`).
RUN = web.RequestKey("fednode.proxy.run", ProxyRun)
#: That run's container token (set by the guard, in `proxy.middlewares.door`).
TOKEN = web.RequestKey("fednode.proxy.token", str)
#: The id of the task a ``POST /task`` created (set by that handler, for the span link).
CREATED_TASK = web.RequestKey("fednode.proxy.created_task", int)
#: Milliseconds spent waiting for the server (set by the handlers that call it).
UPSTREAM_MS = web.RequestKey("fednode.proxy.upstream_ms", float)
