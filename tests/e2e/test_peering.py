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
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from executors.base import LABEL_NODE, LABEL_RUN
from peering.identity import ServerIdentities
from peering.relay import Relay
from tests.e2e.conftest import (
    RunningNode,
    StartNode,
    assert_carried_streams,
    central_sum,
    start_peered_nodes,
)
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


async def test_three_organizations_sum_secret_shares_through_the_relay(
    v6_encrypted_three: V6Collaboration,
    start_node: StartNode,
    podman_service: PodmanService,
    relay_url: str,
) -> None:
    collab = v6_encrypted_three
    nodes = await start_peered_nodes(start_node, collab, collab.all_orgs, relay_url)
    await central_sum(collab, podman_service.secretsum_image, "central_secret_sum")
    # Every node carried streams, each a span under its run's trace.
    for node in nodes:
        assert_carried_streams(node, closed_at_least=2)


async def test_a_real_mpyc_program_computes_the_sum_between_three_organizations(
    v6_encrypted_three: V6Collaboration,
    start_node: StartNode,
    podman_service: PodmanService,
    relay_url: str,
) -> None:
    """MPyC (PyPI ``mpyc``, unchanged): each organization's run is a party; the parties find
    each other with ``get_sibling_addresses`` and open MPyC's own TCP connections through
    the forwarders and the relay; Shamir shares, a secure sum, every party the same total."""
    collab = v6_encrypted_three
    nodes = await start_peered_nodes(start_node, collab, collab.all_orgs, relay_url)
    await central_sum(collab, podman_service.secretsum_image, "central_mpc_sum")
    # MPyC's party 0 connects to 1 and 2, party 1 to 2: three connections, each a stream
    # at both ends (closed when MPyC shuts down).
    for node in nodes:
        assert_carried_streams(node, closed_at_least=1)


def run_address(podman: PodmanService, node: RunningNode, run_id: int) -> str:
    """The run's IP on the runs' network, from podman."""
    listing = subprocess.run(
        podman.cli(
            "ps",
            "--filter", f"label={LABEL_RUN}={run_id}",
            "--filter", f"label={LABEL_NODE}={node.settings_values['name']}",
            "--format", "{{.ID}}",
        ),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    (container,) = listing.stdout.split()
    networks = subprocess.run(
        podman.cli("inspect", container, "--format", "{{json .NetworkSettings.Networks}}"),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    (network,) = json.loads(networks.stdout).values()
    return str(network["IPAddress"])


def banner_from_host(target: str, *, as_nobody: bool) -> bool:
    """Whether a host process (the node's own user, or ``nobody``) gets the listener's
    banner from ``target``."""
    host, _, port = target.rpartition(":")
    code = (
        "import socket,sys\n"
        "try:\n"
        f"    s=socket.create_connection(({host!r},{port}),timeout=3); s.settimeout(3)\n"
        "    sys.exit(0 if s.recv(64)==b'secretsum-listener\\n' else 1)\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    command = [sys.executable, "-c", code]
    if as_nobody:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    return subprocess.run(command, check=False, timeout=30).returncode == 0


async def listening(target: str, *, within: float = 30) -> bool:
    """Whether the node's own user gets the banner from ``target`` within ``within`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if await asyncio.to_thread(banner_from_host, target, as_nobody=False):
            return True
        await asyncio.sleep(0.5)
    return False


async def active_runs(collab: V6Collaboration, task_id: int, count: int) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while True:
        runs = await asyncio.to_thread(collab.user.runs, task_id)
        if sum(run["status"] == "active" for run in runs) == count:
            return list(runs)
        assert loop.time() < deadline, [run["status"] for run in runs]
        await asyncio.sleep(0.5)


async def test_only_runs_of_one_job_reach_each_other_not_other_jobs_orgs_or_host_users(
    v6_encrypted_three: V6Collaboration,
    start_node: StartNode,
    podman_service: PodmanService,
    relay_url: str,
) -> None:
    """Job X: A's and B's runs listen on 8888 and reach each other through the relay. While
    they do, a run of another job at A, an unrelated run at C and a host process of another
    user try to reach them — directly and through A's forwarders — and get nothing."""
    collab = v6_encrypted_three
    image = podman_service.secretsum_image
    nodes = await start_peered_nodes(start_node, collab, collab.all_orgs, relay_url)
    by_org = {node.org.id: node for node in nodes}
    base = nodes[0].settings_values["peering"]["first_port"]
    a, b, c = (collab.org_a.id, collab.org_b.id, collab.more[0].id)
    listen = await asyncio.to_thread(
        collab.create_task,
        input_={"method": "listen_for_peers", "kwargs": {"seconds": 50}},
        image=image,
        organizations=[a, b],
    )
    runs = await active_runs(collab, listen["id"], 2)
    targets = [
        f"{run_address(podman_service, by_org[org], run['id'])}:8888"
        for org in (a, b)
        for run in runs
        if run["organization"]["id"] == org
    ]
    forwarders = list(range(base, base + 8))  # node A's: one is A's run's way to B's

    def probe(org: int) -> dict[str, Any]:
        return collab.create_task(
            input_={
                "method": "probe_reach",
                "kwargs": {"targets": targets, "gateway_ports": forwarders},
            },
            image=image,
            organizations=[org],
        )

    # The control first: the node's own user may connect into the runs' network, so once
    # both listeners answer it, every refusal below is the isolation, not a dead port.
    node_user = [await listening(t) for t in targets]
    nobody = [await asyncio.to_thread(banner_from_host, t, as_nobody=True) for t in targets]
    other_job = await asyncio.to_thread(probe, a)
    other_org = await asyncio.to_thread(probe, c)

    for task in (other_job, other_org):
        await asyncio.to_thread(collab.user.wait_for_results, task["id"], timeout=120)
        (reached,) = await asyncio.to_thread(collab.user.result_values, task["id"])
        assert reached and not any(reached.values()), f"task {task['id']} reached {reached}"
    assert nobody == [False, False]  # another host user: the firewall's skuid rule
    assert node_user == [True, True]  # the node's own user may: the control
    await asyncio.to_thread(collab.user.wait_for_results, listen["id"], timeout=120)
    results = await asyncio.to_thread(collab.user.result_values, listen["id"])
    # each reached its sibling; each accepted its sibling's stream and the control, no more
    assert results == [{"accepted": 2, "siblings": 1, "reached": 1}] * 2, results
    assert_carried_streams(by_org[a], closed_at_least=2)  # its stream to B's, B's to it
