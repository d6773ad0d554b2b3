"""The façade: one :class:`RunLifecycle` per node wires the parts and consumes two streams.

It never polls. It consumes:

* server events from the socket link — ``sync`` (catch up: every open run of this node is
  claimed or started), ``new_task`` (this node's open runs of that task), and
  ``kill_containers`` (kill exactly the listed runs of this organization);
* run events from the executor (running, succeeded, failed, killed), handed to
  :class:`~node.lifecycle.finish.Finisher`.

Each run the server lists open and this process does not know yet is remembered
(:class:`~node.lifecycle.inflight.InFlight`) and handed on in its own owned task: to
:class:`~node.lifecycle.start.Starter` if it never started, to
:meth:`~node.lifecycle.reconcile.Reconciler.adopt` if the server says it did. A failure in
one run is logged and reported as that run's status, never a crash of the node.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace

from executors.base import Executor, ExecutorError
from node.background import TaskOwner
from node.crypto import Cryptor
from node.lifecycle.finish import Finisher
from node.lifecycle.inflight import InFlight
from node.lifecycle.reconcile import Reconciler
from node.lifecycle.server import RUNTIME_PATIENCE_SECONDS, RunServer, StatusNotifier
from node.lifecycle.spec import LifecycleConfig, describe_resources
from node.lifecycle.start import Starter
from node.logging import get_logger
from node.metrics import NodeMetrics, Occupancy
from node.proxy_link import OrganizationKeys
from node.server.models import KillContainers, NewTask, Run
from node.server.rest import ServerClient
from node.server.socket import Received, Sync
from node.telemetry import TaskOrigins
from node.token_seal import TokenSeal
from policies.admission import Admission
from proxy import RunTable

log = get_logger(__name__)


class RunLifecycle:
    """Drives runs from server events and executor events; see the module docstring."""

    def __init__(
        self,
        *,
        server: ServerClient,
        notifier: StatusNotifier,
        executor: Executor,
        admission: Admission,
        cryptor: Cryptor,
        config: LifecycleConfig,
        tracer: trace.Tracer,
        keys: OrganizationKeys,
        token_seal: TokenSeal,
        proxy_runs: RunTable | None = None,
        metrics: NodeMetrics | None = None,
        task_origins: TaskOrigins | None = None,
        upload_backoff: float = 1.0,
        runtime_patience: float = RUNTIME_PATIENCE_SECONDS,
    ) -> None:
        """``metrics``: where the runs are counted and timed (default: a registry of its own);
        ``task_origins``: the spans that created tasks, as the proxy reported them."""
        self._config = config
        self._cryptor = cryptor
        self._executor = executor
        self._work = TaskOwner("runs")
        self._accepting = True
        self._server = RunServer(
            server=server,
            notifier=notifier,
            identity=config.identity,
            upload_backoff=upload_backoff,
        )
        self._metrics = metrics or NodeMetrics()
        self._inflight = InFlight(
            config=config,
            tracer=tracer,
            proxy_runs=proxy_runs,
            metrics=self._metrics,
            origins=task_origins,
        )
        self._finisher = Finisher(
            server=self._server,
            executor=executor,
            inflight=self._inflight,
            cryptor=cryptor,
            keys=keys,
            tracer=tracer,
            work=self._work,
            runtime_patience=runtime_patience,
            share_algorithm_logs=config.share_algorithm_logs,
        )
        self._starter = Starter(
            server=self._server,
            executor=executor,
            admission=admission,
            cryptor=cryptor,
            token_seal=token_seal,
            inflight=self._inflight,
            finisher=self._finisher,
            config=config,
            tracer=tracer,
            runtime_patience=runtime_patience,
        )
        self._reconciler = Reconciler(
            executor=executor,
            server=self._server,
            inflight=self._inflight,
            finisher=self._finisher,
            starter=self._starter,
            token_seal=token_seal,
            config=config,
            work=self._work,
        )

    # -- the two streams ----------------------------------------------------------------

    async def consume_server_events(self, events: asyncio.Queue[Received]) -> None:
        """Dispatch server events; each is handled in its own owned task. Once the node is
        stopping, an event is left to the next start's ``sync`` (the server keeps the run
        open), and the stream ends: a Kubernetes node pod that is deleted or upgraded still
        hears ``new_task`` while it stops."""
        lag = self._metrics.server_lag
        while True:
            event, at_ns = await events.get()
            if not self._accepting:
                log.info("server.events_left_to_next_start", kind=type(event).__name__)
                return
            lag.observe(max(0.0, (time.time_ns() - at_ns) / 1e9))
            if isinstance(event, Sync):
                self._work.spawn(self.sync(received_ns=at_ns), name="sync")
            elif isinstance(event, NewTask):
                self._work.spawn(
                    self.fetch_task(event.id, received_ns=at_ns), name=f"new-task-{event.id}"
                )
            elif isinstance(event, KillContainers):
                self._work.spawn(self.kill(event), name="kill")

    async def consume_executor_events(self) -> None:
        async for event in self._executor.events():
            self._inflight.observe(event)
            self._finisher.on_run_event(event)

    # -- server events ------------------------------------------------------------------

    async def reconcile(self) -> None:
        """At start-up, before the first sync: claim what the executor already has."""
        await self._reconciler.reconcile()

    async def sync(self, *, received_ns: int | None = None) -> None:
        """Catch up with the server: every open run of this node is claimed or started, and
        every run followed here that the server has ended meanwhile is stopped."""
        followed = self._inflight.followed()  # before the listing, so each was in flight then
        runs = await self._server.open_runs()
        log.info("runs.sync", open_runs=len(runs), in_flight=self.in_flight)
        if self._config.share_config:
            await self._server.emit_node_info(self._node_info())
        self._take(runs, received_ns=received_ns)
        # A run followed here that the server no longer lists open was ended there while
        # this node was not listening (its user's kill sent while the socket was away).
        for run_id in sorted(followed - {run.id for run in runs}):
            self._work.spawn(self._reconciler.recheck(run_id), name=f"recheck-run-{run_id}")

    async def fetch_task(self, task_id: int, *, received_ns: int | None = None) -> None:
        """A ``new_task`` event: this node's open runs of that task, if any."""
        self._take(await self._server.open_runs(task_id=task_id), received_ns=received_ns)

    def _take(self, runs: Sequence[Run], *, received_ns: int | None = None) -> None:
        for run in runs:
            # A run finished here may still be listed open by a listing made just before
            # its result was PATCHed; it is done, not lost.
            if self._inflight.known(run.id) or not self._accepting:
                continue
            record = self._inflight.remember(
                run, start_ns=received_ns, fresh=run.started_at is None
            )
            if run.started_at is not None:
                # Started before (by us, before a restart or a failed upload).
                self._work.spawn(self._reconciler.adopt(run, record), name=f"adopt-run-{run.id}")
            else:
                self._work.spawn(self._starter.start(run, record), name=f"start-run-{run.id}")

    async def kill(self, event: KillContainers) -> None:
        """Kill exactly the listed runs of this node's organization."""
        me = self._config.identity
        if event.collaboration_id != me.collaboration_id:
            return
        if event.node_id is not None and event.node_id != me.id:
            return
        if event.kill_list is None:
            targets = list(self._inflight.runs)
        else:
            targets = [t.run_id for t in event.kill_list if t.organization_id == me.organization_id]
        for run_id in targets:
            record = self._inflight.runs.get(run_id)
            if record is not None:
                record.killed = True  # a run still waiting for a slot never starts
            log.info("run.kill_requested", run_id=run_id)
            try:
                await self._executor.kill(run_id)
            except ExecutorError as exc:
                log.warning("run.kill_failed", run_id=run_id, error=str(exc))

    # -- the operator's view (fednode runs / logs / kill) -------------------------------------

    def overview(self) -> list[dict[str, Any]]:
        """This node's runs in flight and those that ended lately, for ``fednode runs``."""
        return self._inflight.overview()

    async def kill_run(self, run_id: int) -> bool:
        """Kill one run of this node at the operator's request; ``False`` if it is not in
        flight here. It ends ``killed`` and the server is told so, as for a user's kill."""
        record = self._inflight.runs.get(run_id)
        if record is None:
            return False
        record.killed = True  # a run still waiting for a slot never starts
        log.info("run.kill_requested", run_id=run_id, by="operator")
        await self._executor.kill(run_id)
        return True

    async def log_of(self, run_id: int) -> str:
        """The run's container log as the runtime has it now (bounded like an upload's);
        :class:`~executors.base.UnknownRun` when the runtime has no such run."""
        return (await self._executor.collect(run_id)).log

    # -- shutdown -------------------------------------------------------------------------

    async def close(self, *, grace: float = 5.0) -> None:
        """Stop taking runs; let in-flight uploads finish for ``grace`` seconds."""
        self._accepting = False
        await self._work.close(grace=grace)
        self._inflight.end_spans()

    # -- what the node tells ----------------------------------------------------------------

    def _node_info(self) -> dict[str, Any]:
        """What the 4.x node shares with ``share_config`` on: policies, database labels."""
        config = self._config
        info: dict[str, Any] = {
            "encryption": self._cryptor.encrypted,
            "allowed_algorithms": list(config.allowed_algorithms) or "all",
            "database_labels": [db.label for db in config.databases],
            "database_types": {f"db_type_{db.label}": db.type for db in config.databases},
        }
        if config.allowed_users:
            info["allowed_users"] = list(config.allowed_users)
        if config.allowed_organizations:
            info["allowed_orgs"] = list(config.allowed_organizations)
        return info

    @property
    def in_flight(self) -> int:
        return len(self._inflight.runs)

    def occupancy(self, *, server_reconnects: int = 0) -> Occupancy:
        """Runs in flight, waiting and holding slots: what the metrics' gauges show."""
        return self._inflight.occupancy(server_reconnects=server_reconnects)

    def waiting(self) -> dict[int, str]:
        """Runs the runtime holds in its queue (Kueue), with why they wait."""
        return self._inflight.waiting()

    def resources_in_use(self) -> dict[str, str]:
        """What each run in flight was given, by run id (for ``fednode status``)."""
        return {
            str(record.run_id): (f"[{record.executor}] " if record.executor else "")
            + describe_resources(record.resources, profile=record.profile)
            for record in self._inflight.runs.values()
            if record.resources is not None
        }
