"""What the node remembers about runs while they are in flight — all of it rebuildable.

Nothing here is the truth about a run: that lives on the server and in the runtime's own
objects (labels, annotations), and :mod:`node.lifecycle.reconcile` rebuilds this memory
from them after a restart. What it holds is what the node needs between two events:

* one :class:`RunInFlight` per run taken, from the server's event to its upload: its trace
  span, whether it holds a slot, whether a kill was asked for, its container token, and
  why it waits while a queue of the runtime holds it (Kueue: :meth:`InFlight.observe`);
* the slots (``max_concurrent_runs``, FIFO: runs wait in order, many start at once), one
  set for runs of top-level tasks and one for runs of subtasks: a central run waits for
  its subtasks while it holds its slot, so with one set for both, as many central runs as
  there are slots would leave their subtasks waiting for ever (the chaos campaign found
  exactly that);
* the ids of runs finished lately (:class:`executors.memory.GoneRuns`, bounded), so a late
  or repeated terminal event — a relist after a reconnect, reconcile racing the executor's
  own replay, a listing made just before the result was PATCHed — is not uploaded twice;
* the proxy's run table: a run's token is registered before its container starts, refused
  (403) from its terminal event on, and forgotten (401) when its id is evicted here.

A run leaves the memory in one of two ways, each its own function: :meth:`InFlight.finished`
(the server has its final status) or :meth:`InFlight.retry_later` (the server still has it
open; the next ``sync`` or restart picks it up again).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Link, Span, Status, StatusCode

from executors.memory import GoneRuns
from executors.spec import Phase, Resources, RunEvent
from node.lifecycle.spec import LifecycleConfig
from node.metrics import NodeMetrics, Occupancy
from node.server.models import Run, RunStatus
from node.telemetry import TaskOrigins, context_from
from proxy import RunInfo, RunTable

#: How many finished run ids the lifecycle remembers to ignore repeated terminal events.
FINISHED_MEMORY = 10_000
#: How many ended runs the operator's ``fednode runs`` still lists after they leave.
RECENT_MEMORY = 100


@dataclass
class RunInFlight:
    """What the node remembers about one run while it is in flight (rebuildable)."""

    run_id: int
    task_id: int
    image: str
    init_org_id: int | None
    parent_id: int | None
    span: Span
    holds_slot: bool = False
    killed: bool = False
    finishing: bool = False
    execute_span: Span | None = None
    token: str | None = None
    #: What the run was given (its resource profile's name, or None for the defaults).
    resources: Resources | None = None
    profile: str | None = None
    #: The executor it went to, with several (``executors:``); None with one.
    executor: str | None = None
    #: The server already holds the run's final status (its result uploaded before the
    #: node died, or killed by its user): its end is not uploaded again, only cleaned up.
    ended_on_server: bool = False
    #: Why the runtime holds the run before starting it (e.g. waiting for Kueue's
    #: admission under quota); ``None`` once it is admitted, or if it never waited.
    waiting: str | None = None
    #: For the operator (``fednode runs``): when the node took the run, and the last phase
    #: its executor reported (``received`` until the first event).
    received_at: float = field(default_factory=time.time)
    phase: str = "received"

    def overview(self, *, now: float, status: str | None = None) -> dict[str, Any]:
        """One line of ``fednode runs``: ids, image, phase or final status, age."""
        return {
            "run_id": self.run_id,
            "task_id": self.task_id,
            "image": self.image,
            "status": status or self.phase,
            "age_seconds": round(now - self.received_at, 1),
            "in_flight": status is None,
        }

    #: When the server's event for a run never started before arrived (``time.time_ns()``);
    #: ``None`` for a run adopted after a restart (its start latency is not this node's).
    received_ns: int | None = None
    #: The runtime's timestamp of the container running (for the run-duration metric).
    running_at: float | None = None


class InFlight:
    """The runs in flight, the slots, the finished ids and the proxy's view of them."""

    def __init__(
        self,
        *,
        config: LifecycleConfig,
        tracer: trace.Tracer,
        proxy_runs: RunTable | None,
        metrics: NodeMetrics | None = None,
        origins: TaskOrigins | None = None,
        finished_memory: int = FINISHED_MEMORY,
    ) -> None:
        self._config = config
        self._tracer = tracer
        self._proxy_runs = proxy_runs
        self.metrics = metrics or NodeMetrics()
        self._origins = origins or TaskOrigins()
        self._slots = asyncio.Semaphore(config.max_concurrent_runs)
        self._subtask_slots = asyncio.Semaphore(config.max_concurrent_runs)
        self._waiting = {"task": 0, "subtask": 0}
        self.runs: dict[int, RunInFlight] = {}
        #: Runs that left lately, with their final status, newest last (``fednode runs``).
        self.recent: deque[tuple[RunInFlight, str]] = deque(maxlen=RECENT_MEMORY)
        self._finished = GoneRuns(finished_memory)
        # The container tokens of finished runs, forgotten by the proxy when their id is.
        self._finished_tokens: dict[int, str] = {}

    def known(self, run_id: int) -> bool:
        """Whether the run is in flight or finished lately (so not to be taken again)."""
        return run_id in self.runs or run_id in self._finished

    def is_finished(self, run_id: int) -> bool:
        return run_id in self._finished

    def followed(self) -> set[int]:
        """The runs in flight whose end has not come yet (none is being finished)."""
        return {run_id for run_id, record in self.runs.items() if not record.finishing}

    def remember(
        self,
        run: Run,
        *,
        parent: dict[str, str] | None = None,
        start_ns: int | None = None,
        fresh: bool = True,
    ) -> RunInFlight:
        """Start remembering a run; its trace starts when the server's event arrived.

        ``fresh``: the run was never started (its start latency is measured from now).
        A subtask's run is linked to the proxy span of the central run (on this node) that
        created its task, when this node saw that span (:class:`~node.telemetry.TaskOrigins`).
        """
        task = run.task
        attributes: dict[str, str | int] = {
            "fednode.run_id": run.id,
            "fednode.task_id": task.id,
            "fednode.image": task.image,
            "fednode.executor": self._config.executor_kind,
            "fednode.node": self._config.identity.name,
        }
        if task.job_id is not None:
            attributes["fednode.job_id"] = task.job_id
        if task.parent is not None:
            attributes["fednode.parent_task_id"] = task.parent.id
        origin = self._origins.origin_of(task.id)
        span = self._tracer.start_span(
            "run",
            context=context_from(parent),
            start_time=start_ns,
            attributes=attributes,
            links=[Link(origin, {"fednode.link": "created by"})] if origin is not None else None,
        )
        record = RunInFlight(
            run_id=run.id,
            task_id=task.id,
            image=task.image,
            init_org_id=task.init_org.id if task.init_org else None,
            parent_id=task.parent.id if task.parent else None,
            span=span,
            received_ns=(start_ns or time.time_ns()) if fresh else None,
        )
        self.runs[run.id] = record
        if origin is None and task.parent is not None:
            self._origins.wait_for(task.id, span)
        return record

    # -- what the runtime says before the end ------------------------------------------------

    def observe(self, event: RunEvent) -> None:
        """A run waiting in the runtime's queue (``pending``, with why), or let through: shown
        in ``fednode status`` (:meth:`waiting`) and as events on the run's span."""
        record = self.runs.get(event.run_id)
        if record is None:
            return
        if event.phase is Phase.PENDING:
            record.waiting = event.message or "waiting in the runtime's queue"
            record.span.set_attribute("fednode.waiting", record.waiting)
            record.span.add_event("waiting", {"fednode.reason": record.waiting})
        elif record.waiting is not None:
            record.waiting = None
            # admitted (starting, running), or ended while it waited (killed)
            name = "waiting.ended" if event.phase.is_terminal else "admitted"
            record.span.add_event(name, {"fednode.phase": event.phase.value})

    def waiting(self) -> dict[int, str]:
        """The runs the runtime holds before starting them, with why."""
        return {r.run_id: r.waiting for r in self.runs.values() if r.waiting is not None}

    # -- slots ------------------------------------------------------------------------------

    def _slots_of(self, record: RunInFlight) -> asyncio.Semaphore:
        """Subtasks' runs have slots of their own: their parents wait for them in theirs."""
        return self._slots if record.parent_id is None else self._subtask_slots

    def _kind(self, record: RunInFlight) -> str:
        return "task" if record.parent_id is None else "subtask"

    async def take_slot(self, record: RunInFlight) -> None:
        """Wait for a free slot, in order of asking."""
        kind = self._kind(record)
        self._waiting[kind] += 1
        try:
            await self._slots_of(record).acquire()
        finally:
            self._waiting[kind] -= 1
        record.holds_slot = True

    async def take_free_slot(self, record: RunInFlight) -> None:
        """Take a slot if one is free: an adopted run already runs, it never waits (after a
        restart the limit may be exceeded briefly)."""
        slots = self._slots_of(record)
        if not slots.locked():
            await slots.acquire()
            record.holds_slot = True

    def release_slot(self, record: RunInFlight) -> None:
        if record.holds_slot:
            record.holds_slot = False
            self._slots_of(record).release()

    def occupancy(self, *, server_reconnects: int = 0) -> Occupancy:
        """What the metrics' gauges show (read at each scrape)."""
        in_use = {"task": 0, "subtask": 0}
        for record in self.runs.values():
            if record.holds_slot:
                in_use[self._kind(record)] += 1
        return Occupancy(
            in_flight=len(self.runs),
            waiting=dict(self._waiting),
            slots_in_use=in_use,
            slots=self._config.max_concurrent_runs,
            server_reconnects=server_reconnects,
        )

    # -- the proxy --------------------------------------------------------------------------

    def admit_to_proxy(
        self, record: RunInFlight, token: str, trace_context: dict[str, str]
    ) -> None:
        """From now on the proxy accepts this run's token (until the run ends)."""
        record.token = token
        if self._proxy_runs is not None:
            me = self._config.identity
            self._proxy_runs.add(
                token,
                RunInfo(
                    run_id=record.run_id,
                    task_id=record.task_id,
                    organization_id=me.organization_id,
                    collaboration_id=me.collaboration_id,
                    trace_context=trace_context,
                ),
            )

    def withdraw_from_proxy(self, record: RunInFlight) -> None:
        """The run's container never started: the proxy forgets its token (401)."""
        if record.token is not None and self._proxy_runs is not None:
            self._proxy_runs.discard(record.token)
        record.token = None

    def refuse_at_proxy(self, record: RunInFlight) -> None:
        """The run has ended: the proxy refuses its token (403) from now on."""
        if record.token is not None and self._proxy_runs is not None:
            self._proxy_runs.finish(record.token)

    # -- leaving the memory -----------------------------------------------------------------

    def finished(
        self, record: RunInFlight, *, status: str, reason: str | None = None, count: bool = True
    ) -> None:
        """The server has the run's final ``status``: forget the run, remember its id.

        ``count=False``: the end was not this node's doing (the server had it already), so
        ``fednode_runs_total`` does not count it."""
        if count and self.runs.get(record.run_id) is record:
            self.metrics.runs.labels(status).inc()
        self._let_go(record, status=status, reason=reason)
        self.refuse_at_proxy(record)
        if record.token is not None:
            self._finished_tokens[record.run_id] = record.token
        evicted = self._finished.add(record.run_id)
        if evicted is not None:
            token = self._finished_tokens.pop(evicted, None)
            if token is not None and self._proxy_runs is not None:
                self._proxy_runs.discard(token)

    def retry_later(self, record: RunInFlight, *, why: str) -> None:
        """The server still has the run open: forget it here so the next sync takes it."""
        self._let_go(record, status=why)

    def _let_go(self, record: RunInFlight, *, status: str, reason: str | None = None) -> None:
        self.release_slot(record)
        if self.runs.get(record.run_id) is not record:
            return  # let go of before (its end raced its start)
        record.span.set_attribute("fednode.status", status)
        if reason is not None:
            record.span.set_attribute("fednode.reason", reason)
        if status != RunStatus.COMPLETED.value:
            record.span.set_status(Status(StatusCode.ERROR, status))
        record.span.end()
        self._origins.forget(record.task_id, record.span)
        self.runs.pop(record.run_id, None)
        self.recent.append((record, status))

    def overview(self) -> list[dict[str, Any]]:
        """The runs in flight, then those that left lately (newest first)."""
        now = time.time()
        flying = sorted(self.runs.values(), key=lambda r: r.received_at)
        return [r.overview(now=now) for r in flying] + [
            r.overview(now=now, status=status) for r, status in reversed(self.recent)
        ]

    def end_spans(self) -> None:
        """At shutdown: the spans of runs still in flight end with the process."""
        for record in self.runs.values():
            record.span.end()
