"""The server's socket.io channel (namespace ``/tasks``): events in, status changes out.

The link connects as a vantage6 4.x node does — the access token as an
``Authorization: Bearer`` header on the handshake — and keeps connecting forever with
backoff. The server answers an authenticated connection with ``sync``; an unauthenticated
one stays open but silent, so no ``sync`` within ``sync_timeout`` counts as an auth failure.
``invalid_token``/``expired_token`` make it re-authenticate and reconnect.

Incoming events (``sync``, ``new_task``, ``kill_containers``) are parsed into models and put
on :attr:`SocketLink.events`; the run lifecycle consumes that queue. Handlers never do work
themselves, so a slow REST call can never stall the socket. A ``sync`` is queued after
every (re)connect, which is what makes the node catch up on anything it missed.

While connected, the link sends ``ping`` every ``ping_interval`` seconds (the server marks a
node offline after 65 s of silence) and offers :meth:`SocketLink.emit` for status changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, NamedTuple

import socketio

from common.backoff import Backoff
from node.logging import get_logger
from node.server.models import KillContainers, NewTask
from node.server.rest import ServerClient, ServerError

log = get_logger(__name__)

NAMESPACE = "/tasks"


class Sync:
    """The server asks the node to catch up (sent after every authenticated connect)."""

    def __repr__(self) -> str:
        return "Sync()"


ServerEvent = Sync | NewTask | KillContainers


class Received(NamedTuple):
    """A server event and when it arrived (``time.time_ns()``, the start of its runs' traces)."""

    event: ServerEvent
    at_ns: int


class SocketLink:
    """Keeps one socket.io connection to the server alive and turns its events into a queue."""

    def __init__(
        self,
        *,
        url: str,
        client: ServerClient,
        ping_interval: float = 30.0,
        sync_timeout: float = 10.0,
        transports: tuple[str, ...] = ("websocket",),
    ) -> None:
        self.url = url
        self.events: asyncio.Queue[Received] = asyncio.Queue()
        self._client = client
        self._ping_interval = ping_interval
        self._sync_timeout = sync_timeout
        self._transports = list(transports)
        self._sio: socketio.AsyncClient | None = None
        self._synced = asyncio.Event()
        self._lost = asyncio.Event()
        self._reauth = False
        self.connected = asyncio.Event()
        #: Times the link was made again after a connection had been served (a metric).
        self.reconnects = 0
        self._served = 0

    async def run(self) -> None:
        """Connect, serve, reconnect — until cancelled."""
        backoff = Backoff(first=0.5, cap=30.0)
        while True:
            try:
                served = await self._serve_once()
            finally:
                self.connected.clear()
                await self._disconnect()
            if served:
                backoff.reset()
            delay = backoff.next_delay()
            log.info("socket.reconnecting", delay=round(delay, 2))
            await asyncio.sleep(delay)

    async def emit(self, event: str, data: dict[str, Any]) -> None:
        """Send ``event`` if connected; dropped (with a debug line) when not."""
        sio = self._sio
        if sio is None or not self.connected.is_set():
            log.debug("socket.emit_dropped", socket_event=event)
            return
        try:
            await sio.emit(event, data, namespace=NAMESPACE)
        except socketio.exceptions.SocketIOError as exc:  # disconnected mid-emit
            log.debug("socket.emit_failed", socket_event=event, error=str(exc))

    async def _serve_once(self) -> bool:
        """One connection's life; True if it was authenticated and served."""
        if self._reauth:
            self._reauth = False
            try:
                await self._client.refresh()
            except ServerError as exc:
                log.warning("socket.reauth_failed", error=str(exc))
                return False
        self._synced.clear()
        self._lost.clear()
        sio = self._make_client()
        self._sio = sio
        try:
            await sio.connect(
                self.url,
                headers={"Authorization": f"Bearer {self._client.access_token}"},
                namespaces=[NAMESPACE],
                transports=self._transports,
                wait_timeout=10,
            )
        except (socketio.exceptions.ConnectionError, OSError, TimeoutError) as exc:
            log.warning("socket.connect_failed", url=self.url, error=str(exc))
            return False
        try:
            await asyncio.wait_for(self._synced.wait(), self._sync_timeout)
        except TimeoutError:
            log.warning("socket.no_sync", hint="token not accepted; re-authenticating")
            self._reauth = True
            return False
        self.connected.set()
        if self._served:
            self.reconnects += 1
        self._served += 1
        log.info("socket.connected", url=self.url)
        pinger = asyncio.create_task(self._ping_forever(sio), name="socket-ping")
        try:
            await self._lost.wait()
        finally:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger
        return True

    def _make_client(self) -> socketio.AsyncClient:
        sio = socketio.AsyncClient(reconnection=False, request_timeout=30)
        handlers = {
            "sync": self._on_sync,
            "new_task": self._on_new_task,
            "kill_containers": self._on_kill,
            "expired_token": self._on_bad_token,
            "invalid_token": self._on_bad_token,
            "disconnect": self._on_disconnect,
            "message": self._on_message,
        }
        for name, handler in handlers.items():
            sio.on(name, handler, namespace=NAMESPACE)
        return sio

    async def _on_sync(self, *_: Any) -> None:
        self._synced.set()
        self.events.put_nowait(Received(Sync(), time.time_ns()))

    async def _on_new_task(self, data: Any) -> None:
        self._queue(NewTask, data)

    async def _on_kill(self, data: Any) -> None:
        self._queue(KillContainers, data)

    async def _on_bad_token(self, *_: Any) -> None:
        log.info("socket.token_rejected", hint="re-authenticating")
        self._reauth = True
        self._lost.set()

    async def _on_disconnect(self, *_: Any) -> None:
        log.info("socket.disconnected")
        self._lost.set()

    async def _on_message(self, message: Any) -> None:
        log.debug("socket.message", message=str(message))

    def _queue(self, model: type[NewTask] | type[KillContainers], data: Any) -> None:
        try:
            self.events.put_nowait(Received(model.model_validate(data), time.time_ns()))
        except ValueError as exc:
            log.warning("socket.bad_event", model=model.__name__, error=str(exc), data=data)

    async def _ping_forever(self, sio: socketio.AsyncClient) -> None:
        while True:
            with contextlib.suppress(socketio.exceptions.SocketIOError):
                await sio.emit("ping", namespace=NAMESPACE)
            await asyncio.sleep(self._ping_interval)

    async def _disconnect(self) -> None:
        sio, self._sio = self._sio, None
        if sio is not None:
            with contextlib.suppress(socketio.exceptions.SocketIOError, OSError):
                await sio.disconnect()
