"""Building and serving the proxy: the app factory and a small server around it.

The node builds one app with :func:`make_proxy_app`, handing it the server's API URL and
the protocols of ``proxy.protocols``, and serves it in its own event loop with
:class:`ProxyServer` on a TCP port (Kubernetes Service, podman network) or a unix socket
(apptainer)::

    app = make_proxy_app(upstream_api_url=..., runs=registry, crypto=adapter, tracer=tracer)
    server = ProxyServer(app, host="0.0.0.0", port=7654)
    await server.start()      # binds; the app's upstream session opens here
    ...
    await server.stop()       # stops accepting, finishes in-flight requests, closes session
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from aiohttp import web
from opentelemetry.trace import Tracer

from common.logging import get_logger
from proxy.context import CONTEXT, AccessLog, ProxyContext
from proxy.limits import ProxyLimits
from proxy.middlewares import door
from proxy.protocols import (
    PeerAddresses,
    ProxyCrypto,
    RequestMetrics,
    RunRegistry,
    TaskCreations,
)
from proxy.routes import add_routes
from proxy.upstream import Upstream

log = get_logger(__name__)


def make_proxy_app(
    *,
    upstream_api_url: str,
    runs: RunRegistry,
    crypto: ProxyCrypto,
    tracer: Tracer | None = None,
    metrics: RequestMetrics | None = None,
    task_creations: TaskCreations | None = None,
    limits: ProxyLimits | None = None,
    access_log: AccessLog | None = None,
    peers: PeerAddresses | None = None,
) -> web.Application:
    """The proxy application; its upstream session opens on startup, closes on cleanup.

    ``metrics`` counts and times each request; ``task_creations`` hears which request span
    created each subtask (both optional: see :mod:`proxy.protocols`).

    ``access_log`` gets one ``proxy.request`` line per request (default: the structlog
    logger ``proxy.access``; the node passes a direct one, as that path is hot).
    """
    limits = limits or ProxyLimits()
    app = web.Application(
        middlewares=[door],
        client_max_size=limits.max_body_bytes,
    )
    app[CONTEXT] = ProxyContext(
        upstream=Upstream(api_url=upstream_api_url, limits=limits),
        runs=runs,
        crypto=crypto,
        tracer=tracer,
        limits=limits,
        access_log=access_log or get_logger("proxy.access"),
        body_work=asyncio.Semaphore(limits.max_body_work),
        metrics=metrics,
        task_creations=task_creations,
        peers=peers,
    )
    add_routes(app)
    app.cleanup_ctx.append(_upstream_session)
    return app


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    upstream = app[CONTEXT].upstream
    await upstream.open()
    try:
        yield
    finally:
        await upstream.close()


class ProxyServer:
    """Serves a proxy app on ``host``:``port`` or on the unix socket ``path``."""

    def __init__(
        self,
        app: web.Application,
        *,
        host: str | None = None,
        port: int | None = None,
        path: Path | str | None = None,
        shutdown_timeout: float = 5.0,
        freebind: bool = False,
        also: Sequence[tuple[str, bool]] = (),
    ) -> None:
        """``freebind``: bind ``host`` even if no interface has that address yet (podman's
        run network gets its gateway address only while a container is attached).
        ``also``: more ``(host, freebind)`` to listen on, with the same port (a node with
        several executors whose runs reach the proxy at different addresses)."""
        if (path is None) == (port is None):
            raise ValueError("ProxyServer: give either a port (with a host) or a unix path")
        self.app = app
        self.host = host or "127.0.0.1"
        self.path = None if path is None else Path(path)
        self._port = port
        self._shutdown_timeout = shutdown_timeout
        self._freebind = freebind
        self._also = tuple(also)
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when started with ``port=0``)."""
        if self._port is None:
            raise RuntimeError("ProxyServer: serving on a unix socket, not a port")
        return self._port

    @property
    def url(self) -> str:
        return f"unix:{self.path}" if self.path else f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self._shutdown_timeout,
            # Also closes a connection that sends no (complete) request within it.
            keepalive_timeout=self.app[CONTEXT].limits.keepalive_timeout,
        )
        await runner.setup()
        site: web.BaseSite
        try:
            if self.path is not None:
                if self.path.is_socket():
                    self.path.unlink()  # left over by an earlier, killed node
                site = web.UnixSite(runner, self.path)
                await site.start()
                self.path.chmod(0o666)  # the algorithm's user is not the node's
            elif self._freebind:
                sock = _freebind_socket(self.host, self._port or 0)
                site = web.SockSite(runner, sock)
                await site.start()
                self._port = int(sock.getsockname()[1])
            else:
                site = web.TCPSite(runner, self.host, self._port)
                await site.start()
                self._port = _bound_port(runner, self._port)
            for host, freebind in self._also:
                if freebind:
                    await web.SockSite(runner, _freebind_socket(host, self.port)).start()
                else:
                    await web.TCPSite(runner, host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("proxy.started", url=self.url, upstream=self.app[CONTEXT].upstream.api_url)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        await runner.cleanup()
        if self.path is not None and self.path.is_socket():
            self.path.unlink()
        log.info("proxy.stopped", url=self.url)

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()


def _bound_port(runner: web.AppRunner, fallback: int | None) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    if fallback is None:
        raise RuntimeError("ProxyServer: no bound address")
    return fallback


IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # linux/in.h; missing from some builds


def _freebind_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
