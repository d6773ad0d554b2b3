"""``fednode relay``: the relay as a process, until SIGTERM/SIGINT.

One aiohttp server with the relay's routes (:mod:`peering.relay`), its node identities
checked with the consortium's vantage6 server (:mod:`peering.identity`). TLS is either
terminated here (``--tls-cert``/``--tls-key``) or by an ingress in front of it; nodes
must reach it over ``wss://`` in production (their tokens travel in the upgrade request).
"""

from __future__ import annotations

import asyncio
import signal
import ssl
from pathlib import Path

import aiohttp
from aiohttp import web

from common.logging import get_logger
from peering.identity import ServerIdentities
from peering.relay import Relay

log = get_logger(__name__)


def tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("give both --tls-cert and --tls-key, or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def serve_relay(
    *, server_api_url: str, host: str, port: int, tls: ssl.SSLContext | None = None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with aiohttp.ClientSession() as session:
        relay = Relay(ServerIdentities(api_url=server_api_url, session=session))
        runner = web.AppRunner(relay.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, ssl_context=tls).start()
            log.info(
                "relay.started", host=host, port=port, tls=tls is not None, server=server_api_url
            )
            await stop.wait()
        finally:
            await runner.cleanup()
            log.info("relay.stopped")
