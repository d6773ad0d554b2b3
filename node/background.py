"""Ownership of background work: every asyncio task the node starts has an owner.

:class:`TaskOwner` keeps a strong reference to each task it spawns (so none is garbage
collected mid-flight), logs a task that fails instead of letting the error vanish, and on
:meth:`TaskOwner.close` first lets running work finish for a grace period, then cancels
what is left and waits for it. Per-run work (admit, start, finish) is spawned here so that
one run's failure never takes down the node or another run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from node.logging import get_logger

log = get_logger(__name__)


class TaskOwner:
    """A set of owned tasks, drained and cancelled cleanly on close."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        if self._closing:
            coro.close()
            raise RuntimeError(f"{self.name} is closing; not starting {name}")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error(
                "task.failed",
                owner=self.name,
                task=task.get_name(),
                error=repr(error),
                exc_info=error,
            )

    async def close(self, *, grace: float = 0.0) -> None:
        """Wait up to ``grace`` seconds for running tasks, then cancel the rest."""
        self._closing = True
        if self._tasks and grace > 0:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
