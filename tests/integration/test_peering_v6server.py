"""The relay's identity check against the real vantage6 4.15.2 server.

A node proves who it is to the relay with its own access token; the relay asks the server
(``peering.identity.ServerIdentities``). Only a node's token the server accepts passes; a
user's token, a forged one and one for another node are refused.
"""

from __future__ import annotations

import base64
import json

import aiohttp
import pytest

from node.server.rest import ServerClient
from peering.identity import IdentityRefused, ServerIdentities
from tests.peers.v6server import V6Collaboration, V6Server

pytestmark = [pytest.mark.v6server]


def _forged(claims: dict[str, object]) -> str:
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJIUzI1NiJ9.{body}.c2lnbmF0dXJl"


async def test_a_node_token_is_who_the_server_says_and_nothing_else_passes(
    v6_plain: V6Collaboration, v6_server: V6Server
) -> None:
    node = ServerClient(api_url=v6_server.api_url, api_key=v6_plain.org_a.api_key)
    await node.open()
    try:
        await node.authenticate()
        async with aiohttp.ClientSession() as session:
            identities = ServerIdentities(api_url=v6_server.api_url, session=session)
            who = await identities.verify(node.access_token)
            assert (who.node_id, who.organization_id, who.collaboration_id) == (
                v6_plain.org_a.node_id,
                v6_plain.org_a.id,
                v6_plain.id,
            )
            async with session.post(
                f"{v6_server.api_url}/token/user",
                json={"username": v6_server.root_username, "password": v6_server.root_password},
            ) as response:
                user_token = (await response.json())["access_token"]
            with pytest.raises(IdentityRefused, match="'user' token"):
                await identities.verify(user_token)
            with pytest.raises(IdentityRefused, match="refused the token"):
                await identities.verify(
                    _forged({"client_type": "node", "sub": v6_plain.org_b.node_id, "exp": 4e9})
                )
            with pytest.raises(IdentityRefused, match="not a JWT"):
                await identities.verify("garbage")
    finally:
        await node.close()
