"""Ownership of background work: every asyncio task the node starts has an owner.

The node's per-run work (admit, start, finish) is spawned on a :class:`TaskOwner`, so
that one run's failure never takes down the node or another run, and shutdown drains,
then cancels, what is left. The executors need the same machinery and may not import
``node/``, so that implementation lives in :mod:`executors.tasks` (``node/`` may import
``executors/``); this module is the node's name for it.

The node's *services* are different: the socket link, the consumers of server and
executor events, the token refresher. Each must run as long as the node does; a node
whose service has died still answers its health probe but no longer does its job. So
they are :class:`RootTasks` (as kopf calls them): the first one to end while the node is
not stopping — with an error, or by returning — is the node's failure. It is logged
(``node.root_task_died``), the node stops being ready, shuts down as cleanly as on
SIGTERM and exits non-zero (``fednode start``: exit code 3), so that systemd or
Kubernetes restarts it and it reconciles its runs from scratch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from executors.tasks import TaskOwner
from node.logging import get_logger

__all__ = ["RootTaskDied", "RootTasks", "TaskOwner"]

log = get_logger(__name__)

_T = TypeVar("_T")


class RootTaskDied(Exception):
    """A service of the node ended while the node was serving: the node must exit."""

    def __init__(self, name: str, error: BaseException | None) -> None:
        why = "returned" if error is None else f"failed: {error!r}"
        super().__init__(f"root task {name!r} {why}")
        self.name = name
        self.error = error


class RootTasks:
    """The node's services; :attr:`died` is set when the first of them ends unasked."""

    def __init__(self) -> None:
        self._owner = TaskOwner("node")
        self._watched: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self.failure: RootTaskDied | None = None
        self.died = asyncio.Event()

    def spawn(self, coro: Coroutine[Any, Any, _T], *, name: str) -> asyncio.Task[_T]:
        """Run ``coro`` as a root task, owned (and cancelled at :meth:`close`) here."""
        task = self._owner.spawn(coro, name=name)
        task.add_done_callback(self._ended)
        return task

    def watch(self, task: asyncio.Task[Any]) -> None:
        """Treat ``task``, owned elsewhere (the server client's refresher), as a root task."""
        self._watched.add(task)
        task.add_done_callback(self._ended)

    async def wait(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set or a root task died, whichever comes first."""
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.died.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._watched.discard(task)
        if self._stopping or self.failure is not None:
            return
        error: BaseException | None = (
            asyncio.CancelledError("cancelled by someone other than the node")
            if task.cancelled()
            else task.exception()
        )
        self.failure = RootTaskDied(task.get_name(), error)
        log.error(
            "node.root_task_died",
            task=task.get_name(),
            error=repr(error) if error is not None else "returned",
            hint="the node stops and exits non-zero, to be restarted",
        )
        self.died.set()

    def shutting_down(self) -> None:
        """From now on a root task that ends is part of the shutdown, not a failure (the
        lifecycle closing under the event consumers, the server client its refresher)."""
        self._stopping = True

    async def close(self) -> None:
        """Cancel the root tasks spawned here (shutdown: their ends are not failures)."""
        self._stopping = True
        await self._owner.close()
