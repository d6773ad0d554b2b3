"""Algorithms reach the server only through their node's proxy (real server, real podman).

The ``average`` algorithm's central part runs on node A, creates ``partial_average``
subtasks for A and B through A's proxy, waits for their results through it, and returns
the overall mean to the researcher — in an unencrypted and an encrypted collaboration.
The ``diagnostics`` probe shows what a run can reach: the proxy, and nothing else.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.conftest import StartNode
from tests.peers.podman import PodmanService
from tests.peers.v6server import V6Collaboration

pytestmark = [pytest.mark.v6server, pytest.mark.podman, pytest.mark.slow]


@pytest.mark.parametrize("collaboration", ["v6_plain", "v6_encrypted"])
async def test_central_average_through_the_proxy(
    collaboration: str,
    request: pytest.FixtureRequest,
    start_node: StartNode,
    podman_service: PodmanService,
) -> None:
    collab: V6Collaboration = request.getfixturevalue(collaboration)
    node_a = await start_node(collab, collab.org_a)
    await start_node(collab, collab.org_b)
    orgs = [collab.org_a.id, collab.org_b.id]
    task = await asyncio.to_thread(
        collab.create_task,
        input_={
            "method": "central_average",
            "kwargs": {"column_name": "age", "organizations": orgs},
        },
        image=podman_service.average_image,
        organizations=[collab.org_a.id],
    )
    await asyncio.to_thread(collab.user.wait_for_results, task["id"], timeout=180)
    (result,) = await asyncio.to_thread(collab.user.result_values, task["id"])
    assert result["average"] == pytest.approx(41.875)
    assert (result["sum"], result["count"]) == (670, 16)
    # The central run's proxied calls are spans in its own trace.
    (central,) = [
        s
        for s in node_a.spans
        if s.name == "run" and (s.attributes or {})["fednode.task_id"] == task["id"]
    ]
    proxied = [s for s in node_a.spans if s.context.trace_id == central.context.trace_id]
    assert any("task" in s.name for s in proxied if s.name not in {"run", "admit", "start"})


async def test_a_run_reaches_the_proxy_and_nothing_else(
    v6_plain: V6Collaboration, start_node: StartNode, podman_service: PodmanService
) -> None:
    await start_node(v6_plain, v6_plain.org_a)
    task = await asyncio.to_thread(
        v6_plain.create_task,
        input_={"method": "diagnose", "kwargs": {"targets": ["1.1.1.1:53", "9.9.9.9:443"]}},
        image=podman_service.diagnostics_image,
        organizations=[v6_plain.org_a.id],
    )
    await asyncio.to_thread(v6_plain.user.wait_for_results, task["id"], timeout=120)
    (report,) = await asyncio.to_thread(v6_plain.user.result_values, task["id"])
    assert report["proxy"]["reachable"] is True, report["proxy"]
    assert report["internet"]["reachable"] is False, report["internet"]
    assert report["dns"]["resolves"] is False, report["dns"]
    assert report["root_fs"]["writable"] is False
    assert report["identity"]["uid"] != 0
