"""Algorithm-to-algorithm networking end to end (docs/networking.md), on the real peers.

Three organizations, each with its own fednode node on the real vantage6 4.15.2 server and
real podman, connected only through a ``fednode relay`` (in this process, checking node
identities with that server). The ``secretsum`` algorithm's runs find each other with the
unchanged vantage6 4 API (``client.vpn.get_sibling_addresses``) and exchange secret shares
over TCP: what the addresses lead to is each node's forwarder → relay → peer node → peer
run. Nothing here is a fake.
"""

from __future__ import annotations

import asyncio
import csv
import random
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from peering.identity import ServerIdentities
from peering.relay import Relay
from tests.e2e.conftest import DATA, StartNode
from tests.peers.podman import PodmanService
from tests.peers.v6server import V6Collaboration, V6Server

pytestmark = [pytest.mark.v6server, pytest.mark.podman, pytest.mark.slow]


@pytest.fixture
async def relay_url(v6_server: V6Server) -> AsyncIterator[str]:
    """A real relay, checking node tokens with the real server."""
    async with aiohttp.ClientSession() as session:
        relay = Relay(ServerIdentities(api_url=v6_server.api_url, session=session))
        runner = web.AppRunner(relay.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            yield f"http://127.0.0.1:{port}/v1/connect"
        finally:
            await runner.cleanup()


def salaries(name: str) -> int:
    with (DATA / name).open() as handle:
        return sum(int(row["salary"]) for row in csv.DictReader(handle))


async def test_three_organizations_sum_secret_shares_through_the_relay(
    v6_encrypted_three: V6Collaboration,
    start_node: StartNode,
    podman_service: PodmanService,
    relay_url: str,
) -> None:
    collab = v6_encrypted_three
    base = random.randrange(40000, 50000, 100)
    nodes = [
        await start_node(
            collab, org, peering={"relay_url": relay_url, "first_port": base + 10 * i, "ports": 8}
        )
        for i, org in enumerate(collab.all_orgs)
    ]
    organizations = [org.id for org in collab.all_orgs]
    task = await asyncio.to_thread(
        collab.create_task,
        input_={
            "method": "central_secret_sum",
            "kwargs": {"column_name": "salary", "organizations": organizations},
        },
        image=podman_service.secretsum_image,
        organizations=[collab.org_a.id],
    )
    await asyncio.to_thread(collab.user.wait_for_results, task["id"], timeout=300)
    (result,) = await asyncio.to_thread(collab.user.result_values, task["id"])
    if not result.get("parties"):  # say why the partial runs failed
        for run in await asyncio.to_thread(collab.user.runs, task["id"] + 1):
            print(f"run {run['id']} {run['status']}:\n{run.get('log')}")
    # A's data is employees_a.csv; B's and C's employees_b.csv (the fixture's default).
    expected = salaries("employees_a.csv") + 2 * salaries("employees_b.csv")
    assert result == {"sum": expected, "parties": 3}
    # Every node carried streams, each a span under its run's trace.
    for node in nodes:
        streams = [s for s in node.spans if s.name == "peer-stream"]
        assert streams, f"no peer-stream span at {node.org.name}"
        assert all((s.attributes or {})["fednode.peer.outcome"] == "closed" for s in streams)
