"""Asking the runtime again while it cannot be reached, for a bounded time.

A runtime's service may be away for a moment (podman's API service restarting); an
executor then raises :class:`~executors.base.ExecutorError`. A start is idempotent (the
runtime object is named after the run) and a collection only reads, so both are simply
asked again, with jittered exponential backoff, until ``patience`` seconds have passed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from common.backoff import Backoff
from executors.base import ExecutorError
from node.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")


async def patiently(
    call: Callable[[], Awaitable[T]],
    *,
    patience: float,
    event: str,
    final: tuple[type[ExecutorError], ...] = (),
) -> T:
    """``await call()``, again after an :class:`ExecutorError` (not one of ``final``)
    while ``patience`` lasts; the last error is raised when it runs out."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + patience
    backoff = Backoff(first=0.5, cap=10.0)
    while True:
        try:
            return await call()
        except final:
            raise
        except ExecutorError as exc:
            delay = backoff.next_delay()
            if loop.time() + delay > give_up:
                raise
            log.warning(event, error=str(exc), delay=round(delay, 2))
            await asyncio.sleep(delay)
