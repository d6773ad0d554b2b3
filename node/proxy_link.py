"""What the proxy needs from the node, handed to it as the small protocols it defines.

* :class:`OrganizationKeys` — organizations' public keys from the server, cached for a
  while (the run lifecycle uses it too, to encrypt results for the task's initiator);
* :class:`NodeProxyCrypto` — the node's cryptor as ``proxy.ProxyCrypto``.

Where the proxy listens, and what address runs are given, is the executor's to say
(``Executor.proxy_placement``): the node knows no runtime's settings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from node.crypto import CryptoError, Cryptor
from node.logging import get_logger
from node.server.rest import ServerClient, ServerError
from proxy import ProxyCryptoError

log = get_logger(__name__)

#: Organizations asked for per page of the collaboration's listing.
KEYS_PAGE_SIZE = 500


class OrganizationKeys:
    """Public keys of organizations as the server stores them (base64 PEM), cached.

    With ``collaboration_id`` (the node's), keys come from one listing of the
    collaboration's organizations (``GET organization?collaboration_id=``, pages of
    ``KEYS_PAGE_SIZE``), however many are asked for at once: concurrent misses share one
    listing, and an organization outside the collaboration is simply unknown (``None``)
    — an algorithm naming 10,000 organizations costs one listing, not 10,000 calls.
    Every key is forgotten after ``ttl`` seconds, so a rotated key is picked up; an
    organization missing from a listing makes the next miss list again only once
    ``retry_after`` has passed. Without ``collaboration_id`` each organization is fetched
    on its own (``GET organization/<id>``), cached the same way.
    """

    def __init__(
        self,
        server: ServerClient,
        *,
        collaboration_id: int | None = None,
        ttl: float = 300.0,
        retry_after: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._server = server
        self._collaboration_id = collaboration_id
        self._ttl = ttl
        self._retry_after = min(retry_after, ttl)
        self._clock = clock
        self._keys: dict[int, str | None] = {}
        self._listed_at: float | None = None
        self._fetched_at: dict[int, float] = {}  # per organization, without a listing
        self._lock = asyncio.Lock()

    async def public_key(self, organization_id: int) -> str | None:
        if self._collaboration_id is None:
            return await self._one(organization_id)
        if self._fresh(organization_id):
            return self._keys.get(organization_id)
        async with self._lock:  # one listing for all who miss at once
            if not self._fresh(organization_id):
                await self._list()
        return self._keys.get(organization_id)

    def _fresh(self, organization_id: int) -> bool:
        listed_at = self._listed_at
        if listed_at is None:
            return False
        age = self._clock() - listed_at
        if organization_id in self._keys:
            return age < self._ttl
        return age < self._retry_after  # not in the collaboration a moment ago

    async def _list(self) -> None:
        organizations = await self._server.list_pages(
            "organization",
            params={"collaboration_id": self._collaboration_id or 0, "per_page": KEYS_PAGE_SIZE},
        )
        self._keys = {
            int(org["id"]): _key_of(org)
            for org in organizations
            if isinstance(org, dict) and type(org.get("id")) is int
        }
        self._listed_at = self._clock()
        log.debug("proxy.keys_listed", organizations=len(self._keys))

    async def _one(self, organization_id: int) -> str | None:
        fetched_at = self._fetched_at.get(organization_id)
        if fetched_at is None or self._clock() - fetched_at >= self._ttl:
            org = await self._server.request("GET", f"organization/{organization_id}")
            self._keys[organization_id] = _key_of(org)
            self._fetched_at[organization_id] = self._clock()
        return self._keys[organization_id]


def _key_of(org: Any) -> str | None:
    key = org.get("public_key") if isinstance(org, dict) else None
    return key if isinstance(key, str) and key else None


class NodeProxyCrypto:
    """``proxy.ProxyCrypto`` over the node's cryptor and the organizations' keys."""

    def __init__(self, cryptor: Cryptor, keys: OrganizationKeys) -> None:
        self._cryptor = cryptor
        self._keys = keys

    @property
    def encrypted(self) -> bool:
        return self._cryptor.encrypted

    async def encrypt_for(self, organization_id: int, data: bytes) -> str:
        try:
            key = await self._keys.public_key(organization_id) if self.encrypted else None
        except ServerError as exc:
            raise ProxyCryptoError(
                f"organization {organization_id}: its public key could not be read: {exc}"
            ) from None
        if self.encrypted and key is None:
            raise ProxyCryptoError(
                f"organization {organization_id} has no public key in this collaboration"
            )
        try:
            return self._cryptor.encrypt(data, key)
        except CryptoError as exc:
            raise ProxyCryptoError(f"organization {organization_id}: {exc}") from None

    def decrypt(self, data: str) -> bytes:
        try:
            return self._cryptor.decrypt(data)
        except CryptoError as exc:
            raise ProxyCryptoError(str(exc)) from None
