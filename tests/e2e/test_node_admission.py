"""What the node refuses, as the real vantage6 4.15.2 server records it (status ``not
allowed``, the reason in the run's log): images outside the allow-list as a whole name,
tags where digests are required, and databases the node does not have."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.conftest import StartNode
from tests.e2e.test_node_podman import PARTIAL, wait_for_statuses
from tests.peers.podman import PodmanService
from tests.peers.v6server import V6Collaboration

pytestmark = [pytest.mark.v6server, pytest.mark.podman, pytest.mark.slow]


async def test_a_lookalike_image_and_an_unknown_database_are_not_allowed(
    v6_plain: V6Collaboration, start_node: StartNode, podman_service: PodmanService
) -> None:
    # The operator allows one image. Matched from the start only (re.match), the pattern
    # also admitted every name that begins with it; the dot, unescaped, any character.
    allowed = r"localhost/fednode/average:latest"
    await start_node(v6_plain, v6_plain.org_a, policies={"allowed_algorithms": [allowed]})
    a = [v6_plain.org_a.id]
    lookalike = await asyncio.to_thread(
        v6_plain.create_task,
        input_=PARTIAL,
        image="localhost/fednode/average:latest-evil",
        organizations=a,
    )
    unknown_database = await asyncio.to_thread(
        v6_plain.create_task,
        input_=PARTIAL,
        image=podman_service.average_image,
        organizations=a,
        # The vantage6 client refuses labels such as ``a=b`` itself; a label the node
        # does not have is what reaches a node from this server.
        databases=[{"label": "no_such_db"}],
    )

    (run,) = await wait_for_statuses(v6_plain, lookalike["id"], 1)
    assert run["status"] == "not allowed", run
    assert "matches none of policies.allowed_algorithms" in run["log"]
    (run,) = await wait_for_statuses(v6_plain, unknown_database["id"], 1)
    assert run["status"] == "not allowed", run
    assert "'no_such_db' that this node does not have (default)" in run["log"]


async def test_a_tag_is_not_allowed_where_digests_are_required(
    v6_plain: V6Collaboration, start_node: StartNode, podman_service: PodmanService
) -> None:
    await start_node(
        v6_plain,
        v6_plain.org_a,
        policies={"allowed_algorithms": [r"localhost/fednode/.*"], "require_image_digest": True},
    )
    task = await asyncio.to_thread(
        v6_plain.create_task,
        input_=PARTIAL,
        image=podman_service.average_image,
        organizations=[v6_plain.org_a.id],
    )

    (run,) = await wait_for_statuses(v6_plain, task["id"], 1)
    assert run["status"] == "not allowed", run
    assert "policies.require_image_digest" in run["log"]
