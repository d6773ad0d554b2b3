"""The executor event stream reports each run's progress once, in order, and breaks
loudly when the task that follows the runtime dies."""

from __future__ import annotations

import asyncio

import pytest

from executors.base import ExecutorError
from executors.events import RunEventStream
from executors.spec import Phase, Reason, RunEvent
from executors.verdict import Verdict


async def take(stream: RunEventStream, n: int) -> list[RunEvent]:
    iterator = aiter(stream)
    return [await asyncio.wait_for(anext(iterator), 1) for _ in range(n)]


async def test_terminal_event_passes_once_and_repeats_are_dropped() -> None:
    stream = RunEventStream()
    assert stream.publish(RunEvent.now(1, Phase.RUNNING))
    assert not stream.publish(RunEvent.now(1, Phase.RUNNING))
    assert stream.publish(RunEvent.now(1, Phase.SUCCEEDED, Reason.COMPLETED, exit_code=0))
    assert not stream.publish(RunEvent.now(1, Phase.FAILED, Reason.CRASHED, exit_code=1))
    assert not stream.publish(RunEvent.now(1, Phase.RUNNING))
    events = await take(stream, 2)
    assert [e.phase for e in events] == [Phase.RUNNING, Phase.SUCCEEDED]


async def test_runs_are_independent_and_forget_frees_memory() -> None:
    stream = RunEventStream()
    stream.publish(RunEvent.now(1, Phase.SUCCEEDED, Reason.COMPLETED))
    stream.publish(RunEvent.now(2, Phase.RUNNING))
    assert stream.phase_of(1) is Phase.SUCCEEDED
    stream.forget(1)
    assert stream.phase_of(1) is None
    assert [e.run_id for e in await take(stream, 2)] == [1, 2]


async def test_a_dead_follower_ends_the_stream_with_an_executor_error_after_its_events() -> None:
    stream = RunEventStream()

    async def follower() -> None:
        stream.publish(RunEvent.now(1, Phase.RUNNING))
        raise RuntimeError("watch broke for good")

    stream.fed_by(asyncio.create_task(follower(), name="informer-jobs"))
    iterator = aiter(stream)
    first = await asyncio.wait_for(anext(iterator), 1)

    with pytest.raises(ExecutorError, match=r"informer-jobs.*failed: RuntimeError\('watch broke"):
        await asyncio.wait_for(anext(iterator), 1)
    assert first.phase is Phase.RUNNING


async def test_a_follower_cancelled_at_close_leaves_the_stream_open() -> None:
    stream = RunEventStream()
    task = asyncio.create_task(asyncio.sleep(60), name="podman-events")
    stream.fed_by(task)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    stream.publish(RunEvent.now(2, Phase.RUNNING))

    assert [e.run_id for e in await take(stream, 1)] == [2]


def test_a_verdict_is_published_as_the_event_that_reports_it() -> None:
    verdict = Verdict(Phase.FAILED, Reason.CRASHED, 3, "the algorithm exited with code 3")

    event = verdict.event(7)

    assert (event.run_id, event.phase, event.reason, event.exit_code, event.message) == (
        7,
        Phase.FAILED,
        Reason.CRASHED,
        3,
        "the algorithm exited with code 3",
    )


async def test_a_queued_run_is_reported_pending_again_only_when_its_reason_changes() -> None:
    stream = RunEventStream()
    assert stream.publish(RunEvent.now(1, Phase.PENDING, message="waiting in queue 'runs'"))
    assert not stream.publish(RunEvent.now(1, Phase.PENDING, message="waiting in queue 'runs'"))
    assert stream.publish(RunEvent.now(1, Phase.PENDING, message="insufficient quota"))
    assert stream.publish(RunEvent.now(1, Phase.STARTING))
    assert not stream.publish(RunEvent.now(1, Phase.PENDING, message="preempted"))  # no way back
    events = await take(stream, 3)
    assert [(e.phase, e.message) for e in events] == [
        (Phase.PENDING, "waiting in queue 'runs'"),
        (Phase.PENDING, "insufficient quota"),
        (Phase.STARTING, ""),
    ]
