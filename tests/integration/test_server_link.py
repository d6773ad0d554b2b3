"""The node's REST link to the real vantage6-server 4.15.2: errors, tokens, outages.

Each test drives :class:`node.server.rest.ServerClient` as node A of the plain
collaboration and checks what a node relies on: a refusal is a :class:`ServerError` with
the server's own words; a token the server no longer accepts is renewed and the request
goes through; the refresher renews the token before it runs out; a server that is down is
retried with backoff and then reported as :class:`ServerUnavailable`, and one that comes
back is used again. Outages are real: the peer's server process is stopped and started.

What happened inside the client is read from its log events (``server.retrying``,
``server.reauthenticating``, ``server.token_refreshed``, ``server.authenticated``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from node.server import rest
from node.server.rest import ServerClient, ServerError, ServerUnavailable, jwt_claims
from tests.peers.v6server import JWT_SECRET, V6Collaboration, V6Server

pytestmark = pytest.mark.v6server


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_token(claims: dict[str, Any]) -> str:
    """An HS256 JWT signed with the server's secret: the server verifies it as its own."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = hmac.new(JWT_SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256)
    return f"{head}.{body}.{_b64(signature.digest())}"


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


@pytest.fixture
async def client(v6_plain: V6Collaboration) -> AsyncIterator[ServerClient]:
    """Node A's client, authenticated, with quick retries (a test waits for each)."""
    v6_plain.server.start()  # a no-op unless an earlier test left it stopped
    link = ServerClient(
        api_url=v6_plain.server.api_url, api_key=v6_plain.org_a.api_key, attempts=4, backoff_cap=1
    )
    await link.open()
    await link.authenticate()
    yield link
    await link.close()


@pytest.fixture
def server_back_after(v6_plain: V6Collaboration) -> Iterator[V6Server]:
    """The server, started again after the test whatever the test did to it."""
    yield v6_plain.server
    v6_plain.server.start()


def hold_token(client: ServerClient, access_token: str, refresh_token: str | None = None) -> None:
    """Make the client hold these tokens, as if the server had issued them."""
    held = client._tokens
    assert held is not None
    client._tokens = held.model_copy(
        update={
            "access_token": access_token,
            "refresh_token": held.refresh_token if refresh_token is None else refresh_token,
        }
    )


# -- errors ---------------------------------------------------------------------------


async def test_a_missing_run_is_a_server_error_with_the_servers_message(
    client: ServerClient,
) -> None:
    with capture_logs() as logs, pytest.raises(ServerError) as refused:
        await client.request("GET", "run/999999")

    assert (refused.value.status, refused.value.message) == (404, "Run id=999999 not found!")
    assert not events(logs, "server.retrying")  # a 4xx is an answer, not an outage


async def test_a_forbidden_resource_is_a_server_error_with_the_servers_message(
    client: ServerClient, v6_plain: V6Collaboration
) -> None:
    # vantage6 answers "no permission" with 401, so the client renews its token once first.
    with capture_logs() as logs, pytest.raises(ServerError) as refused:
        await client.request("GET", f"node/{v6_plain.org_b.node_id}")

    assert (refused.value.status, refused.value.message) == (
        401,
        "You lack the permission to do that!",
    )
    assert len(events(logs, "server.reauthenticating")) == 1
    assert not events(logs, "server.retrying")


# -- tokens ---------------------------------------------------------------------------


def expired(token: str) -> str:
    """The same token, signed by the server's key, but expired a minute ago."""
    claims = jwt_claims(token)
    return signed_token({**claims, "iat": claims["iat"] - 7200, "exp": int(time.time()) - 60})


def garbled(token: str) -> str:
    """The same token with a signature the server cannot verify."""
    head, body, _ = token.split(".")
    return f"{head}.{body}.{_b64(b'not the server signature')}"


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [(expired, "Token has expired"), (garbled, "Signature verification failed")],
    ids=["expired", "bad-signature"],
)
async def test_a_rejected_access_token_is_renewed_once_and_the_request_succeeds(
    client: ServerClient, v6_plain: V6Collaboration, spoil: Any, reason: str
) -> None:
    hold_token(client, spoil(client.access_token))

    with capture_logs() as logs:
        node = await client.request("GET", f"node/{v6_plain.org_a.node_id}")

    assert node["id"] == v6_plain.org_a.node_id
    (renewal,) = events(logs, "server.reauthenticating")
    assert reason in renewal["reason"]
    assert len(events(logs, "server.token_refreshed")) == 1  # by the refresh token
    assert not events(logs, "server.authenticated")  # the api key was not needed


async def test_when_the_refresh_token_is_rejected_too_the_api_key_logs_in_again(
    client: ServerClient, v6_plain: V6Collaboration
) -> None:
    hold_token(client, expired(client.access_token), refresh_token=garbled(client.access_token))

    with capture_logs() as logs:
        node = await client.request("GET", f"node/{v6_plain.org_a.node_id}")

    assert node["id"] == v6_plain.org_a.node_id
    assert len(events(logs, "server.refresh_failed")) == 1
    assert len(events(logs, "server.authenticated")) == 1


async def test_many_requests_rejected_for_one_expired_token_renew_it_once(
    client: ServerClient, v6_plain: V6Collaboration
) -> None:
    hold_token(client, expired(client.access_token))

    with capture_logs() as logs:
        nodes = await asyncio.gather(
            *(client.request("GET", f"node/{v6_plain.org_a.node_id}") for _ in range(8))
        )

    assert [node["id"] for node in nodes] == [v6_plain.org_a.node_id] * 8
    assert len(events(logs, "server.token_refreshed")) == 1
    assert not events(logs, "server.authenticated")


async def test_the_refresher_renews_the_token_before_it_expires(
    v6_plain: V6Collaboration, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server issues tokens for at least 30 minutes; a margin of nearly all of that
    # makes the refresher due at once (it waits its floor of 5 s).
    monkeypatch.setattr(rest, "REFRESH_MARGIN_SECONDS", 6 * 3600 - 1)
    link = ServerClient(api_url=v6_plain.server.api_url, api_key=v6_plain.org_a.api_key)
    await link.open()
    try:
        with capture_logs() as logs:
            await link.authenticate()
            first = link.access_token
            for _ in range(100):
                if link.access_token != first:
                    break
                await asyncio.sleep(0.1)
        renewed = link.access_token
        node = await link.request("GET", f"node/{v6_plain.org_a.node_id}")
    finally:
        await link.close()

    assert renewed != first, "the refresher did not renew the token within 10 s"
    assert time.time() < jwt_claims(first)["exp"]  # renewed before the old one expired
    assert jwt_claims(renewed)["exp"] > jwt_claims(first)["exp"]
    assert events(logs, "server.token_refreshed")
    assert len(events(logs, "server.authenticated")) == 1  # the first login only
    assert node["id"] == v6_plain.org_a.node_id


# -- outages --------------------------------------------------------------------------


async def test_a_stopped_server_is_retried_with_backoff_then_unavailable_and_used_once_back(
    client: ServerClient, v6_plain: V6Collaboration, server_back_after: V6Server
) -> None:
    await asyncio.to_thread(server_back_after.stop)

    with capture_logs() as logs, pytest.raises(ServerUnavailable) as down:
        await client.request("GET", f"node/{v6_plain.org_a.node_id}")

    retries = events(logs, "server.retrying")
    assert [retry["attempt"] for retry in retries] == [1, 2, 3]  # then the 4th one failed
    # Full jitter: the n-th wait is at most base * 2**n (base 0.2 s, cap 1 s).
    assert all(retry["delay"] <= min(1.0, 0.2 * 2**n) for n, retry in enumerate(retries))
    assert "cannot reach the server" in down.value.message

    await asyncio.to_thread(server_back_after.start)
    node = await client.request("GET", f"node/{v6_plain.org_a.node_id}")
    assert node["id"] == v6_plain.org_a.node_id


async def test_a_request_made_while_the_server_is_down_succeeds_once_it_is_back(
    v6_plain: V6Collaboration, server_back_after: V6Server
) -> None:
    link = ServerClient(
        api_url=v6_plain.server.api_url, api_key=v6_plain.org_a.api_key, attempts=60, backoff_cap=1
    )
    await link.open()
    try:
        await link.authenticate()
        await asyncio.to_thread(server_back_after.stop)
        with capture_logs() as logs:
            request = asyncio.create_task(link.request("GET", f"node/{v6_plain.org_a.node_id}"))
            await asyncio.to_thread(server_back_after.start)
            node = await asyncio.wait_for(request, 30)
    finally:
        await link.close()

    assert node["id"] == v6_plain.org_a.node_id
    assert events(logs, "server.retrying")
