"""The proxy's one connection pool to the server, with bounded time and careful retries.

One :class:`aiohttp.ClientSession` per proxy, opened when the app starts and closed when
it stops; every run's requests share its keep-alive connections. Cookies are never kept
(one run must not see another's), proxies from the environment are never used.

Answers are asked for uncompressed (``Accept-Encoding: identity``): a compressing front
of the server (nginx ``gzip on``, an ingress) would otherwise send a ``Content-Length`` of
the compressed bytes, which the proxy must not pass on with the inflated ones. No answer
is read past ``max_response_bytes`` (counted after any decompression, should a server
compress anyway): larger → 502.

Failures become :class:`~proxy.errors.ProxyError` with the status the algorithm sees:

* the server cannot be reached (connection refused, DNS, connect timeout) → 503;
* the connection broke (reset, closed before the response) → 502;
* no complete answer within ``upstream_timeout`` → 504.

Retries, with doubling backoff, happen only after connection errors: for idempotent
methods always, for others only when the connection could not even be opened (so the
request was never sent and cannot be applied twice). A timeout is never retried: the
server may still be working on it, and the algorithm's wait is already spent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from yarl import URL

from common.logging import get_logger
from proxy.errors import ProxyError
from proxy.limits import ProxyLimits

log = get_logger(__name__)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_CHUNK = 64 * 1024
#: The server's response headers an algorithm gets (the rest describe the hop, not the data).
RELAYED_HEADERS = ("Content-Type", "Content-Disposition", "total-count", "Link")


def relayed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: headers[name] for name in RELAYED_HEADERS if name in headers}


@dataclass(frozen=True, slots=True)
class Reply:
    """A buffered answer of the server."""

    status: int
    body: bytes
    headers: dict[str, str]

    def response(self, body: bytes | None = None) -> web.Response:
        return web.Response(
            status=self.status, body=self.body if body is None else body, headers=self.headers
        )


class Upstream:
    """The server's REST API at ``api_url`` (e.g. ``http://server:5000/api``)."""

    def __init__(self, *, api_url: str, limits: ProxyLimits) -> None:
        self._base = api_url.rstrip("/")
        self._limits = limits
        self._session: aiohttp.ClientSession | None = None

    @property
    def api_url(self) -> str:
        return self._base

    async def open(self) -> None:
        limits = self._limits
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limits.max_connections),
            timeout=aiohttp.ClientTimeout(
                total=limits.upstream_timeout, sock_connect=limits.connect_timeout
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            headers={"Accept-Encoding": "identity"},
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @asynccontextmanager
    async def exchange(
        self, method: str, target: str, *, headers: dict[str, str], body: bytes | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The server's response to ``method target`` (path and query), headers read.

        Errors while the caller reads the body are mapped like errors while sending.
        """
        response = await self._send(method, target, headers, body)
        try:
            yield response
        except TimeoutError:
            raise self._timeout() from None
        except aiohttp.ClientError as exc:
            raise ProxyError(502, f"the server's answer broke off: {_describe(exc)}") from None
        finally:
            response.release()

    async def call(
        self, method: str, target: str, *, headers: dict[str, str], body: bytes | None = None
    ) -> Reply:
        """The whole answer, buffered."""
        async with self.exchange(method, target, headers=headers, body=body) as response:
            data = await self.read(response)
            return Reply(response.status, data, relayed_headers(response.headers))

    async def read(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole body of ``response``, never more than ``max_response_bytes`` (→ 502)."""
        limit = self._limits.max_response_bytes
        length = response.content_length
        if length is not None and length > limit:
            raise self.too_large(length)
        if length is not None and not is_encoded(response):
            return await response.read()  # exactly ``length`` bytes
        data = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK):
            data += chunk
            if len(data) > limit:
                raise self.too_large(None)
        return bytes(data)

    def too_large(self, length: int | None) -> ProxyError:
        size = "" if length is None else f" ({length} bytes)"
        return ProxyError(
            502,
            f"the server's answer{size} is larger than the proxy passes on "
            f"({self._limits.max_response_bytes} bytes, proxy.max_response_mb)",
        )

    async def _send(
        self, method: str, target: str, headers: dict[str, str], body: bytes | None
    ) -> aiohttp.ClientResponse:
        session = self._session
        if session is None:
            raise ProxyError(503, "the proxy is not connected to the server (not started)")
        limits = self._limits
        url = URL(self._base + target, encoded=True)
        deadline = time.monotonic() + limits.upstream_timeout
        attempt = 0
        while True:
            try:
                return await session.request(method, url, headers=headers, data=body)
            except aiohttp.ConnectionTimeoutError:
                raise ProxyError(
                    503,
                    f"the server is unreachable (no connection within "
                    f"{limits.connect_timeout:g} s)",
                ) from None
            except TimeoutError:
                raise self._timeout() from None
            except aiohttp.ClientConnectorError as exc:
                # Nothing was sent: safe to try again whatever the method.
                status, msg, retry = 503, f"the server is unreachable: {_describe(exc)}", True
            except aiohttp.ClientConnectionError as exc:
                status, msg = 502, f"the connection to the server broke: {_describe(exc)}"
                retry = method in IDEMPOTENT
            except aiohttp.ClientError as exc:
                raise ProxyError(502, f"bad answer from the server: {_describe(exc)}") from None
            delay = limits.retry_backoff * (2**attempt)
            if not retry or attempt >= limits.retries or time.monotonic() + delay > deadline:
                raise ProxyError(status, msg)
            attempt += 1
            log.info("proxy.upstream_retry", method=method, attempt=attempt, error=msg)
            await asyncio.sleep(delay)

    def _timeout(self) -> ProxyError:
        return ProxyError(
            504, f"the server did not answer within {self._limits.upstream_timeout:g} s"
        )


def is_encoded(response: aiohttp.ClientResponse) -> bool:
    """Whether the server compressed the body (its ``Content-Length`` is not what we read)."""
    return response.headers.get("Content-Encoding", "identity").lower() != "identity"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
