"""Ownership of background work: every asyncio task fednode starts has an owner.

The executors and the node both start background tasks (an executor's event watcher, the
settling of a run that ended, an image pull; the node's per-run work). A bare
``asyncio.create_task`` can be garbage-collected mid-flight, loses its error unless
someone awaits it, and outlives a shutdown. :class:`TaskOwner` is the one answer to that:
it keeps a strong reference to each task it spawns, logs a task that fails instead of
letting the error vanish, and on :meth:`TaskOwner.close` first lets running work finish for
a grace period, then cancels what is left and waits for it. A closing owner spawns nothing.

:class:`SharedWork` sits on top: work that many callers may ask for at once (pulling one
image for several starts) runs as one owned task per key, which every caller awaits.

It lives here, at the bottom of the layering, because executors may not import ``node/``
while ``node/`` may import ``executors/`` (DESIGN.md); :mod:`node.background` uses it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from common.logging import get_logger

log = get_logger(__name__)

_T = TypeVar("_T")
_K = TypeVar("_K", bound=Hashable)


class TaskOwner:
    """A set of owned tasks, drained and cancelled cleanly on close.

    ``expected`` names the errors a task may end with in the normal course of things (the
    runtime went away for a moment): they are logged as a warning with their message. Any
    other error is logged as an error with its traceback.
    """

    def __init__(self, name: str, *, expected: tuple[type[BaseException], ...] = ()) -> None:
        self.name = name
        self._expected = expected
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    def spawn(self, coro: Coroutine[Any, Any, _T], *, name: str) -> asyncio.Task[_T]:
        """Run ``coro`` as a task of this owner; refused (``RuntimeError``) once closing."""
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
        if error is None:
            return
        if isinstance(error, self._expected):
            log.warning("task.failed", owner=self.name, task=task.get_name(), error=str(error))
            return
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


class SharedWork(Generic[_K, _T]):
    """At most one task per key at a time; whoever asks while it runs awaits that task.

    Each caller awaits it shielded: a caller that is cancelled (its run was killed) stops
    waiting, and the work goes on for the others. The tasks belong to ``owner``, so closing
    the owner cancels them. A key is free again as soon as its task has ended, so the next
    request after a finished one starts afresh (a failed pull is retried by the next run).
    """

    def __init__(self, owner: TaskOwner) -> None:
        self._owner = owner
        self._running: dict[_K, asyncio.Task[_T]] = {}

    async def run(self, key: _K, work: Callable[[], Coroutine[Any, Any, _T]], *, name: str) -> _T:
        """The result of ``work()`` for ``key``: started now, or the one already running."""
        task = self._running.get(key)
        if task is None:
            task = self._owner.spawn(work(), name=name)
            self._running[key] = task
            task.add_done_callback(lambda _: self._running.pop(key, None))
        return await asyncio.shield(task)
