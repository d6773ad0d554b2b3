"""A lean HTTP/1.1 client for the proxy's one upstream: a pool of keep-alive connections.

Why not aiohttp's ``ClientSession``: the proxy forwards every algorithm request to one
origin, and per request the session's generality (request and response objects, cookie
and proxy handling, trace hooks, per-call timers, header multidicts) cost about four times
the CPU of the exchange itself (``benchmarks/proxy_throughput.py``, ``docs/proxy.md``):
the largest single share of the proxy's work. This client does only what the proxy needs:

* one origin, ``http`` or ``https`` (the system's trust store, host name checked);
* a request line, a few headers and a small buffered body, written in one piece;
* answers framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or the connection's
  end, ``gzip``/``deflate`` inflated when a compressing front sends them although the
  proxy asked for ``identity`` — every byte count bounded by the caller's limit, the
  inflated one included (no decompression bomb), the head by :data:`MAX_HEAD`;
* a connection goes back to the pool only after an answer read to its end that left no
  stray byte and did not ask to close; anything else closes it.

It decides nothing about retries, time limits or statuses (``proxy.upstream`` does);
it says what went wrong with one of the exceptions below.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

#: Largest answer head (status line and headers) read; larger → :class:`BadAnswer`.
MAX_HEAD = 64 * 1024
MAX_HEADERS = 128
#: An idle connection older than this is closed, not reused (the server may have).
IDLE_REUSE_SECONDS = 15.0
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
_CHUNK = 64 * 1024
_HEAD_END = b"\r\n\r\n"
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: What may not appear in a request target or a header value we write.
_UNSAFE = re.compile(r"[\x00-\x20\x7f-\U0010ffff]")
_UNSAFE_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class UpstreamError(Exception):
    """The exchange with the server failed; the subclass says how."""


class ConnectError(UpstreamError):
    """No connection could be opened: nothing was sent."""


class ConnectTimeout(ConnectError):
    """No connection within the connect timeout: nothing was sent."""


class BrokenConnection(UpstreamError):
    """The connection broke or closed before the answer was complete."""


class UpstreamTimeout(UpstreamError):
    """The exchange's deadline passed (the connection was closed)."""


class BadAnswer(UpstreamError):
    """The server's answer is not HTTP/1.1 this client reads."""


class AnswerTooLarge(UpstreamError):
    """The answer's body is larger than the caller's limit."""


class _Wire(asyncio.Protocol):
    """One connection: bytes received wait in a buffer until the exchange takes them."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.idle_since = 0.0
        self.expired = False
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def arm(self, deadline: float) -> None:
        """Close the connection at ``deadline`` (loop time) unless disarmed before."""
        self._timer = asyncio.get_running_loop().call_at(deadline, self._expire)

    def disarm(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _expire(self) -> None:
        self._timer = None
        self.expired = True
        self.close()
        self._wake()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def more(self) -> bool:
        """Wait for more bytes; ``False`` once the connection has ended.

        Raises :class:`UpstreamTimeout` once the deadline of :meth:`arm` has passed."""
        if not self.closed:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter
            if not self.expired:
                return True  # new bytes, or the end: the caller looks again
        if self.expired:
            raise UpstreamTimeout("the exchange's deadline passed")
        return False

    def take(self, size: int) -> bytes:
        """Up to ``size`` buffered bytes."""
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        if self._paused and len(self.buffer) < _LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def line(self, limit: int) -> bytes:
        """One CRLF-terminated line (without it), at most ``limit`` bytes."""
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > limit:
                raise BadAnswer("a line in the answer is too long")
            if not await self.more():
                raise BrokenConnection("the server closed the connection within the answer")
        if end > limit:
            raise BadAnswer("a line in the answer is too long")
        data = self.take(end + 2)
        return data[:-2]

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Answer:
    """The server's answer: status and headers read, the body still on the wire.

    ``headers`` has lower-case names (repeated ones joined by ``, ``); ``length`` is the
    number of body bytes :meth:`read`/:meth:`chunks` yield, when known in advance.
    """

    def __init__(
        self,
        pool: Pool,
        wire: _Wire,
        status: int,
        headers: dict[str, str],
        *,
        framing: str,
        remaining: int,
        keep_alive: bool,
    ) -> None:
        self.status = status
        self.headers = headers
        encoding = headers.get("content-encoding", "identity").strip().lower()
        self.encoded = encoding not in ("identity", "")
        if self.encoded and encoding not in ("gzip", "x-gzip", "deflate"):
            raise BadAnswer(f"the answer is encoded with {encoding!r}, which is not read")
        self.length: int | None = remaining if framing == "length" and not self.encoded else None
        self._encoding = encoding
        self._pool, self._wire = pool, wire
        self._framing, self._remaining = framing, remaining
        self._keep_alive = keep_alive
        self._done = framing == "length" and remaining == 0

    async def read(self, limit: int) -> bytes:
        """The whole body, never more than ``limit`` bytes (→ :class:`AnswerTooLarge`)."""
        if self.length is not None:
            if self.length > limit:
                raise AnswerTooLarge(f"{self.length} bytes")
            wire = self._wire
            if len(wire.buffer) >= self._remaining:  # the usual small answer: all here
                data = wire.take(self._remaining)
                self._remaining = 0
                self._done = True
                return data
            # Piece by piece: the wire stops reading while its buffer is full.
            return b"".join([piece async for piece in self._raw_chunks()])
        parts = bytearray()
        async for chunk in self.chunks(limit):
            parts += chunk
        return bytes(parts)

    async def chunks(self, limit: int) -> AsyncIterator[bytes]:
        """The body in pieces as they arrive, inflated; more than ``limit`` bytes in all →
        :class:`AnswerTooLarge` (after the pieces up to the limit)."""
        inflate = _inflater(self._encoding) if self.encoded else None
        produced = 0
        raw_budget = 2 * limit + _CHUNK  # compressed input that yields nothing is bounded too
        async for raw in self._raw_chunks():
            raw_budget -= len(raw)
            if raw_budget < 0:
                raise AnswerTooLarge("compressed input without end")
            if inflate is None:
                data = raw
            else:
                try:
                    data = inflate.decompress(raw, limit - produced + 1)
                except zlib.error as exc:
                    raise BadAnswer(f"the compressed answer is corrupt: {exc}") from None
                if inflate.unconsumed_tail:
                    raise AnswerTooLarge("inflated answer over the limit")
            produced += len(data)
            if produced > limit:
                raise AnswerTooLarge("answer over the limit")
            if data:
                yield data
        if inflate is not None:
            rest = inflate.flush()
            produced += len(rest)
            if produced > limit:
                raise AnswerTooLarge("answer over the limit")
            if rest:
                yield rest

    async def _raw_chunks(self) -> AsyncIterator[bytes]:
        wire = self._wire
        if self._framing == "length":
            while self._remaining:
                if not wire.buffer and not await wire.more():
                    raise BrokenConnection("the server closed the connection within the answer")
                data = wire.take(min(self._remaining, _CHUNK))
                self._remaining -= len(data)
                if data:
                    yield data
        elif self._framing == "chunked":
            async for data in self._chunked():
                yield data
        else:  # to the connection's end
            while True:
                if wire.buffer:
                    yield wire.take(_CHUNK)
                elif not await wire.more():
                    break
        self._done = True

    async def _chunked(self) -> AsyncIterator[bytes]:
        wire = self._wire
        while True:
            size_line = (await wire.line(1024)).split(b";", 1)[0].strip()
            if _CHUNK_SIZE.fullmatch(size_line) is None:
                raise BadAnswer("a chunk size in the answer is malformed")
            size = int(size_line, 16)
            if size == 0:
                break
            while size:
                if not wire.buffer and not await wire.more():
                    raise BrokenConnection("the server closed the connection within the answer")
                data = wire.take(min(size, _CHUNK))
                size -= len(data)
                yield data
            while len(wire.buffer) < 2:
                if not await wire.more():
                    raise BrokenConnection("the server closed the connection within the answer")
            if wire.take(2) != b"\r\n":
                raise BadAnswer("a chunk in the answer is not followed by CRLF")
        trailers = 0
        while await wire.line(MAX_HEAD):  # trailers: read and dropped
            trailers += 1
            if trailers > MAX_HEADERS:
                raise BadAnswer("too many trailers in the answer")

    def release(self) -> None:
        """Hand the connection back when the answer was read to its end, else close it."""
        wire, self._wire = self._wire, None  # type: ignore[assignment]
        if wire is None:
            return
        wire.disarm()
        if self._done and self._keep_alive and not wire.buffer and not wire.closed:
            self._pool.give_back(wire)
        else:
            self._pool.discard(wire)


def _inflater(encoding: str) -> zlib._Decompress:
    # gzip: its header; deflate: zlib-wrapped as the RFC says (a gzip header is read too).
    return zlib.decompressobj(16 + zlib.MAX_WBITS if "gzip" in encoding else 32 + zlib.MAX_WBITS)


class Pool:
    """Keep-alive connections to the origin of ``url``, at most ``max_connections``."""

    def __init__(self, url: str, *, max_connections: int, connect_timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL must be http(s)://host[:port]/…, got {url!r}")
        self._host = parts.hostname
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        default = parts.port is None or parts.port == (443 if self._tls else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if default else f"{host}:{self._port}"
        self._ssl = ssl.create_default_context() if self._tls else None
        self._connect_timeout = connect_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: deque[_Wire] = deque()
        self._busy: set[_Wire] = set()
        self._closed = False

    async def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | None,
        *,
        deadline: float,
    ) -> Answer:
        """Send ``method target`` and read the answer's head; the caller must
        :meth:`Answer.release` it. ``target`` is the path and query, already encoded.

        At ``deadline`` (loop time) the connection is closed: reading the answer, head or
        body, then raises :class:`UpstreamTimeout`. Waiting for a free connection and
        connecting are the caller's to bound."""
        if _UNSAFE.search(target) or not target.startswith("/") or _TOKEN.fullmatch(method) is None:
            raise ValueError("request target or method with characters HTTP does not allow")
        head = [f"{method} {target} HTTP/1.1\r\nHost: {self._host_header}\r\n"]
        for name, value in headers.items():
            if _TOKEN.fullmatch(name) is None or _UNSAFE_VALUE.search(value):
                raise ValueError(f"header {name!r} with characters HTTP does not allow")
            head.append(f"{name}: {value}\r\n")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {0 if body is None else len(body)}\r\n")
        head.append("\r\n")
        message = "".join(head).encode("latin-1")
        if body:
            message += body
        await self._slots.acquire()
        try:
            wire = await self._connection()
        except BaseException:
            self._slots.release()
            raise
        try:
            assert wire.transport is not None
            wire.arm(deadline)
            wire.transport.write(message)
            return await self._answer(wire, method)
        except BaseException:
            self.discard(wire)
            raise

    async def _connection(self) -> _Wire:
        if self._closed:
            raise ConnectError("the pool is closed")
        now = time.monotonic()
        while self._idle:
            wire = self._idle.pop()
            if not wire.closed and not wire.buffer and now - wire.idle_since < IDLE_REUSE_SECONDS:
                self._busy.add(wire)
                return wire
            wire.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, wire = await loop.create_connection(
                    _Wire,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._tls else None,
                )
        except TimeoutError:
            raise ConnectTimeout(f"no connection within {self._connect_timeout:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"{type(exc).__name__}: {exc}") from None
        self._busy.add(wire)
        return wire

    async def _answer(self, wire: _Wire, method: str) -> Answer:
        while True:
            while (end := wire.buffer.find(_HEAD_END)) < 0:
                if len(wire.buffer) > MAX_HEAD:
                    raise BadAnswer(f"the answer's head is over {MAX_HEAD} bytes")
                if not await wire.more():
                    raise BrokenConnection("the server closed the connection before answering")
            if end > MAX_HEAD:
                raise BadAnswer(f"the answer's head is over {MAX_HEAD} bytes")
            raw = wire.take(end + 4)[:end]
            status, headers, version = _parse_head(raw)
            if status >= 200:
                break
            if status == 101:
                raise BadAnswer("the server switched protocols")
            # 1xx informational: the real answer follows
        keep_alive = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        if method == "HEAD" or status in (204, 304):
            framing, remaining = "length", 0
        elif "transfer-encoding" in headers:
            if headers["transfer-encoding"].strip().lower() != "chunked":
                raise BadAnswer("the answer's transfer encoding is not chunked")
            if "content-length" in headers:
                raise BadAnswer("the answer has both a length and chunked encoding")
            framing, remaining = "chunked", 0
        elif "content-length" in headers:
            text = headers["content-length"].strip()
            if not text.isdigit() or len(text) > 18:
                raise BadAnswer("the answer's Content-Length is malformed")
            framing, remaining = "length", int(text)
        else:
            framing, remaining, keep_alive = "close", 0, False
        return Answer(
            self,
            wire,
            status,
            headers,
            framing=framing,
            remaining=remaining,
            keep_alive=keep_alive,
        )

    def give_back(self, wire: _Wire) -> None:
        self._busy.discard(wire)
        self._slots.release()
        if self._closed:
            wire.close()
            return
        wire.idle_since = time.monotonic()
        self._idle.append(wire)

    def discard(self, wire: _Wire) -> None:
        wire.disarm()
        if wire in self._busy:
            self._busy.discard(wire)
            self._slots.release()
        wire.close()

    async def close(self) -> None:
        """Close every connection, idle and busy."""
        self._closed = True
        for wire in [*self._idle, *self._busy]:
            wire.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run their connection_lost


def _parse_head(raw: bytes) -> tuple[int, dict[str, str], str]:
    if b"\r" in raw.replace(b"\r\n", b"") or b"\n" in raw.replace(b"\r\n", b""):
        raise BadAnswer("a bare CR or LF in the answer's head")
    lines = raw.decode("latin-1").split("\r\n")
    status_line = lines[0]
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if version not in ("HTTP/1.1", "HTTP/1.0") or not code.isdigit() or rest[3:4] not in ("", " "):
        raise BadAnswer(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    status = int(code)
    if status < 100:
        raise BadAnswer(f"status {status} out of range")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadAnswer(f"more than {MAX_HEADERS} headers in the answer")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise BadAnswer(f"a malformed header line in the answer: {line[:80]!r}")
        key = name.lower()
        value = value.strip(" \t")
        if key in headers:
            if key == "content-length" and headers[key] != value:
                raise BadAnswer("the answer has two different Content-Lengths")
            if key != "content-length":
                headers[key] = f"{headers[key]}, {value}"
        else:
            headers[key] = value
    return status, headers, version
