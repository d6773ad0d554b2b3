"""The run lifecycle under load and failure: many tasks, kills, server and node restarts.

Real vantage6 4.15.2 server, real podman; the runs are the conformance suite's probe
algorithm (``behaviour``), which sleeps, exits and writes output as its input says.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan

from executors.base import LABEL_NODE, LABEL_RUN
from executors.runfiles import RunFiles
from node.server.models import KillContainers
from tests.e2e.conftest import RunningNode, StartNode
from tests.peers.podman import PodmanService
from tests.peers.v6server import V6Collaboration

pytestmark = [pytest.mark.v6server, pytest.mark.podman, pytest.mark.slow]


async def create(collab: V6Collaboration, image: str, **behaviour: Any) -> dict[str, Any]:
    return await asyncio.to_thread(
        collab.create_task,
        input_=behaviour,
        image=image,
        organizations=[collab.org_a.id],
        name="lifecycle",
    )


async def run_of(collab: V6Collaboration, task_id: int) -> dict[str, Any]:
    (run,) = await asyncio.to_thread(collab.user.runs, task_id)
    return run


async def wait_for_run(
    collab: V6Collaboration, task_id: int, *, status: str | None = None, timeout: float = 90
) -> dict[str, Any]:
    """Until the run has ``status`` (or any finished status when ``None``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        run = await run_of(collab, task_id)
        if (status is None and run["finished_at"]) or run["status"] == status:
            return run
        if loop.time() > deadline:
            pytest.fail(f"run of task {task_id} never reached {status or 'finished'}: {run}")
        await asyncio.sleep(0.3)


async def wait_for_all(
    collab: V6Collaboration, task_ids: list[int], *, timeout: float
) -> list[dict[str, Any]]:
    """The finished run of each task, polling one task at a time (the RPC is serial)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    done: dict[int, dict[str, Any]] = {}
    while len(done) < len(task_ids):
        for task_id in task_ids:
            if task_id not in done:
                run = await run_of(collab, task_id)
                if run["finished_at"]:
                    done[task_id] = run
        if loop.time() > deadline:
            pytest.fail(f"{len(task_ids) - len(done)} runs did not finish in {timeout} s")
        await asyncio.sleep(0.5)
    return [done[task_id] for task_id in task_ids]


def containers_of(podman: PodmanService, run_id: int, *, node: str | None = None) -> list[str]:
    """The containers of a run (of one node's, if given: run ids repeat across servers)."""
    filters = ["--filter", f"label={LABEL_RUN}={run_id}"]
    if node is not None:
        filters += ["--filter", f"label={LABEL_NODE}={node}"]
    listing = subprocess.run(
        podman.cli("ps", "-a", *filters, "--format", "{{.ID}}"),
        capture_output=True,
        text=True,
        check=True,
    )
    return listing.stdout.split()


def run_spans(node: RunningNode) -> dict[int, ReadableSpan]:
    """The node's ``run`` span of each run (the root of that run's spans on this node)."""
    return {int((s.attributes or {})["fednode.run_id"]): s for s in node.spans if s.name == "run"}  # type: ignore[arg-type]


def child_spans(node: RunningNode, name: str) -> dict[int, ReadableSpan]:
    """The node's ``name`` span of each run, by run id."""
    roots = {span.context.span_id: run_id for run_id, span in run_spans(node).items()}
    return {
        roots[s.parent.span_id]: s
        for s in node.spans
        if s.name == name and s.parent is not None and s.parent.span_id in roots
    }


def peak_overlap(intervals: list[tuple[int, int]]) -> int:
    """The most intervals open at one instant (one ending as another begins: not both)."""
    edges = sorted([(end, -1) for _, end in intervals] + [(start, 1) for start, _ in intervals])
    open_now = peak = 0
    for _, change in edges:
        open_now += change
        peak = max(peak, open_now)
    return peak


def uploads(node: RunningNode) -> Counter[int]:
    """How many results each run had uploaded (one ``upload`` span per upload)."""
    roots = {
        s.context.span_id: (s.attributes or {})["fednode.run_id"]
        for s in node.spans
        if s.name == "run"
    }
    return Counter(
        int(roots[s.parent.span_id])  # type: ignore[arg-type]
        for s in node.spans
        if s.name == "upload" and s.parent is not None and s.parent.span_id in roots
    )


async def test_fifty_tasks_at_once_all_complete_each_reported_once(
    v6_plain: V6Collaboration, start_node: StartNode, behaviour_image: str
) -> None:
    node = await start_node(v6_plain, v6_plain.org_a, max_concurrent_runs=8)
    tasks = await asyncio.gather(
        *(
            create(v6_plain, behaviour_image, sleep=0.5, output=json.dumps({"i": i}))
            for i in range(50)
        )
    )
    runs = await wait_for_all(v6_plain, [t["id"] for t in tasks], timeout=240)
    assert [run["status"] for run in runs] == ["completed"] * 50
    results = await asyncio.gather(
        *(asyncio.to_thread(v6_plain.user.result_values, t["id"]) for t in tasks)
    )
    assert sorted(r[0]["i"] for r in results) == list(range(50))
    counted = uploads(node)
    assert sorted(counted) == sorted(run["id"] for run in runs)
    assert set(counted.values()) == {1}


async def test_runs_beyond_max_concurrent_runs_wait_and_start_in_arrival_order(
    v6_plain: V6Collaboration, start_node: StartNode, behaviour_image: str
) -> None:
    node = await start_node(v6_plain, v6_plain.org_a, max_concurrent_runs=2)
    tasks = [
        await create(v6_plain, behaviour_image, sleep=3, output=json.dumps({"i": i}))
        for i in range(6)
    ]
    runs = await wait_for_all(v6_plain, [t["id"] for t in tasks], timeout=120)

    assert [run["status"] for run in runs] == ["completed"] * 6
    # At most two containers ran at once (from the executor's running event to its end),
    # and two did: the limit bounds the runs, it does not serialize them.
    # Only this test's runs: the server is shared by the session, and a node of org A
    # started here also sweeps the runs earlier tests left open (its ``run`` spans too).
    ours = {run["id"] for run in runs}
    executing = {i: s for i, s in child_spans(node, "execute").items() if i in ours}
    assert sorted(executing) == sorted(ours)
    assert peak_overlap([(s.start_time, s.end_time) for s in executing.values()]) == 2  # type: ignore[misc]
    # Runs queued: several arrived (their trace began) while both slots were executing.
    arrived = {
        run_id: span.start_time or 0 for run_id, span in run_spans(node).items() if run_id in ours
    }
    queued = [
        run_id
        for run_id, at in arrived.items()
        if sum(s.start_time <= at < s.end_time for s in executing.values()) == 2  # type: ignore[operator]
    ]
    assert len(queued) >= 2, f"too few runs waited for a slot to show their order: {queued}"
    # FIFO: the tasks arrived in the order they were made, and the node took its slots
    # (and told the server ``started_at``) in that order.
    assert sorted(arrived, key=arrived.__getitem__) == [run["id"] for run in runs]
    started = [datetime.fromisoformat(run["started_at"]) for run in runs]
    assert started == sorted(started)


async def test_killing_a_task_stops_its_run(
    v6_plain: V6Collaboration,
    start_node: StartNode,
    behaviour_image: str,
    podman_service: PodmanService,
) -> None:
    node = await start_node(v6_plain, v6_plain.org_a)
    task = await create(v6_plain, behaviour_image, sleep=120)
    run = await wait_for_run(v6_plain, task["id"], status="active")
    await asyncio.to_thread(v6_plain.user.kill_task, task["id"])
    run = await wait_for_run(v6_plain, task["id"])
    assert run["status"] == "killed by user"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while containers_of(podman_service, run["id"], node=node.node.settings.name):
        assert loop.time() < deadline, "the killed run's container is still there"
        await asyncio.sleep(0.3)


async def test_killing_one_task_leaves_the_nodes_other_run_running_to_completion(
    v6_plain: V6Collaboration,
    start_node: StartNode,
    behaviour_image: str,
    podman_service: PodmanService,
) -> None:
    node = await start_node(v6_plain, v6_plain.org_a)
    doomed = await create(v6_plain, behaviour_image, sleep=120)
    spared = await create(v6_plain, behaviour_image, sleep=6, output='{"spared": true}')
    await wait_for_run(v6_plain, doomed["id"], status="active")
    await wait_for_run(v6_plain, spared["id"], status="active")

    await asyncio.to_thread(v6_plain.user.kill_task, doomed["id"])

    killed = await wait_for_run(v6_plain, doomed["id"])
    assert killed["status"] == "killed by user"
    spared_run = await run_of(v6_plain, spared["id"])
    assert spared_run["status"] == "active"  # still going after the kill was handled
    assert containers_of(podman_service, spared_run["id"], node=node.node.settings.name)
    spared_run = await wait_for_run(v6_plain, spared["id"])
    assert spared_run["status"] == "completed"
    assert await asyncio.to_thread(v6_plain.user.result_values, spared["id"]) == [{"spared": True}]


async def test_a_kill_the_node_never_heard_is_carried_out_after_the_socket_reconnects(
    v6_plain: V6Collaboration,
    start_node: StartNode,
    behaviour_image: str,
    podman_service: PodmanService,
) -> None:
    # Found by the chaos campaign: a user's kill sent while the node's socket was away was
    # never heard, and the run's container slept on. Here the kill_containers event is
    # dropped as it arrives (the one part not real), then the server restarts, and the
    # node's next sync must find the run ended at the server and stop it.
    node = await start_node(v6_plain, v6_plain.org_a)
    link = node.node.state.socket
    assert link is not None
    task = await create(v6_plain, behaviour_image, sleep=120)
    run = await wait_for_run(v6_plain, task["id"], status="active")
    dropped: list[object] = []
    hear = link._queue

    def deaf_to_kills(model: Any, data: Any) -> None:
        if model is KillContainers:
            dropped.append(data)
        else:
            hear(model, data)

    link._queue = deaf_to_kills  # type: ignore[method-assign]
    await asyncio.to_thread(v6_plain.user.kill_task, task["id"])
    assert (await wait_for_run(v6_plain, task["id"]))["status"] == "killed by user"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not dropped:
        assert loop.time() < deadline, "the server sent no kill_containers"
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)
    name = node.node.settings.name
    assert containers_of(podman_service, run["id"], node=name), "killed although unheard"
    link._queue = hear  # type: ignore[method-assign]

    await asyncio.to_thread(v6_plain.server.restart)  # the socket reconnects: a sync

    files = RunFiles(node.node.settings.task_dir, run["id"])
    deadline = loop.time() + 60
    while containers_of(podman_service, run["id"], node=name) or files.directory.exists():
        assert loop.time() < deadline, "the run the server ended is still there"
        await asyncio.sleep(0.3)
    assert uploads(node) == Counter()
    assert (await run_of(v6_plain, task["id"]))["status"] == "killed by user"


async def test_node_survives_a_server_restart_mid_run(
    v6_plain: V6Collaboration, start_node: StartNode, behaviour_image: str
) -> None:
    node = await start_node(v6_plain, v6_plain.org_a)
    task = await create(v6_plain, behaviour_image, sleep=3, output='{"ok": true}')
    await wait_for_run(v6_plain, task["id"], status="active")
    await asyncio.to_thread(v6_plain.server.restart)
    run = await wait_for_run(v6_plain, task["id"], timeout=120)
    assert run["status"] == "completed"
    assert await asyncio.to_thread(v6_plain.user.result_values, task["id"]) == [{"ok": True}]
    # ... and it still takes new work on the reconnected socket.
    after = await create(v6_plain, behaviour_image, output='{"after": 1}')
    assert (await wait_for_run(v6_plain, after["id"]))["status"] == "completed"
    assert set(uploads(node).values()) == {1}


async def test_node_restart_mid_run_loses_and_duplicates_nothing(
    v6_plain: V6Collaboration,
    start_node: StartNode,
    behaviour_image: str,
    podman_service: PodmanService,
) -> None:
    first = await start_node(v6_plain, v6_plain.org_a)
    # The short run must outlive the first node's shutdown, even on a loaded machine where
    # seeing both runs active takes a few seconds; it ends while no node is there.
    short = await create(v6_plain, behaviour_image, sleep=4, output='{"run": "short"}')
    long = await create(v6_plain, behaviour_image, sleep=14, output='{"run": "long"}')
    await wait_for_run(v6_plain, short["id"], status="active")
    await wait_for_run(v6_plain, long["id"], status="active")
    await first.shutdown()  # runs keep running in podman
    await asyncio.sleep(6)  # the short run ends while no node is there

    second = await start_node(v6_plain, v6_plain.org_a)
    short_run = await wait_for_run(v6_plain, short["id"])
    long_run = await wait_for_run(v6_plain, long["id"])
    assert (short_run["status"], long_run["status"]) == ("completed", "completed")
    assert await asyncio.to_thread(v6_plain.user.result_values, short["id"]) == [{"run": "short"}]
    assert await asyncio.to_thread(v6_plain.user.result_values, long["id"]) == [{"run": "long"}]
    # The second node adopted both runs: it uploaded each once and started neither again.
    assert uploads(second) == Counter({short_run["id"]: 1, long_run["id"]: 1})
    assert not [s for s in second.spans if s.name == "start"]
    assert uploads(first) == Counter()
    # Each run is still one trace: the second node's spans of an adopted run join the
    # trace the first node began when the task arrived.
    began, adopted = run_spans(first), run_spans(second)
    for run_id in (short_run["id"], long_run["id"]):
        root, follower = began[run_id].get_span_context(), adopted[run_id]
        assert root is not None and follower.parent is not None
        assert follower.parent.trace_id == root.trace_id
        assert follower.parent.span_id == root.span_id
        assert child_spans(second, "upload")[run_id].get_span_context().trace_id == root.trace_id  # type: ignore[union-attr]


async def test_a_result_that_cannot_be_encrypted_for_the_initiator_fails_the_run_and_frees_the_slot(
    v6_encrypted: V6Collaboration,
    start_node: StartNode,
    behaviour_image: str,
    podman_service: PodmanService,
) -> None:
    """Issue 13.3: one such run used to hold its slot forever and stay ``active``."""
    user, root = v6_encrypted.user, v6_encrypted.root_org_id
    assert v6_encrypted.root_private_key is not None
    valid_key = await asyncio.to_thread(user.public_key_of, v6_encrypted.root_private_key)
    # The researcher's organization (the tasks' initiator) gets a key nobody can encrypt for.
    await asyncio.to_thread(user.set_public_key, root, base64.b64encode(b"not a key").decode())
    try:
        node = await start_node(v6_encrypted, v6_encrypted.org_a, max_concurrent_runs=1)
        secret = await create(v6_encrypted, behaviour_image, output="for the initiator only")
        no_output = await create(v6_encrypted, behaviour_image, output="")
        failed = await wait_for_run(v6_encrypted, secret["id"], timeout=60)
        following = await wait_for_run(v6_encrypted, no_output["id"], timeout=60)
    finally:
        await asyncio.to_thread(user.set_public_key, root, valid_key)

    assert failed["status"] == "failed"
    assert "cannot be encrypted for the initiating organization" in failed["log"]
    assert not failed.get("result")
    assert following["status"] == "completed"  # the slot was freed
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while containers_of(podman_service, failed["id"], node=node.node.settings.name):
        assert loop.time() < deadline, "the failed run's container was not cleaned up"
        await asyncio.sleep(0.3)


async def test_a_run_directory_nothing_backs_is_swept_when_the_node_starts(
    v6_plain: V6Collaboration, start_node: StartNode, tmp_path: Path
) -> None:
    """Issue 13.8: decrypted input left by a start that failed after the files were made."""
    stray = RunFiles(tmp_path / f"tasks-{v6_plain.org_a.name}", 999_999)
    stray.directory.mkdir(parents=True, mode=0o700)
    stray.input.write_bytes(b"decrypted input of a run that never started")

    await start_node(v6_plain, v6_plain.org_a)

    assert not stray.directory.exists()
