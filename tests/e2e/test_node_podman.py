"""The node end to end: real vantage6 4.15.2 server, real podman, real algorithm images."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.e2e.conftest import RunningNode, StartNode
from tests.peers.podman import PodmanService
from tests.peers.v6server import V6Collaboration

pytestmark = [pytest.mark.v6server, pytest.mark.podman, pytest.mark.slow]

PARTIAL = {"method": "partial_average", "kwargs": {"column_name": "age"}}


async def results_of(collab: V6Collaboration, task: dict[str, Any]) -> list[Any]:
    await asyncio.to_thread(collab.user.wait_for_results, task["id"], timeout=120)
    return await asyncio.to_thread(collab.user.result_values, task["id"])


async def statuses_of(collab: V6Collaboration, task_id: int) -> list[str]:
    runs = await asyncio.to_thread(collab.user.runs, task_id)
    return sorted(run["status"] for run in runs)


async def wait_for_statuses(
    collab: V6Collaboration, task_id: int, count: int, timeout: float = 90
) -> list[dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        runs = await asyncio.to_thread(collab.user.runs, task_id)
        if len(runs) >= count and all(run["finished_at"] for run in runs):
            return runs
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"runs of task {task_id} did not finish: {runs}")
        await asyncio.sleep(0.5)


def span_tree(node: RunningNode) -> dict[str, set[str]]:
    """Child span names under each root ``run`` span, keyed by run id."""
    spans = node.spans
    roots = {s.context.span_id: s for s in spans if s.name == "run"}
    tree: dict[str, set[str]] = {
        str((r.attributes or {})["fednode.run_id"]): set() for r in roots.values()
    }
    for span in spans:
        if span.parent is not None and span.parent.span_id in roots:
            root = roots[span.parent.span_id]
            tree[str((root.attributes or {})["fednode.run_id"])].add(span.name)
    return tree


@pytest.mark.parametrize("collaboration", ["v6_plain", "v6_encrypted"])
async def test_average_task_returns_each_nodes_partial_and_a_trace_per_run(
    collaboration: str,
    request: pytest.FixtureRequest,
    start_node: StartNode,
    podman_service: PodmanService,
) -> None:
    collab: V6Collaboration = request.getfixturevalue(collaboration)
    node_a = await start_node(collab, collab.org_a)
    node_b = await start_node(collab, collab.org_b)

    task = await asyncio.to_thread(
        collab.create_task, input_=PARTIAL, image=podman_service.average_image
    )
    partials = await results_of(collab, task)

    assert sorted(json.dumps(p, sort_keys=True) for p in partials) == sorted(
        [json.dumps({"count": 10, "sum": 400}), json.dumps({"count": 6, "sum": 270})]
    )
    total = sum(p["sum"] for p in partials) / sum(p["count"] for p in partials)
    assert total == pytest.approx(41.875)
    assert await statuses_of(collab, task["id"]) == ["completed", "completed"]
    for node in (node_a, node_b):
        (children,) = span_tree(node).values()
        assert children == {"admit", "start", "execute", "upload"}
        (root,) = [s for s in node.spans if s.name == "run"]
        assert (root.attributes or {})["fednode.status"] == "completed"
        assert (root.attributes or {})["fednode.image"] == podman_service.average_image


async def test_disallowed_missing_and_crashing_runs_get_their_statuses(
    v6_plain: V6Collaboration, start_node: StartNode, podman_service: PodmanService
) -> None:
    await start_node(
        v6_plain, v6_plain.org_a, policies={"allowed_algorithms": [r"^localhost/fednode/.*$"]}
    )
    a = [v6_plain.org_a.id]
    refused = await asyncio.to_thread(
        v6_plain.create_task, input_=PARTIAL, image="docker.io/evil/miner:1", organizations=a
    )
    missing = await asyncio.to_thread(
        v6_plain.create_task, input_=PARTIAL, image="localhost/fednode/nope:1", organizations=a
    )
    crashing = await asyncio.to_thread(
        v6_plain.create_task,
        input_={"method": "no_such_method", "kwargs": {}},
        image=podman_service.average_image,
        organizations=a,
    )
    (run,) = await wait_for_statuses(v6_plain, refused["id"], 1)
    assert run["status"] == "not allowed"
    assert "policies.allowed_algorithms" in run["log"]
    (run,) = await wait_for_statuses(v6_plain, missing["id"], 1)
    assert run["status"] == "non-existing Docker image"
    (run,) = await wait_for_statuses(v6_plain, crashing["id"], 1)
    assert run["status"] == "crashed"
    assert "non-zero exit code" in run["log"]
