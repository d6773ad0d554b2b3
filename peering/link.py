"""A node's one outbound connection to the relay, kept open.

The node dials out (``wss://`` in production) with its current vantage6 access token and
reconnects with :class:`common.backoff.Backoff` whenever the connection ends: the relay
restarted, the token expired (close code 4001, reconnect at once with a fresh one) or the
network broke. Streams that were open when it broke fail (their sockets are closed by
:mod:`peering.streams`); new ones wait for the next connection, up to a bound.

Received messages are handed to ``on_message`` in order, one at a time; the handler must
not block on a local socket (the stream layer buffers at most a window per stream), so
one slow stream cannot stall the others.
"""

from __future__ import annotations

import asyncio
import json
import ssl as ssl_module
from collections.abc import Awaitable, Callable

import aiohttp

from common.backoff import Backoff
from common.logging import get_logger
from peering.frames import MAX_MESSAGE, FrameError, envelope, open_envelope

log = get_logger(__name__)

OnMessage = Callable[[int, bytes], Awaitable[None]]
OnEvent = Callable[[dict[str, object]], None]


class RelayUnavailable(ConnectionError):
    """The node is not connected to its relay (and did not get back in time)."""


class RelayLink:
    """Keeps the node's WebSocket to one relay and moves envelopes over it."""

    def __init__(
        self,
        *,
        url: str,
        token: Callable[[], str],
        session: aiohttp.ClientSession,
        on_message: OnMessage,
        on_event: OnEvent,
        on_disconnect: Callable[[], None],
        ssl: ssl_module.SSLContext | bool = True,
    ) -> None:
        self._url = url
        self._token = token
        self._session = session
        self._on_message = on_message
        self._on_event = on_event
        self._on_disconnect = on_disconnect
        self._ssl = ssl
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._send_lock = asyncio.Lock()
        self.connected = asyncio.Event()
        self.connections = 0

    async def run(self) -> None:
        """Connect, serve, reconnect — until cancelled."""
        backoff = Backoff(first=0.2, cap=15.0)
        while True:
            try:
                await self._serve_once(backoff)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("peering.relay_unreachable", url=self._url, error=str(exc) or repr(exc))
            finally:
                self._socket = None
                if self.connected.is_set():
                    self.connected.clear()
                    self._on_disconnect()
            await backoff.pause()

    async def _serve_once(self, backoff: Backoff) -> None:
        async with self._session.ws_connect(
            self._url,
            headers={"Authorization": f"Bearer {self._token()}"},
            max_msg_size=MAX_MESSAGE,
            heartbeat=30.0,
            ssl=self._ssl,
        ) as socket:
            self._socket = socket
            self.connections += 1
            self.connected.set()
            backoff.reset()
            log.info("peering.relay_connected", url=self._url)
            async for message in socket:
                if message.type is aiohttp.WSMsgType.BINARY:
                    try:
                        source, payload = open_envelope(message.data)
                    except FrameError as exc:
                        log.warning("peering.relay_sent_garbage", error=str(exc))
                        continue
                    await self._on_message(source, payload)
                elif message.type is aiohttp.WSMsgType.TEXT:
                    self._event(message.data)
                else:
                    break
            log.info("peering.relay_disconnected", code=socket.close_code)

    def _event(self, text: str) -> None:
        try:
            event = json.loads(text[:4096])
        except ValueError:
            return
        if isinstance(event, dict):
            self._on_event(event)

    async def send(self, node_id: int, payload: bytes, *, wait: float = 10.0) -> None:
        """Send ``payload`` to ``node_id`` through the relay; waits up to ``wait`` seconds
        for a connection, then raises :class:`RelayUnavailable`."""
        if self._socket is None:
            try:
                await asyncio.wait_for(self.connected.wait(), wait)
            except TimeoutError:
                raise RelayUnavailable(f"not connected to the relay {self._url}") from None
        socket = self._socket
        if socket is None or socket.closed:
            raise RelayUnavailable(f"not connected to the relay {self._url}")
        async with self._send_lock:
            try:
                await socket.send_bytes(envelope(node_id, payload))
            except ConnectionError as exc:
                raise RelayUnavailable(f"the relay connection broke: {exc}") from None
