"""What the server sees when a run leaves too much: real vantage6 4.15.2 server, real podman.

A run's output over the node's ``max_output_bytes`` fails the run (``failed``, the sizes
and the setting in its log), nothing of it is read, and the node goes on serving; a log
over ``max_log_bytes`` keeps its end, with a note. The node runs in this process, so its
memory is this process's.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conformance.test_hostile_outputs import GIB, peak_rss, reset_peak_rss
from tests.e2e.conftest import StartNode
from tests.e2e.test_node_lifecycle import create, wait_for_run
from tests.peers.v6server import V6Collaboration

pytestmark = [pytest.mark.v6server, pytest.mark.podman, pytest.mark.slow]


async def test_a_huge_sparse_output_fails_its_run_with_the_reason_and_the_next_task_completes(
    v6_plain: V6Collaboration, start_node: StartNode, behaviour_image: str
) -> None:
    await start_node(v6_plain, v6_plain.org_a, max_output_bytes="4KiB", max_log_bytes=2048)
    size = 3 * GIB

    before = reset_peak_rss()
    huge = await create(v6_plain, behaviour_image, output="x", output_size=size, log="z" * 5000)
    run = await wait_for_run(v6_plain, huge["id"], timeout=120)
    growth = peak_rss() - before

    assert run["status"] == "failed"
    assert (
        f"the run's output is {size} bytes, over the node's limit of 4096 "
        "(setting max_output_bytes)"
    ) in run["log"]
    assert "setting max_log_bytes" in run["log"]  # the 5000-byte line was cut to its end
    assert not run.get("result")
    print(f"node peak RSS growth over a run with a {size}-byte sparse output: {growth} bytes")
    assert growth < 64 * 1024 * 1024, growth

    after = await create(v6_plain, behaviour_image, output='{"next": true}')
    run = await wait_for_run(v6_plain, after["id"], timeout=120)
    assert run["status"] == "completed"
    results = await asyncio.to_thread(v6_plain.user.result_values, after["id"])
    assert results == [{"next": True}]
