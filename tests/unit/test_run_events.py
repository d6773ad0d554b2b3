"""The executor event stream reports each run's progress once, in order."""

from __future__ import annotations

import asyncio

from executors.events import RunEventStream
from executors.spec import Phase, Reason, RunEvent


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
