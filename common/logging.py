"""The one logger factory: every module of every package gets its logger here.

``log = get_logger(__name__)`` at module level, then key-value events
(``log.info("run.started", run_id=..., image=...)``). The logger is lazy: what it writes
and where is decided when the process configures logging (``node.logging``), also for
loggers made before that.
"""

from __future__ import annotations

from typing import Any

import structlog


def get_logger(name: str, **initial: Any) -> structlog.stdlib.BoundLogger:
    """A logger named after its module, optionally with keys bound from the start."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger.bind(**initial) if initial else logger
