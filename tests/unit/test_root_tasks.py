"""A node whose service dies stops and says why, instead of staying "ready" with a dead loop.

:class:`~node.background.RootTasks` holds the node's services (socket link, event
consumers, token refresher). The first to end while the node is serving is its failure:
``/readyz`` turns 503 naming it, :meth:`RootTasks.wait` returns so the node shuts down,
and ``fednode start`` exits 3. Ends during shutdown are not failures.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from node.app import Node
from node.background import RootTaskDied, RootTasks
from node.health import make_health_app
from node.settings import load_settings


async def serve_forever() -> None:
    await asyncio.Event().wait()


async def die(after: float, error: Exception) -> None:
    await asyncio.sleep(after)
    raise error


async def test_the_first_root_task_to_fail_is_the_failure_and_ends_the_wait() -> None:
    roots = RootTasks()
    survivor = roots.spawn(serve_forever(), name="socket")
    roots.spawn(die(0.01, RuntimeError("event loop of the consumer broke")), name="server-events")

    await asyncio.wait_for(roots.wait(asyncio.Event()), 2)
    await roots.close()

    assert isinstance(roots.failure, RootTaskDied)
    assert roots.failure.name == "server-events"
    assert str(roots.failure) == (
        "root task 'server-events' failed: RuntimeError('event loop of the consumer broke')"
    )
    assert survivor.cancelled()  # the others are cancelled at close, not left running


async def test_a_root_task_that_returns_is_a_failure_too() -> None:
    roots = RootTasks()

    async def gives_up() -> None:
        return None

    roots.spawn(gives_up(), name="executor-events")
    await asyncio.wait_for(roots.wait(asyncio.Event()), 2)
    await roots.close()

    assert str(roots.failure) == "root task 'executor-events' returned"


async def test_a_watched_task_owned_elsewhere_counts_as_a_root_task() -> None:
    roots = RootTasks()
    refresher = asyncio.create_task(die(0.01, ValueError("malformed token")), name="token-refresh")
    roots.watch(refresher)

    await asyncio.wait_for(roots.wait(asyncio.Event()), 2)
    await roots.close()

    assert roots.failure is not None and roots.failure.name == "token-refresh"


async def test_stopping_cancels_the_root_tasks_cleanly_and_is_no_failure() -> None:
    roots = RootTasks()
    tasks = [roots.spawn(serve_forever(), name=name) for name in ("socket", "server-events")]
    refresher = asyncio.create_task(serve_forever(), name="token-refresh")
    roots.watch(refresher)
    stop = asyncio.Event()
    stop.set()

    await asyncio.wait_for(roots.wait(stop), 2)
    await roots.close()
    refresher.cancel()  # its owner (the server client) cancels it after the services
    await asyncio.gather(refresher, return_exceptions=True)

    assert roots.failure is None
    assert not roots.died.is_set()
    assert all(task.cancelled() for task in tasks)


async def test_readyz_answers_503_naming_the_dead_root_task(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(
        "server_url: https://v6.example.org\napi_key: not-a-real-key\ntask_dir: ./tasks\n"
    )
    node = Node(load_settings(config))
    roots = node.state.services = RootTasks()
    roots.spawn(die(0, RuntimeError("socket.io client crashed")), name="socket")
    await asyncio.wait_for(roots.wait(asyncio.Event()), 2)

    async with TestClient(TestServer(make_health_app(status=node.status))) as client:
        response = await client.get("/readyz")
        body = await response.json()
    await roots.close()

    assert response.status == 503
    assert body["ready"] is False
    assert "root task 'socket' failed: RuntimeError('socket.io client crashed')" in body["missing"]


async def test_a_root_task_that_fails_once_shutdown_began_is_no_failure() -> None:
    roots = RootTasks()
    closing = asyncio.Event()

    async def consumer() -> None:  # its owner refuses new work once the lifecycle closes
        await closing.wait()
        raise RuntimeError("runs is closing; not starting sync")

    task = roots.spawn(consumer(), name="server-events")
    roots.shutting_down()  # the node stops: its lifecycle closes under the consumers
    closing.set()
    await asyncio.gather(task, return_exceptions=True)
    await roots.close()

    assert roots.failure is None
