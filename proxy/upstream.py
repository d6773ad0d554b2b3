"""The proxy's one connection pool to the server, with bounded time and careful retries.

One :class:`proxy.http1.Pool` per proxy, opened when the app starts and closed when it
stops; every run's requests share its keep-alive connections. It keeps no cookies (one run
must not see another's) and uses no proxy from the environment. (It replaced aiohttp's
``ClientSession``, whose per-request cost was the largest share of the proxy's CPU.)

Answers are asked for uncompressed (``Accept-Encoding: identity``): a compressing front
of the server (nginx ``gzip on``, an ingress) would otherwise send a ``Content-Length`` of
the compressed bytes, which the proxy must not pass on with the inflated ones. No answer
is read past ``max_response_bytes`` (counted after any decompression, should a server
compress anyway): larger → 502.

Failures become :class:`~proxy.errors.ProxyError` with the status the algorithm sees:

* the server cannot be reached (connection refused, DNS, connect timeout) → 503;
* the connection broke (reset, closed before the response) → 502;
* no complete answer within ``upstream_timeout`` → 504.

Retries, after a pause of :class:`common.backoff.Backoff` (``retry_backoff`` doubling,
jittered), happen only after connection errors: for idempotent
methods always, for others only when the connection could not even be opened (so the
request was never sent and cannot be applied twice). A server that refuses connections
(restarting) is asked again for up to ``unreachable_patience`` seconds (pauses up to 2 s)
before the 503, so runs ride through a server restart. A timeout is never retried: the
server may still be working on it, and the algorithm's wait is already spent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from common.backoff import Backoff
from common.logging import get_logger
from proxy.errors import ProxyError
from proxy.http1 import (
    Answer,
    AnswerTooLarge,
    BadAnswer,
    BrokenConnection,
    ConnectError,
    ConnectTimeout,
    Pool,
    UpstreamTimeout,
)
from proxy.limits import ProxyLimits

log = get_logger(__name__)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
#: The server's response headers an algorithm gets (the rest describe the hop, not the data).
RELAYED_HEADERS = ("Content-Type", "Content-Disposition", "total-count", "Link")
_RELAYED = tuple((name, name.lower()) for name in RELAYED_HEADERS)
_UPSTREAM_HEADERS = {"Accept-Encoding": "identity"}


def relayed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The relayed ones of an :class:`~proxy.http1.Answer`'s (lower-case) ``headers``."""
    return {name: headers[key] for name, key in _RELAYED if key in headers}


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
        self._path = self._base.partition("://")[2].partition("/")[2]
        self._prefix = f"/{self._path}" if self._path else ""
        self._limits = limits
        self._pool: Pool | None = None

    @property
    def api_url(self) -> str:
        return self._base

    async def open(self) -> None:
        limits = self._limits
        self._pool = Pool(
            self._base,
            max_connections=limits.max_connections,
            connect_timeout=limits.connect_timeout,
        )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @asynccontextmanager
    async def exchange(
        self, method: str, target: str, *, headers: dict[str, str], body: bytes | None = None
    ) -> AsyncIterator[Answer]:
        """The server's answer to ``method target`` (path and query), head read.

        ``upstream_timeout`` bounds the whole exchange, the caller's reading of the body
        included; errors while the caller reads the body are mapped like errors while
        sending.
        """
        deadline = asyncio.get_running_loop().time() + self._limits.upstream_timeout
        try:
            async with asyncio.timeout_at(deadline):  # a free connection, connecting, retries
                answer = await self._send(method, target, headers, body, deadline)
        except (TimeoutError, UpstreamTimeout):
            raise self._timeout() from None
        try:
            yield answer  # the answer's reads end at the deadline (UpstreamTimeout)
        except UpstreamTimeout:
            raise self._timeout() from None
        except AnswerTooLarge:
            raise self.too_large(None) from None
        except BrokenConnection as exc:
            raise ProxyError(502, f"the server's answer broke off: {exc}") from None
        except BadAnswer as exc:
            raise ProxyError(502, f"bad answer from the server: {exc}") from None
        finally:
            answer.release()

    async def call(
        self, method: str, target: str, *, headers: dict[str, str], body: bytes | None = None
    ) -> Reply:
        """The whole answer, buffered."""
        async with self.exchange(method, target, headers=headers, body=body) as answer:
            data = await self.read(answer)
            return Reply(answer.status, data, relayed_headers(answer.headers))

    async def read(self, answer: Answer) -> bytes:
        """The whole body of ``answer``, never more than ``max_response_bytes`` (→ 502)."""
        limit = self._limits.max_response_bytes
        if answer.length is not None and answer.length > limit:
            raise self.too_large(answer.length)
        try:
            return await answer.read(limit)
        except AnswerTooLarge:
            raise self.too_large(None) from None

    def too_large(self, length: int | None) -> ProxyError:
        size = "" if length is None else f" ({length} bytes)"
        return ProxyError(
            502,
            f"the server's answer{size} is larger than the proxy passes on "
            f"({self._limits.max_response_bytes} bytes, proxy.max_response_mb)",
        )

    async def _send(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | None,
        deadline: float,
    ) -> Answer:
        pool = self._pool
        if pool is None:
            raise ProxyError(503, "the proxy is not connected to the server (not started)")
        limits = self._limits
        headers = _UPSTREAM_HEADERS | headers
        target = self._prefix + target
        backoff: Backoff | None = None
        loop = asyncio.get_running_loop()
        patient_until = min(deadline, loop.time() + limits.unreachable_patience)
        refused = Backoff(first=max(limits.retry_backoff, 1e-3), cap=2.0)
        while True:
            try:
                return await pool.request(method, target, headers, body, deadline=deadline)
            except BadAnswer as exc:
                raise ProxyError(502, f"bad answer from the server: {exc}") from None
            except ValueError as exc:
                raise ProxyError(400, f"the request cannot be forwarded: {exc}") from None
            except ConnectTimeout:
                raise ProxyError(
                    503,
                    f"the server is unreachable (no connection within "
                    f"{limits.connect_timeout:g} s)",
                ) from None
            except ConnectError as exc:
                # Nothing was sent: safe to try again whatever the method, and for as long
                # as the server may take to come back.
                msg = f"the server is unreachable: {exc}"
                delay = refused.next_delay()
                if loop.time() + delay > patient_until:
                    raise ProxyError(503, msg) from None
                if refused.failures == 1:
                    log.info("proxy.upstream_waiting", method=method, error=msg)
                await asyncio.sleep(delay)
                continue
            except BrokenConnection as exc:
                status, msg = 502, f"the connection to the server broke: {exc}"
                retry = method in IDEMPOTENT
            if backoff is None:
                backoff = Backoff(
                    first=max(limits.retry_backoff, 1e-3),
                    cap=max(limits.retry_backoff, 1e-3) * 2**limits.retries,
                )
            if not retry or backoff.failures >= limits.retries:
                raise ProxyError(status, msg)
            log.info("proxy.upstream_retry", method=method, attempt=backoff.failures + 1, error=msg)
            await backoff.pause()

    def _timeout(self) -> ProxyError:
        return ProxyError(
            504, f"the server did not answer within {self._limits.upstream_timeout:g} s"
        )
