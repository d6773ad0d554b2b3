"""``node.proxy_link.OrganizationKeys``: how many server calls keys cost, and for how long
they are kept. The server here is a FAKE (a recorder of calls with canned organizations);
the same class against the real vantage6 server is in
``tests/integration/test_proxy_v6server.py`` (one listing for 200 organizations; a
rotated key picked up after the cache time)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

import pytest

from node.crypto import PlainCryptor
from node.proxy_link import KEYS_PAGE_SIZE, NodeProxyCrypto, OrganizationKeys
from node.server.rest import ServerClient, ServerError
from proxy import ProxyCryptoError


class FakeServer:
    """Answers ``list_pages("organization", ...)`` and ``request("GET", "organization/<id>")``."""

    def __init__(self, keys: dict[int, str | None]) -> None:
        self.keys = keys
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail = False

    async def list_pages(self, path: str, *, params: Mapping[str, Any] | None = None) -> Any:
        self.calls.append((path, dict(params or {})))
        await asyncio.sleep(0.01)  # so that concurrent misses overlap
        if self.fail:
            raise ServerError(500, "down", method="GET", path=path)
        return [{"id": org, "public_key": key} for org, key in self.keys.items()]

    async def request(self, method: str, path: str, **_: Any) -> Any:
        self.calls.append((path, {}))
        org = int(path.rsplit("/", 1)[1])
        return {"id": org, "public_key": self.keys.get(org)}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def keys_for(server: FakeServer, clock: Clock, **kwargs: Any) -> OrganizationKeys:
    return OrganizationKeys(cast(ServerClient, server), clock=clock, **kwargs)


async def test_any_number_of_organizations_costs_one_listing() -> None:
    server, clock = FakeServer({2: "key-2", 3: "key-3", 4: None}), Clock()
    keys = keys_for(server, clock, collaboration_id=7)
    found = await asyncio.gather(*(keys.public_key(org) for org in [2, 3, 4, *range(100, 1100)]))
    assert found[:3] == ["key-2", "key-3", None]
    assert set(found[3:]) == {None}
    assert server.calls == [("organization", {"collaboration_id": 7, "per_page": KEYS_PAGE_SIZE})]


async def test_keys_are_read_again_after_the_ttl() -> None:
    server, clock = FakeServer({2: "old"}), Clock()
    keys = keys_for(server, clock, collaboration_id=7, ttl=60)
    assert await keys.public_key(2) == "old"
    server.keys[2] = "rotated"
    clock.now += 59
    assert await keys.public_key(2) == "old"
    clock.now += 2
    assert await keys.public_key(2) == "rotated"
    assert len(server.calls) == 2


async def test_an_organization_not_listed_is_asked_for_again_only_after_a_while() -> None:
    server, clock = FakeServer({2: "key-2"}), Clock()
    keys = keys_for(server, clock, collaboration_id=7, ttl=300, retry_after=10)
    assert await keys.public_key(5) is None
    assert await keys.public_key(5) is None
    assert len(server.calls) == 1
    server.keys[5] = "joined"
    clock.now += 11
    assert await keys.public_key(5) == "joined"
    assert len(server.calls) == 2


async def test_without_a_collaboration_each_organization_is_fetched_and_cached() -> None:
    server, clock = FakeServer({2: "key-2"}), Clock()
    keys = keys_for(server, clock, ttl=60)
    assert [await keys.public_key(2) for _ in range(3)] == ["key-2"] * 3
    clock.now += 61
    assert await keys.public_key(2) == "key-2"
    assert server.calls == [("organization/2", {}), ("organization/2", {})]


class EncryptingCryptor(PlainCryptor):
    encrypted = True

    def encrypt(self, data: bytes, public_key: str | None = None) -> str:
        return f"{public_key}:{data.decode()}"


async def test_the_proxy_gets_a_clear_error_for_a_missing_key_or_a_failed_listing() -> None:
    server, clock = FakeServer({2: "key-2"}), Clock()
    crypto = NodeProxyCrypto(EncryptingCryptor(), keys_for(server, clock, collaboration_id=7))
    assert await crypto.encrypt_for(2, b"x") == "key-2:x"
    with pytest.raises(ProxyCryptoError, match="organization 9 has no public key"):
        await crypto.encrypt_for(9, b"x")
    server.fail = True
    clock.now += 1000
    with pytest.raises(ProxyCryptoError, match="could not be read"):
        await crypto.encrypt_for(2, b"x")
