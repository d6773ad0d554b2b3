"""The proxy's HTTP/1.1 client pool against a server that answers scripted bytes.

The server is a STAND-IN: a raw asyncio server that answers each request with bytes the
test writes, so that framing a library server never sends (bare LFs, two lengths, broken
chunks, a connection cut mid-body) can be sent. What the whole proxy does with the real
vantage6 server is in ``tests/integration/test_proxy_v6server.py``.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from proxy.http1 import (
    MAX_HEAD,
    AnswerTooLarge,
    BadAnswer,
    BrokenConnection,
    ConnectError,
    Pool,
    UpstreamTimeout,
)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Scripted:
    """Answers every request on a connection with ``script`` (default: a small 200)."""

    script: Script | None = None
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                if self.script is None:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                else:
                    await self.script(reader, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Scripted]:
    scripted = Scripted()
    srv = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
    scripted.port = srv.sockets[0].getsockname()[1]
    try:
        yield scripted
    finally:
        srv.close()


@pytest.fixture
async def pool(server: Scripted) -> AsyncIterator[Pool]:
    pool = Pool(f"http://127.0.0.1:{server.port}/api", max_connections=4, connect_timeout=2)
    try:
        yield pool
    finally:
        await pool.close()


async def get(pool: Pool, *, limit: int = 1 << 20, timeout: float = 5.0) -> tuple[int, bytes]:
    deadline = asyncio.get_running_loop().time() + timeout
    answer = await pool.request(
        "GET", "/api/task/1", {"Authorization": "Bearer t"}, None, deadline=deadline
    )
    try:
        return answer.status, await answer.read(limit)
    finally:
        answer.release()


def answering(raw: bytes) -> Script:
    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)

    return script


def answering_then_closing(raw: bytes) -> Script:
    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
        writer.close()

    return script


async def test_connections_are_kept_alive_and_reused(server: Scripted, pool: Pool) -> None:
    for _ in range(3):
        assert await get(pool) == (200, b"ok")
    assert server.connections == 1
    assert server.requests[0].startswith(b"GET /api/task/1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in server.requests[0]


async def test_an_answer_larger_than_the_read_buffer_is_read_whole(
    server: Scripted, pool: Pool
) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: the wire pauses reading on the way
    server.script = answering(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert await get(pool, limit=len(body)) == (200, body)
    assert await get(pool, limit=len(body)) == (200, body)
    assert server.connections == 1


async def test_a_chunked_answer_is_read_whole_and_the_connection_reused(
    server: Scripted, pool: Pool
) -> None:
    server.script = answering(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    assert await get(pool) == (200, b"abcdefg")
    assert await get(pool) == (200, b"abcdefg")
    assert server.connections == 1


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok", "bare CR or LF"),
        (b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 2\r\n\r\nok", "bare CR or LF"),
        (b"ICY 200 OK\r\nContent-Length: 2\r\n\r\nok", "status line"),
        (b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok", "status line"),
        (b"HTTP/1.1 200 OK\r\n bad header\r\nContent-Length: 2\r\n\r\nok", "malformed header"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            "two different",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "both a length and chunked",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok", "not chunked"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\nok", "'br'"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nok\r\n0\r\n\r\n",
            "chunk size",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n", "CRLF"),
    ],
)
async def test_malformed_answers_are_refused_and_the_connection_dropped(
    server: Scripted, pool: Pool, raw: bytes, why: str
) -> None:
    server.script = answering(raw)
    with pytest.raises(BadAnswer, match=why):
        await get(pool)
    server.script = None
    assert await get(pool) == (200, b"ok")
    assert server.connections == 2


async def test_an_endless_head_is_refused_at_the_limit(server: Scripted, pool: Pool) -> None:
    server.script = answering(b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HEAD + 10))
    with pytest.raises(BadAnswer, match="head is over"):
        await get(pool)


async def test_an_answer_to_the_connections_end_is_read_and_the_connection_not_reused(
    server: Scripted, pool: Pool
) -> None:
    server.script = answering_then_closing(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
    assert await get(pool) == (200, b"until the end")
    assert await get(pool) == (200, b"until the end")
    assert server.connections == 2


async def test_connection_close_is_honoured(server: Scripted, pool: Pool) -> None:
    server.script = answering(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    )
    assert await get(pool) == (200, b"ok")
    assert await get(pool) == (200, b"ok")
    assert server.connections == 2


async def test_a_cut_mid_body_is_a_broken_connection(server: Scripted, pool: Pool) -> None:
    server.script = answering_then_closing(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"
    )
    with pytest.raises(BrokenConnection):
        await get(pool)


async def test_a_server_that_closed_an_idle_connection_costs_a_new_one_not_an_error(
    server: Scripted, pool: Pool
) -> None:
    # closed after the answer without saying Connection: close
    server.script = answering_then_closing(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert await get(pool) == (200, b"ok")
    await asyncio.sleep(0.05)  # the close arrives while the connection is idle
    assert await get(pool) == (200, b"ok")
    assert server.connections == 2


async def test_the_deadline_ends_a_slow_body(server: Scripted, pool: Pool) -> None:
    async def trickle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        await writer.drain()
        await asyncio.sleep(10)

    server.script = trickle
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await get(pool, timeout=0.3)
    assert time.monotonic() - started < 2


async def test_a_compressed_answer_is_inflated_within_the_limit(
    server: Scripted, pool: Pool
) -> None:
    small = gzip.compress(b"x" * 1000)
    server.script = answering(
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
        % (len(small), small)
    )
    assert await get(pool) == (200, b"x" * 1000)
    bomb = gzip.compress(b" " * (8 << 20))
    server.script = answering(
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
        % (len(bomb), bomb)
    )
    with pytest.raises(AnswerTooLarge):
        await get(pool, limit=1 << 20)


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/api/task/1 HTTP/1.1\r\nX-Injected: 1\r\n", {}),
        ("/api/task/1\x00", {}),
        ("/api/task/1", {"Authorization": "Bearer t\r\nX-Injected: 1"}),
        ("/api/task/1", {"Bad Name": "x"}),
    ],
)
async def test_nothing_is_sent_for_a_target_or_header_http_does_not_allow(
    server: Scripted, pool: Pool, target: str, headers: dict[str, str]
) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    with pytest.raises(ValueError, match="HTTP does not allow"):
        await pool.request("GET", target, headers, None, deadline=deadline)
    assert server.connections == 0


async def test_a_refused_connection_is_a_connect_error() -> None:
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    pool = Pool(f"http://127.0.0.1:{port}", max_connections=1, connect_timeout=1)
    with pytest.raises(ConnectError):
        await get(pool)
    with pytest.raises(ConnectError):  # the slot was given back
        await get(pool)
    await pool.close()


def test_only_http_urls_are_accepted() -> None:
    with pytest.raises(ValueError, match="http"):
        Pool("ftp://server/api", max_connections=1, connect_timeout=1)
