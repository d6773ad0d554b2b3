"""The machinery the executors (and the node) share: owned tasks, shared work, run memory."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from executors.events import RunEventStream
from executors.memory import GoneRuns, StartsInFlight
from executors.spec import Phase, Reason, RunEvent
from executors.tasks import SharedWork, TaskOwner


async def test_close_cancels_owned_tasks_and_a_closed_owner_spawns_nothing() -> None:
    owner = TaskOwner("test")
    task = owner.spawn(asyncio.sleep(60), name="sleeper")
    assert len(owner) == 1
    await owner.close()
    assert task.cancelled()
    assert len(owner) == 0
    coro = asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="closing"):
        owner.spawn(coro, name="late")
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED  # no "never awaited" warning


async def test_close_lets_running_work_finish_within_the_grace() -> None:
    owner = TaskOwner("test")
    task = owner.spawn(asyncio.sleep(0.01, result="done"), name="quick")
    await owner.close(grace=5)
    assert task.result() == "done"


async def test_a_failed_task_is_dropped_and_does_not_disturb_the_others() -> None:
    owner = TaskOwner("test", expected=(ValueError,))

    async def fail(error: Exception) -> None:
        raise error

    failing = [
        owner.spawn(fail(ValueError("expected")), name="a"),
        owner.spawn(fail(KeyError("crash")), name="b"),
    ]
    survivor = owner.spawn(asyncio.sleep(60), name="c")
    await asyncio.wait(failing)
    await asyncio.sleep(0)  # done callbacks
    assert len(owner) == 1
    assert not survivor.done()
    await owner.close()


async def test_shared_work_runs_once_per_key_and_outlives_a_cancelled_caller() -> None:
    owner = TaskOwner("test")
    shared: SharedWork[str, int] = SharedWork(owner)
    calls = 0
    release = asyncio.Event()

    async def work() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return calls

    first = asyncio.create_task(shared.run("image", work, name="pull"))
    second = asyncio.create_task(shared.run("image", work, name="pull"))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert await second == 1
    assert first.cancelled()
    assert calls == 1
    assert await shared.run("image", work, name="pull") == 2  # ended: the next one is new
    await owner.close()


async def test_a_second_start_of_a_run_waits_for_the_first_and_does_not_start_it() -> None:
    starting = StartsInFlight()
    started: list[str] = []
    release = asyncio.Event()

    async def start(who: str) -> None:
        started.append(who)
        await release.wait()

    first = asyncio.create_task(starting.run(7, lambda: start("first")))
    await asyncio.sleep(0)
    second = asyncio.create_task(starting.run(7, lambda: start("second")))
    await asyncio.sleep(0)
    assert 7 in starting
    assert not second.done()
    release.set()
    await asyncio.gather(first, second)
    assert started == ["first"]
    assert 7 not in starting


async def test_a_failed_start_releases_the_waiting_one_and_the_run() -> None:
    starting = StartsInFlight()
    entered = asyncio.Event()

    async def broken() -> None:
        entered.set()
        await asyncio.sleep(0)
        raise OSError("runtime unreachable")

    async def unused() -> None:
        raise AssertionError("a second start must not run")

    first = asyncio.create_task(starting.run(1, broken))
    await entered.wait()
    await starting.run(1, unused)
    with pytest.raises(OSError):
        await first
    assert 1 not in starting


def test_gone_runs_forgets_the_oldest_beyond_its_capacity() -> None:
    gone = GoneRuns(capacity=2)
    for run_id in (1, 2, 3):
        gone.add(run_id)
    assert 1 not in gone
    assert 2 in gone and 3 in gone


async def test_a_run_that_ended_unseen_reports_running_before_its_end() -> None:
    stream = RunEventStream()
    stream.publish(RunEvent.now(1, Phase.STARTING))
    stream.publish(RunEvent.now(2, Phase.STARTING))
    assert stream.publish_end(RunEvent.now(1, Phase.SUCCEEDED, Reason.COMPLETED), ran=True)
    assert stream.fail(2, Reason.START_FAILED, "refused")
    iterator = aiter(stream)
    events = [await asyncio.wait_for(anext(iterator), 1) for _ in range(5)]
    assert [(e.run_id, e.phase) for e in events] == [
        (1, Phase.STARTING),
        (2, Phase.STARTING),
        (1, Phase.RUNNING),
        (1, Phase.SUCCEEDED),
        (2, Phase.FAILED),
    ]
    assert events[-1].message == "refused"
