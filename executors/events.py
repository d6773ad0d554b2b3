"""The event stream every executor hands to the node, with "exactly once" built in.

Runtimes repeat themselves: a watch relist replays every object, podman's event stream and a
re-list after a reconnect both report the same death. :class:`RunEventStream` keeps the
last phase seen per run and lets an event through only when it moves the run forward
(``pending < starting < running < terminal``); a run's terminal event passes once. The
node then never has to de-duplicate. The one repeat let through is ``pending`` with a new
message: a run held by a queue (Kueue) whose reason for waiting changed.

One consumer reads :meth:`RunEventStream.__aiter__` (the node's run lifecycle); producers
call :meth:`RunEventStream.publish` from the executor's watcher task, or its two shorthands
for what every executor reports alike: :meth:`~RunEventStream.publish_end` (a run's end,
with ``running`` first if it ran unseen) and :meth:`~RunEventStream.fail`. ``forget`` drops
a run's memory after cleanup, so memory stays bounded by the runs in flight.

The task that follows the runtime (a watch, an event subscription) is registered with
:meth:`RunEventStream.fed_by`: should it ever end other than by being cancelled at
``close()``, the consumer gets the events already queued and then :class:`ExecutorError`
naming the task and why — so a dead follower ends the node's consumer (a root task of the
node, which then exits to be restarted) instead of leaving it waiting forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from executors.base import ExecutorError
from executors.spec import Phase, Reason, RunEvent

_ORDER = {
    Phase.PENDING: 0,
    Phase.STARTING: 1,
    Phase.RUNNING: 2,
    Phase.SUCCEEDED: 3,
    Phase.FAILED: 3,
    Phase.KILLED: 3,
}


class RunEventStream:
    """An unbounded queue of run events that drops repeats and backward steps."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[RunEvent | ExecutorError] = asyncio.Queue()
        self._last: dict[int, Phase] = {}
        self._waiting: dict[int, str] = {}  # the message of each run last seen pending

    def fed_by(self, task: asyncio.Task[Any]) -> None:
        """``task`` follows the runtime for this stream; its end (unless cancelled) breaks it."""
        task.add_done_callback(self._feeder_done)

    def _feeder_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        why = f"failed: {error!r}" if error is not None else "returned"
        self._queue.put_nowait(
            ExecutorError(f"{task.get_name()}, which follows the runtime, {why}")
        )

    def publish(self, event: RunEvent) -> bool:
        """Queue ``event`` if it advances its run; returns whether it was queued."""
        run_id, last = event.run_id, self._last.get(event.run_id)
        if event.phase is Phase.PENDING:
            if last not in (None, Phase.PENDING) or self._waiting.get(run_id) == event.message:
                return False
            self._waiting[run_id] = event.message
        elif last is not None and _ORDER[event.phase] <= _ORDER[last]:
            return False
        else:
            self._waiting.pop(run_id, None)
        self._last[run_id] = event.phase
        self._queue.put_nowait(event)
        return True

    def publish_end(self, event: RunEvent, *, ran: bool) -> bool:
        """Queue a run's terminal ``event``; returns whether it was queued.

        A run that ran (``ran``), however briefly, while only ``starting`` was published
        gets ``running`` first, so that each run's events keep their order.
        """
        if ran and self._last.get(event.run_id) is Phase.STARTING:
            self.publish(RunEvent.now(event.run_id, Phase.RUNNING))
        return self.publish(event)

    def fail(self, run_id: int, reason: Reason, message: str) -> bool:
        """Queue ``failed`` for ``run_id`` with ``reason`` and ``message``."""
        return self.publish(RunEvent.now(run_id, Phase.FAILED, reason, message=message))

    def phase_of(self, run_id: int) -> Phase | None:
        """The last phase published for ``run_id`` (``None`` if none or forgotten)."""
        return self._last.get(run_id)

    def forget(self, run_id: int) -> None:
        self._last.pop(run_id, None)
        self._waiting.pop(run_id, None)

    def __aiter__(self) -> AsyncIterator[RunEvent]:
        return self._drain()

    async def _drain(self) -> AsyncIterator[RunEvent]:
        while True:
            item = await self._queue.get()
            if isinstance(item, ExecutorError):
                raise item
            yield item
