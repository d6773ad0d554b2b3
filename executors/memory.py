"""What an executor remembers about runs besides the runtime's own state.

The runtime (podman's containers, apptainer's records on disk) is the truth about a run,
level-triggered; but two things happen around it that the runtime cannot tell:

* a run is being started right now, by this process: a second ``start()`` of the same run
  must not start it again, and should return when the first is done, with its outcome
  (:class:`StartsInFlight`); a ``kill()`` that finds no runtime object yet must know that
  one is coming;
* a run was cleaned up: a late notification about it (podman's ``died`` after ``remove``,
  a re-list racing the removal, a process exit) must not publish it again
  (:class:`GoneRuns`, bounded so that a long-lived node does not grow without end).

Both executors that keep this memory themselves (podman, apptainer) use these; Kubernetes
keeps its own in its run tracker.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable

#: How many removed runs are remembered; far more than are removed between a run's removal
#: and the last late event about it.
GONE_MEMORY = 4096


class GoneRuns:
    """The ids of runs removed lately, the oldest forgotten past ``capacity``."""

    def __init__(self, capacity: int = GONE_MEMORY) -> None:
        self._capacity = capacity
        self._ids: collections.OrderedDict[int, None] = collections.OrderedDict()

    def add(self, run_id: int) -> int | None:
        """Remember ``run_id``; returns the id forgotten to make room for it, if any."""
        self._ids[run_id] = None
        forgotten = None
        while len(self._ids) > self._capacity:
            forgotten, _ = self._ids.popitem(last=False)
        return forgotten

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._ids


class StartsInFlight:
    """The runs whose ``start()`` is under way here; one start per run at a time."""

    def __init__(self) -> None:
        self._done: dict[int, asyncio.Event] = {}

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._done

    async def run(self, run_id: int, start: Callable[[], Awaitable[None]]) -> None:
        """Await ``start()``, or, if a start of ``run_id`` is already under way, its end.

        The waiting caller returns when the first start has ended, however it ended: its
        outcome (events published, or an error raised to the first caller) is this one's.
        """
        in_flight = self._done.get(run_id)
        if in_flight is not None:
            await in_flight.wait()
            return
        done = self._done[run_id] = asyncio.Event()
        try:
            await start()
        finally:
            del self._done[run_id]
            done.set()
