"""The node's own HTTP endpoints for operators and orchestrators (not for algorithms).

* ``GET /healthz`` — the process and its event loop answer (a liveness probe);
* ``GET /readyz`` — the node is authenticated, its executor is open and its socket to the
  server is connected (a readiness probe); 503 with the missing pieces otherwise;
* ``GET /status`` — a small JSON summary that ``fednode status`` prints.

It listens on its own port (``health`` settings), apart from the proxy that algorithms
call, so a probe never competes with algorithm traffic and algorithms never see it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from node import __version__

StatusSource = Callable[[], dict[str, Any]]


def make_health_app(*, status: StatusSource) -> web.Application:
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

    async def status_view(_: web.Request) -> web.Response:
        body = {
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - started, 1),
            **status(),
        }
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status_view)
    return app
