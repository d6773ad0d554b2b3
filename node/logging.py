"""Structured logging for the whole process, configured once at start-up.

Every log line is an event with keys (``log.info("run.started", run_id=..., image=...)``).
Output is JSON lines when stdout is not a terminal (production, containers, CI) and a
readable, coloured console when it is. The standard library's loggers — aiohttp,
python-socketio, kubernetes_asyncio — are routed through the same processors, so their
lines come out in the same format with the same context.

Loggers come from the one factory, :func:`common.logging.get_logger` (re-exported here),
which ``executors/`` and ``proxy/`` use too.

Context such as ``run_id``/``task_id`` is bound per task with :func:`bind_run`, using
structlog's contextvars so concurrent runs never mix their keys. Every line written while a
span is current carries its ``trace_id``/``span_id`` (:func:`node.telemetry.add_trace_ids`);
:func:`bind_run` makes the run's span current, so a run's lines lead to its trace.

:func:`direct_logger` is for the one hot path that logs on every request (the proxy's
access log): the same processors, level and output, without the standard library's
records, handler and formatter in between (about a tenth of the proxy's CPU per request).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import structlog
from opentelemetry import trace

from common.logging import get_logger
from node.redaction import redact_event
from node.telemetry import add_trace_ids

__all__ = ["bind_run", "configure_logging", "direct_logger", "get_logger"]

Format = Literal["auto", "json", "console"]


@dataclass(frozen=True)
class _Output:
    stream: TextIO
    level: int
    processors: tuple[structlog.types.Processor, ...]


#: Where and how :func:`configure_logging` last said to log (for :func:`direct_logger`).
_output: _Output | None = None


def configure_logging(
    *, level: str = "INFO", fmt: Format = "auto", stream: TextIO | None = None
) -> None:
    """Set up structlog and the stdlib root logger to write to ``stream`` (stdout)."""
    global _output
    stream = stream if stream is not None else sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        redact_event,  # no value of a secret-named key, no password in a URI
    ]
    renderer: structlog.types.Processor
    if use_json:
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), redact_event],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries that are chatty about every request or packet, and warn about the close
    # packet of a disconnect we asked for ourselves; fednode logs connection changes itself.
    quiet = logging.DEBUG if level == "DEBUG" else logging.ERROR
    for noisy in ("aiohttp.access", "engineio.client", "socketio.client"):
        logging.getLogger(noisy).setLevel(quiet)

    _output = _Output(
        stream=stream,
        level=logging.getLevelName(level) if isinstance(level, str) else int(level),
        # The logger's name is bound by direct_logger (it has no stdlib logger to ask).
        processors=(*(p for p in shared if p is not structlog.stdlib.add_logger_name), renderer),
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def direct_logger(name: str) -> Any:
    """A logger for a hot path: same lines as :func:`get_logger`'s, written directly.

    Before :func:`configure_logging` it is an ordinary :func:`get_logger` logger.
    """
    output = _output
    if output is None:
        return get_logger(name)
    return structlog.wrap_logger(
        structlog.WriteLogger(output.stream),
        processors=list(output.processors),
        wrapper_class=structlog.make_filtering_bound_logger(output.level),
        cache_logger_on_first_use=True,
    ).bind(logger=name)


@contextmanager
def bind_run(
    *, run_id: int | str, task_id: int | str | None = None, span: trace.Span | None = None
) -> Iterator[None]:
    """Within the block (and tasks started from it) every log line carries the run's ids;
    with ``span`` (the run's), that span is current: lines carry its trace and span ids,
    and spans started in the block without a parent are its children."""
    keys: dict[str, Any] = {"run_id": run_id}
    if task_id is not None:
        keys["task_id"] = task_id
    with structlog.contextvars.bound_contextvars(**keys):
        if span is None:
            yield
        else:
            with trace.use_span(span, end_on_exit=False):
                yield
