"""Ownership of background work: every asyncio task the node starts has an owner.

The node's per-run work (admit, start, finish) and its services (socket link, event
consumers) are spawned on a :class:`TaskOwner`, so that one run's failure never takes down
the node or another run, and shutdown drains, then cancels, what is left. The executors
need the same machinery and may not import ``node/``, so the one implementation lives in
:mod:`executors.tasks` (``node/`` may import ``executors/``: DESIGN.md); this module is
the node's name for it.
"""

from __future__ import annotations

from executors.tasks import TaskOwner

__all__ = ["TaskOwner"]
