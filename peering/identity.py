"""Who a node is, as the vantage6 server says: how the relay admits a node.

A node proves its identity to the relay with what it already has: its vantage6 access
token (the JWT the server gave it for its API key). The relay does not hold the server's
signing key, so it asks the server: ``GET /api/node/<id>`` with the node's own token. The
server answers only for a token it signed and that has not expired; the token must be a
node's (``client_type`` ``node``) and the node the answer describes must be the token's
subject. A user's or an algorithm container's token is refused, and so is one for
another server. The answer gives the node's organization and collaboration, which the
relay uses to forward only between nodes of one collaboration.

Checked identities are cached until the token's own expiry (at most ``cache_seconds``),
so a reconnecting node costs the server one call per token.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from common.logging import get_logger

log = get_logger(__name__)


class IdentityRefused(Exception):
    """The token does not prove a node identity; the message says why (safe to show)."""


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    node_id: int
    organization_id: int
    collaboration_id: int
    name: str
    expires_at: float  # the token's ``exp`` (epoch seconds)


def token_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (the server verifies it when we call with it)."""
    try:
        payload = token.split(".")[1]
        if len(payload) > 8192:
            raise ValueError("too long")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError) as exc:
        raise IdentityRefused(f"not a JWT: {exc}") from None
    if not isinstance(claims, dict):
        raise IdentityRefused("not a JWT: its claims are not an object")
    return claims


class ServerIdentities:
    """Checks node tokens with one vantage6 server."""

    def __init__(
        self,
        *,
        api_url: str,
        session: aiohttp.ClientSession,
        cache_seconds: float = 300.0,
        timeout: float = 10.0,
    ) -> None:
        self._api_url = api_url.rstrip("/")
        self._session = session
        self._cache_seconds = cache_seconds
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._cache: dict[str, tuple[NodeIdentity, float]] = {}  # token -> (who, until)

    async def verify(self, token: str) -> NodeIdentity:
        now = time.time()
        cached = self._cache.get(token)
        if cached is not None and cached[1] > now:
            return cached[0]
        claims = token_claims(token)
        if claims.get("client_type") != "node":
            raise IdentityRefused(
                f"a {claims.get('client_type', 'unknown')!r} token; only nodes may connect"
            )
        subject = claims.get("sub")
        if not isinstance(subject, int) or isinstance(subject, bool) or subject <= 0:
            raise IdentityRefused("the token names no node")
        expiry = claims.get("exp")
        expires_at = float(expiry) if isinstance(expiry, int | float) else now + 60.0
        if expires_at <= now:
            raise IdentityRefused("the token has expired")
        try:
            async with self._session.get(
                f"{self._api_url}/node/{subject}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=self._timeout,
            ) as response:
                if response.status in (401, 403, 422):
                    raise IdentityRefused(f"the server refused the token ({response.status})")
                if response.status != 200:
                    raise IdentityRefused(
                        f"the server could not check the token (HTTP {response.status})"
                    )
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise IdentityRefused(f"the server is unreachable: {type(exc).__name__}") from None
        try:
            identity = NodeIdentity(
                node_id=int(body["id"]),
                organization_id=int(body["organization"]["id"]),
                collaboration_id=int(body["collaboration"]["id"]),
                name=str(body.get("name", ""))[:128],
                expires_at=expires_at,
            )
        except (KeyError, TypeError, ValueError):
            raise IdentityRefused("the server's answer about the node is malformed") from None
        if identity.node_id != subject:
            raise IdentityRefused("the server's answer is about another node")
        if len(self._cache) >= 4096:  # bounded: drop what expired, else everything
            expired = [t for t, (_, until) in self._cache.items() if until <= now]
            for old in expired or list(self._cache):
                del self._cache[old]
        self._cache[token] = (identity, min(expires_at, now + self._cache_seconds))
        return identity
