"""The database relay on real loopback sockets: who gets through, and how many at once.

The firewall half of the rule (only runs that asked reach the relay's port) is in
``tests/integration/test_podman_executor.py`` against real podman, nftables and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from executors.podman.relay import DatabaseRelay, RelayTarget


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    """A stand-in database on loopback that echoes what it reads; yields its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, family=socket.AF_INET)
    async with server:
        yield int(server.sockets[0].getsockname()[1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload`` through the relay; what comes back before it closes (or 2 s). A
    refused connection is closed at once (reset, as it had unread data): nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.read(1024), 2)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_only_an_admitted_address_is_relayed_and_only_while_admitted(echo: int) -> None:
    port = free_port()
    relay = DatabaseRelay(
        RelayTarget("clinic", "127.0.0.1", echo, port), bind_host="127.0.0.1", connect_seconds=5
    )
    await relay.open()
    try:
        refused = await exchange(port, b"before")
        relay.admit("127.0.0.1")
        relayed = await exchange(port, b"select 1")
        relay.revoke("127.0.0.1")
        revoked = await exchange(port, b"after")
    finally:
        await relay.close()

    assert (refused, relayed, revoked) == (b"", b"select 1", b"")


async def test_one_run_holds_at_most_its_share_of_connections(echo: int) -> None:
    port = free_port()
    relay = DatabaseRelay(
        RelayTarget("clinic", "127.0.0.1", echo, port),
        bind_host="127.0.0.1",
        connect_seconds=5,
        max_connections_per_run=2,
    )
    await relay.open()
    relay.admit("127.0.0.1")
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    try:
        for reader, writer in held:  # both relayed
            writer.write(b"x")
            assert await asyncio.wait_for(reader.read(1), 2) == b"x"
        third = await exchange(port, b"y")
        held[0][1].close()
        await asyncio.sleep(0.2)  # the relay sees that one end
        again = await exchange(port, b"z")
    finally:
        for _, writer in held:
            writer.close()
        await relay.close()

    assert (third, again) == (b"", b"z")
