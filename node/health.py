"""The node's own HTTP endpoints for operators and orchestrators (not for algorithms).

* ``GET /healthz`` — the process and its event loop answer (a liveness probe);
* ``GET /readyz`` — the node is authenticated, its executor is open and its socket to the
  server is connected (a readiness probe); 503 with the missing pieces otherwise;
* ``GET /metrics`` — the node's Prometheus metrics (:mod:`node.metrics`): counts and
  timings only, no ids, so it answers whoever reaches the port, like the probes
  (``health.metrics: false`` turns it off);
* ``GET /status`` — a small JSON summary that ``fednode status`` prints. It tells who the
  node is (node, organization and collaboration ids) and how busy it is, so by default it
  answers only calls from loopback (``fednode status`` on the node's host, or ``kubectl
  exec`` into its pod), even where the probes listen on every address for the kubelet;
  anyone else gets 403 (``health.status_public: true`` lifts that).

It listens on its own port (``health`` settings), apart from the proxy that algorithms
call, so a probe never competes with algorithm traffic and algorithms never see it.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from node import __version__
from node.metrics import CONTENT_TYPE

StatusSource = Callable[[], dict[str, Any]]
#: The Prometheus text exposition of the node's metrics.
MetricsSource = Callable[[], bytes]


def make_health_app(
    *, status: StatusSource, status_public: bool = False, metrics: MetricsSource | None = None
) -> web.Application:
    """``status()`` returns at least ``{"ready": bool, "missing": [...]}``."""
    started = time.monotonic()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def readyz(_: web.Request) -> web.Response:
        current = status()
        code = 200 if current.get("ready") else 503
        return web.json_response(
            {"ready": current.get("ready", False), "missing": current.get("missing", [])},
            status=code,
        )

    async def status_view(request: web.Request) -> web.Response:
        if not status_public and not is_loopback(request.remote):
            raise web.HTTPForbidden(
                text="/status answers only the node's own host (health.status_public: false)\n"
            )
        body = {
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - started, 1),
            **status(),
        }
        return web.json_response(body)

    async def metrics_view(_: web.Request) -> web.Response:
        assert metrics is not None
        return web.Response(body=metrics(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    if metrics is not None:
        app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status_view)
    return app


def is_loopback(remote: str | None) -> bool:
    """Whether a peer address is this host's own (a unix socket peer has none: local)."""
    if not remote:
        return True
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)
