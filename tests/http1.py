"""Hand-written HTTP/1.1 exchanges, for what client libraries hide from tests: how many
connections are open, and whether the other side closed one."""

from __future__ import annotations

import asyncio

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter, int]


async def kept_alive(port: int, token: str, path: str) -> Connection:
    """A connection to 127.0.0.1:``port`` that made one GET and stays open, with the
    answer's status (its body read, so the next read sees only what comes after)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return reader, writer, status
