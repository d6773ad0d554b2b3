"""The server's REST API over one aiohttp session: authentication, retries, errors.

* Authenticates with the node's API key (``POST token/node``) and keeps the access token
  fresh: a background task refreshes it before it expires (``POST token/refresh``), and a
  rejected token on any request — 401 (expired), or 422 (a signature the server cannot
  verify, e.g. after its JWT secret changed) — re-authenticates once and repeats the
  request. Requests rejected together for the same token renew it once between them.
* Connection errors and 5xx answers are retried with bounded exponential backoff
  (:class:`common.backoff.Backoff`); 4xx answers are :class:`ServerError` with the
  server's own message.
* Pagination (``links.next``) is followed by :meth:`ServerClient.list_pages`.

The session is created in :meth:`ServerClient.open` and closed in :meth:`ServerClient.close`;
the refresh task is owned and cancelled there too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from common.backoff import Backoff
from node.logging import get_logger
from node.server.models import NodeIdentity, TokenPair

log = get_logger(__name__)

JSON = Any
#: Refresh the access token this long before it expires (the server's default life is 6 h).
REFRESH_MARGIN_SECONDS = 600
#: Answers that mean "this token is not accepted": flask-jwt-extended sends 401 for an
#: expired token and 422 for one it cannot decode or verify. (vantage6 also answers 401
#: for "no permission"; renewing then is wasted once, but harmless.)
TOKEN_REJECTED = frozenset({401, 422})


class ServerError(Exception):
    """The server answered with an error we do not retry (4xx, or 5xx after retries)."""

    def __init__(self, status: int, message: str, *, method: str = "", path: str = "") -> None:
        super().__init__(f"{method} {path}: {status} {message}".strip())
        self.status = status
        self.message = message


class ServerUnavailable(ServerError):
    """The server could not be reached (connection refused, timeouts) after retries."""

    def __init__(self, message: str, *, method: str = "", path: str = "") -> None:
        super().__init__(0, message, method=method, path=path)


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, without verifying it (the server verifies; we read ``exp``/``sub``)."""
    try:
        payload = token.split(".")[1]
        claims: dict[str, Any] = json.loads(
            base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        )
    except (IndexError, ValueError) as exc:
        raise ServerError(0, f"the server returned a malformed token: {exc}") from None
    return claims


class ServerClient:
    """A node's authenticated REST client for one vantage6 server."""

    def __init__(
        self,
        *,
        api_url: str,
        api_key: str,
        attempts: int = 5,
        timeout: float = 30.0,
        backoff_cap: float = 10.0,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._api_key = api_key
        self._attempts = attempts
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(10.0, timeout))
        self._backoff_cap = backoff_cap
        self._session: aiohttp.ClientSession | None = None
        self._tokens: TokenPair | None = None
        self._auth_lock = asyncio.Lock()
        self._refresher: asyncio.Task[None] | None = None
        self.node_id: int | None = None

    # -- life cycle -------------------------------------------------------------------

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def refresher(self) -> asyncio.Task[None] | None:
        """The task that keeps the access token fresh (from the first authentication on)."""
        return self._refresher

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ServerClient.open() was not called")
        return self._session

    # -- authentication ---------------------------------------------------------------

    @property
    def access_token(self) -> str:
        if self._tokens is None:
            raise RuntimeError("not authenticated")
        return self._tokens.access_token

    async def authenticate(self) -> None:
        """Exchange the API key for tokens; starts the refresher the first time."""
        async with self._auth_lock:
            await self._log_in()
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_forever(), name="token-refresh")

    async def refresh(self, *, rejected: str | None = None) -> None:
        """Swap the refresh token for a new access token; fall back to the API key.

        ``rejected`` is the access token the server just refused: if another caller has
        replaced it meanwhile, there is nothing left to renew.
        """
        async with self._auth_lock:
            held = self._tokens.access_token if self._tokens else None
            if rejected is not None and held is not None and held != rejected:
                return
            refresh = self._tokens.refresh_token if self._tokens else None
            if refresh is not None:
                try:
                    data = await self._send(
                        "POST",
                        "token/refresh",
                        auth=False,
                        headers={"Authorization": f"Bearer {refresh}"},
                    )
                    self._tokens = TokenPair(
                        access_token=data["access_token"],
                        refresh_token=data.get("refresh_token", refresh),
                    )
                    log.info("server.token_refreshed")
                    return
                except ServerError as exc:
                    log.warning("server.refresh_failed", error=str(exc))
            await self._log_in()

    async def _log_in(self) -> None:
        """``POST token/node`` with the API key (the caller holds the auth lock)."""
        data = await self._send(
            "POST", "token/node", json_body={"api_key": self._api_key}, auth=False
        )
        self._tokens = TokenPair.model_validate(data)
        self.node_id = int(jwt_claims(self._tokens.access_token)["sub"])
        log.info("server.authenticated", node_id=self.node_id, api_url=self.api_url)

    async def _refresh_forever(self) -> None:
        while True:
            expires = float(jwt_claims(self.access_token).get("exp", time.time() + 3600))
            await asyncio.sleep(max(5.0, expires - time.time() - REFRESH_MARGIN_SECONDS))
            try:
                await self.refresh()
            except ServerError as exc:
                log.error("server.token_refresh_failed", error=str(exc))
                await asyncio.sleep(30)

    async def identify(self) -> NodeIdentity:
        """Who this node is: its organization, collaboration and whether it is encrypted."""
        if self.node_id is None:
            await self.authenticate()
        node = await self.request("GET", f"node/{self.node_id}")
        collaboration_id = int(node["collaboration"]["id"])
        collaboration = await self.request("GET", f"collaboration/{collaboration_id}")
        return NodeIdentity(
            id=int(node["id"]),
            name=str(node.get("name", "")),
            organization_id=int(node["organization"]["id"]),
            collaboration_id=collaboration_id,
            encrypted=bool(collaboration.get("encrypted", False)),
        )

    # -- requests ---------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: JSON | None = None,
        params: Mapping[str, str | int] | None = None,
    ) -> JSON:
        """One API call with auth, retries and readable errors; returns the JSON body."""
        sent_with = self.access_token
        try:
            return await self._send(method, path, json_body=json_body, params=params)
        except ServerError as exc:
            if exc.status not in TOKEN_REJECTED:
                raise
            log.info("server.reauthenticating", status=exc.status, reason=exc.message)
        await self.refresh(rejected=sent_with)
        return await self._send(method, path, json_body=json_body, params=params)

    async def list_pages(
        self, path: str, *, params: Mapping[str, str | int] | None = None
    ) -> list[JSON]:
        """All items of a paginated collection, following ``links.next``."""
        items: list[JSON] = []
        page = 1
        while True:
            body = await self.request("GET", path, params={**(params or {}), "page": page})
            if isinstance(body, list):
                return items + body
            items.extend(body.get("data", []))
            if not (body.get("links") or {}).get("next"):
                return items
            page += 1

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json_body: JSON | None = None,
        params: Mapping[str, str | int] | None = None,
        auth: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> JSON:
        url = f"{self.api_url}/{path.lstrip('/')}"
        all_headers = dict(headers or {})
        backoff = Backoff(first=0.2, cap=self._backoff_cap)
        for attempt in range(1, self._attempts + 1):
            if auth:
                all_headers["Authorization"] = f"Bearer {self.access_token}"
            try:
                async with self.session.request(
                    method, url, json=json_body, params=params, headers=all_headers
                ) as response:
                    text = await response.text()
                    if response.status < 400:
                        return json.loads(text) if text.strip() else None
                    error = ServerError(
                        response.status, _server_message(text), method=method, path=path
                    )
                    if response.status < 500:
                        raise error
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                error = ServerUnavailable(
                    f"cannot reach the server: {exc or type(exc).__name__}",
                    method=method,
                    path=path,
                )
            if attempt == self._attempts:
                raise error
            delay = backoff.next_delay()
            log.warning(
                "server.retrying",
                method=method,
                path=path,
                error=str(error),
                attempt=attempt,
                delay=round(delay, 2),
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")


def _server_message(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:300] or "(no message)"
    if isinstance(body, dict):
        return str(body.get("msg") or body.get("message") or body)[:300]
    return str(body)[:300]
