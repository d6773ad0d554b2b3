"""The real vantage6-server 4.15.2 peer speaks the v4 node protocol fednode relies on.

Smoke tests of the peer itself, written as a node would see it: a node api key buys a
token, the socket.io ``/tasks`` namespace greets an authenticated node with ``sync`` and
announces a researcher's task with ``new_task``; and the real vantage6 cryptors are
reachable for fednode's interoperability tests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import socketio

from tests.peers.v6server import V6Collaboration, V6Server, V6UserClient

pytestmark = pytest.mark.v6server

IMAGE = "localhost/fednode/average:test"  # never pulled: no node runs the task here


async def node_token(server: V6Server, api_key: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{server.api_url}/token/node", json={"api_key": api_key}) as response,
    ):
        assert response.status == 200, await response.text()
        token: dict[str, Any] = await response.json()
        return token


async def test_node_api_key_buys_an_access_token(v6_plain: V6Collaboration) -> None:
    token = await node_token(v6_plain.server, v6_plain.org_a.api_key)

    assert token["access_token"]
    assert token["refresh_token"]
    assert token["node_url"] == f"/api/node/{v6_plain.org_a.node_id}"
    claims = json.loads(base64.urlsafe_b64decode(token["access_token"].split(".")[1] + "=="))
    assert claims["sub"] == v6_plain.org_a.node_id
    assert claims["client_type"] == "node"


async def test_unknown_api_key_is_refused(v6_server: V6Server) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{v6_server.api_url}/token/node",
            json={"api_key": "00000000-0000-4000-8000-000000000000"},
        ) as response,
    ):
        assert response.status == 401


async def test_connected_node_gets_sync_then_new_task_within_2s(
    v6_plain: V6Collaboration,
) -> None:
    token = (await node_token(v6_plain.server, v6_plain.org_a.api_key))["access_token"]
    events: asyncio.Queue[tuple[str, object, float]] = asyncio.Queue()
    sio = socketio.AsyncClient(reconnection=False)
    for name in ("sync", "new_task"):
        sio.on(name, namespace="/tasks", handler=_recorder(events, name))

    await sio.connect(
        v6_plain.server.url,
        headers={"Authorization": f"Bearer {token}"},
        namespaces=["/tasks"],
        wait_timeout=10,
    )
    try:
        name, _, _ = await asyncio.wait_for(events.get(), timeout=5)
        assert name == "sync"

        sent = time.monotonic()
        task = await v6_plain.user.aio.create_task(
            collaboration=v6_plain.id,
            organizations=[v6_plain.org_a.id],
            input_={"method": "partial_average", "kwargs": {"column_name": "age"}},
            image=IMAGE,
        )
        name, data, received = await asyncio.wait_for(events.get(), timeout=2)
    finally:
        await sio.disconnect()

    assert name == "new_task"
    assert data == {"id": task["id"], "parent_id": None}
    assert received - sent < 2.0
    v6_plain.user.kill_task(task["id"])  # leave no open run for later tests


def test_task_run_carries_the_researchers_input_base64_encoded(
    v6_plain: V6Collaboration,
) -> None:
    user_input = {"method": "partial_average", "kwargs": {"column_name": "age"}}
    task = v6_plain.create_task(input_=user_input, image=IMAGE, organizations=[v6_plain.org_b.id])

    raw = v6_plain.user.request("run", params={"task_id": task["id"], "include": "task"})["data"]
    decoded_by_client = v6_plain.user.runs(task["id"])
    v6_plain.user.kill_task(task["id"])

    assert len(raw) == 1
    assert raw[0]["organization"]["id"] == v6_plain.org_b.id
    assert json.loads(base64.b64decode(raw[0]["input"])) == user_input
    assert json.loads(decoded_by_client[0]["input"]) == user_input
    assert v6_plain.user.task_status(task["id"]) == "killed by user"


def test_encrypted_task_input_is_readable_only_with_the_orgs_private_key(
    v6_encrypted: V6Collaboration,
) -> None:
    user_input = {"method": "partial_average", "kwargs": {"column_name": "age"}}
    org_a = v6_encrypted.org_a
    task = v6_encrypted.create_task(input_=user_input, image=IMAGE, organizations=[org_a.id])

    run = v6_encrypted.user.request("run", params={"task_id": task["id"]})["data"][0]
    v6_encrypted.user.kill_task(task["id"])

    assert run["input"].count("$") == 2  # b64(RSA(key)) $ b64(iv) $ b64(AES-CTR(input))
    assert org_a.private_key is not None
    plain = v6_encrypted.user.decrypt(run["input"], org_a.private_key)
    assert json.loads(plain) == user_input


@pytest.mark.parametrize("collaboration", ["v6_plain", "v6_encrypted"])
async def test_result_patched_by_a_node_reaches_the_researcher(
    collaboration: str, request: pytest.FixtureRequest
) -> None:
    collab: V6Collaboration = request.getfixturevalue(collaboration)
    org = collab.org_b
    task = await collab.user.aio.create_task(
        collaboration=collab.id, organizations=[org.id], input_={"method": "m"}, image=IMAGE
    )
    token = (await node_token(collab.server, org.api_key))["access_token"]
    result = {"sum": 123.5, "count": 3}
    # The result is for the task's initiating org (root): its public key, or base64.
    init_org = collab.user.request(f"organization/{task['init_org']['id']}")
    if collab.encrypted:
        sealed = collab.user.encrypt(json.dumps(result).encode(), init_org["public_key"])
    else:
        sealed = collab.user.encrypt(json.dumps(result).encode(), None, kind="dummy")

    async with aiohttp.ClientSession(
        base_url=collab.server.url, headers={"Authorization": f"Bearer {token}"}
    ) as http:
        params = {"state": "open", "node_id": org.node_id, "task_id": task["id"], "include": "task"}
        async with http.get("/api/run", params=params) as response:
            assert response.status == 200
            runs = (await response.json())["data"]
        assert [r["task"]["id"] for r in runs] == [task["id"]]
        run = runs[0]
        assert run["status"] == "pending"
        now = datetime.now(UTC).isoformat()
        async with http.patch(f"/api/run/{run['id']}", json={"started_at": now}) as response:
            assert response.status == 200
        done = {"result": sealed, "log": "ok", "status": "completed", "finished_at": now}
        async with http.patch(f"/api/run/{run['id']}", json=done) as response:
            assert response.status == 200, await response.text()

    results = await collab.user.aio.wait_for_results(task["id"], timeout=20)

    assert [json.loads(r["result"]) for r in results] == [result]
    assert results[0]["run"]["id"] == run["id"]
    runs_seen_by_user = collab.user.runs(task["id"])
    assert runs_seen_by_user[0]["status"] == "completed"


def test_server_restart_keeps_nodes_and_tokens(v6_plain: V6Collaboration) -> None:
    server = v6_plain.server
    token = asyncio.run(node_token(server, v6_plain.org_a.api_key))["access_token"]

    server.restart()

    request = urllib.request.Request(
        f"{server.api_url}/node/{v6_plain.org_a.node_id}",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        node = json.load(response)
    assert node["organization"]["id"] == v6_plain.org_a.id
    assert node["collaboration"]["id"] == v6_plain.id
    assert v6_plain.user.request("version") == {"version": "4.15.2"}


def test_rsa_cryptor_round_trips_with_an_orgs_key_pair(v6_encrypted: V6Collaboration) -> None:
    org_a = v6_encrypted.org_a
    assert org_a.private_key is not None and org_a.public_key is not None
    message = b'{"sum": 123.5, "count": 3}'

    sealed = v6_encrypted.user.encrypt(message, org_a.public_key)

    assert v6_encrypted.user.decrypt(sealed, org_a.private_key) == message
    assert v6_encrypted.user.public_key_of(org_a.private_key) == org_a.public_key
    org = v6_encrypted.user.request(f"organization/{org_a.id}")
    assert org["public_key"] == org_a.public_key


def test_dummy_cryptor_is_plain_base64(v6_user: V6UserClient) -> None:
    message = b"\x00\x01 not secret"

    sealed = v6_user.encrypt(message, None, kind="dummy")

    assert base64.b64decode(sealed) == message
    assert v6_user.decrypt(sealed, None, kind="dummy") == message


def _recorder(
    events: asyncio.Queue[tuple[str, object, float]], name: str
) -> Callable[..., Awaitable[None]]:
    async def handler(data: object = None) -> None:
        await events.put((name, data, time.monotonic()))

    return handler
