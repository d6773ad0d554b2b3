"""The one backoff for every reconnect and retry loop (server link, socket, watch streams).

A loop that lost its peer waits before the next try, longer after each failure, up to a
cap, and starts short again after a success. The wait is *equal-jittered*: half of the
exponential step is fixed, the other half random. The fixed half guarantees a growing
pause (a peer that is going down is not hammered); the random half spreads the retries of
many nodes (or many watch streams of one node) that lost the same peer at the same time.
"""

from __future__ import annotations

import asyncio
import random


class Backoff:
    """Delays ``uniform(step / 2, step)`` with ``step = min(cap, first * 2**failures)``."""

    def __init__(self, *, first: float, cap: float) -> None:
        if first <= 0 or cap < first:
            raise ValueError(f"Backoff: need 0 < first <= cap, got first={first}, cap={cap}")
        self.first, self.cap = first, cap
        self.failures = 0

    def next_delay(self) -> float:
        """The pause before the next try; counts one more failure."""
        step = min(self.cap, self.first * 2.0**self.failures)
        self.failures += 1
        return step / 2 + random.uniform(0, step / 2)

    async def pause(self) -> float:
        """Sleep :meth:`next_delay` seconds; returns how long."""
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay

    def reset(self) -> None:
        """A try succeeded: the next failure waits the shortest pause again."""
        self.failures = 0
