"""``fednode relay``: where nodes that accept no inbound connection meet.

Every node keeps one outbound WebSocket to the relay (``GET /v1/connect`` with its
vantage6 access token as a bearer token). The relay checks the token with the vantage6
server (:mod:`peering.identity`), then forwards each binary message a node sends to the
node its envelope names — rewriting the envelope to the *sender's* authenticated id —
if that node is connected and in the same collaboration. Otherwise the sender gets a
text message ``{"event": "unreachable", "node": N, "reason": ...}``.

What the relay does not do: read payloads (they are end-to-end encrypted between the
nodes, :mod:`peering.session`), decide which runs may talk (the nodes check that with
the server), or buffer. A message is written to the destination before the next one is
read from the sender, so a slow destination slows its senders (TCP backpressure) rather
than growing a queue; a destination that takes longer than ``send_timeout`` to accept a
message is disconnected. A node's connection ends when its token expires (close code
4001; the node reconnects with a fresh token) or when the same node connects again
(4000: the newest connection wins, as after a node restart).

Several relays may serve one consortium; two nodes talk through the relay both use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from aiohttp import web

from common.logging import get_logger
from peering.frames import MAX_MESSAGE, FrameError, envelope, open_envelope
from peering.identity import IdentityRefused, NodeIdentity

log = get_logger(__name__)

CLOSE_REPLACED = 4000
CLOSE_EXPIRED = 4001
CLOSE_PROTOCOL = 4002
CLOSE_TOO_SLOW = 4003


class Identities(Protocol):
    async def verify(self, token: str) -> NodeIdentity: ...


@dataclass(eq=False)
class _Connection:
    identity: NodeIdentity
    socket: web.WebSocketResponse
    since: float = field(default_factory=time.monotonic)
    messages_in: int = 0
    bytes_in: int = 0
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Relay:
    """The relay's state: who is connected, and forwarding between them."""

    def __init__(self, identities: Identities, *, send_timeout: float = 30.0) -> None:
        self._identities = identities
        self._send_timeout = send_timeout
        self._connections: dict[int, _Connection] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/connect", self.connect)
        app.router.add_get("/healthz", self.health)
        app.on_shutdown.append(self._close_all)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "nodes": len(self._connections)})

    async def connect(self, request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _refuse(401, "send the node's vantage6 access token as 'Authorization: Bearer'")
        try:
            identity = await self._identities.verify(token.strip())
        except IdentityRefused as exc:
            log.warning("relay.node_refused", reason=str(exc), peer=request.remote)
            return _refuse(401, str(exc))
        socket = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=30.0)
        await socket.prepare(request)
        connection = _Connection(identity, socket)
        previous = self._connections.get(identity.node_id)
        self._connections[identity.node_id] = connection
        if previous is not None:
            await previous.socket.close(code=CLOSE_REPLACED, message=b"replaced")
        bound = log.bind(
            node=identity.node_id,
            organization=identity.organization_id,
            collaboration=identity.collaboration_id,
        )
        bound.info("relay.node_connected")
        await socket.send_str(
            json.dumps(
                {
                    "event": "welcome",
                    "node": identity.node_id,
                    "organization": identity.organization_id,
                    "collaboration": identity.collaboration_id,
                }
            )
        )
        try:
            async with asyncio.timeout(max(0.0, identity.expires_at - time.time())):
                await self._forward_from(connection)
        except TimeoutError:
            await socket.close(code=CLOSE_EXPIRED, message=b"token expired; reconnect")
        finally:
            if self._connections.get(identity.node_id) is connection:
                del self._connections[identity.node_id]
            bound.info(
                "relay.node_disconnected",
                seconds=round(time.monotonic() - connection.since, 1),
                messages=connection.messages_in,
                bytes=connection.bytes_in,
                code=socket.close_code,
            )
        return socket

    async def _forward_from(self, source: _Connection) -> None:
        async for message in source.socket:
            if message.type is not aiohttp.WSMsgType.BINARY:
                if message.type is aiohttp.WSMsgType.TEXT:
                    continue  # nothing a node says in text is for the relay
                break
            data: bytes = message.data
            source.messages_in += 1
            source.bytes_in += len(data)
            try:
                destination_id, payload = open_envelope(data)
            except FrameError as exc:
                await source.socket.close(code=CLOSE_PROTOCOL, message=str(exc)[:100].encode())
                return
            reason = self._unreachable(source, destination_id)
            if reason is not None:
                await self._tell(
                    source, {"event": "unreachable", "node": destination_id, "reason": reason}
                )
                continue
            destination = self._connections[destination_id]
            await self._deliver(destination, envelope(source.identity.node_id, payload))

    def _unreachable(self, source: _Connection, destination_id: int) -> str | None:
        destination = self._connections.get(destination_id)
        if destination is None or destination.socket.closed:
            return "not connected to this relay"
        if destination.identity.collaboration_id != source.identity.collaboration_id:
            return "not connected to this relay"  # same answer: no probing other collaborations
        return None

    async def _deliver(self, destination: _Connection, data: bytes) -> None:
        try:
            async with asyncio.timeout(self._send_timeout):
                async with destination.send_lock:
                    await destination.socket.send_bytes(data)
        except TimeoutError:
            log.warning("relay.node_too_slow", node=destination.identity.node_id)
            await destination.socket.close(code=CLOSE_TOO_SLOW, message=b"too slow")
        except ConnectionError:
            pass  # it is going away; its sender learns from the next 'unreachable'

    async def _tell(self, connection: _Connection, event: dict[str, object]) -> None:
        with contextlib.suppress(ConnectionError):
            async with connection.send_lock:
                await connection.socket.send_str(json.dumps(event))

    async def _close_all(self, app: web.Application) -> None:
        for connection in list(self._connections.values()):
            await connection.socket.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"bye")


def _refuse(status: int, reason: str) -> web.Response:
    return web.json_response({"msg": f"relay: {reason}"}, status=status)
