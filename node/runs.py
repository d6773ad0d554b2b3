"""The run lifecycle: from the server's run to a started container, and back to a result.

One :class:`RunLifecycle` per node. It consumes two streams and never polls:

* server events (``sync``, ``new_task``, ``kill_containers``) from the socket link;
* run events (running, succeeded, failed, killed) from the executor.

For a run the server assigns to this node it goes: admit (policies) → decrypt the input →
wait for a slot (``max_concurrent_runs``, FIFO, so runs wait in order and many start at
once) → ``started_at`` → container token → ``executor.start`` → status ``active``. On the
run's terminal event: collect output and log → encrypt the result for the initiating
organization → PATCH result, log, status, ``finished_at`` → cleanup.

Level-triggered: what is true lives in the executor's objects (labelled with run and task
ids) and on the server, not in memory. At start-up :meth:`RunLifecycle.reconcile` claims
every run the executor already has, so none is started twice; terminal runs found there
are uploaded (a repeat upload of a finished run is refused by the server and treated as
done); and on every ``sync`` the server's open runs are compared with what is claimed. A run
the server thinks started but that no runtime object backs (lost while the node was down)
is failed with a clear log rather than silently started a second time. A run still going is
admitted to the proxy again with its token, from the sealed copy the executor kept with it
(:mod:`node.token_seal`; on Kubernetes the node may not read the token's Secret) or else
from the run's token file.

Each run's work is a task owned by a :class:`~node.background.TaskOwner`; a failure in one
run is logged and reported as that run's status, never a crash of the node.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from pydantic import SecretStr, ValidationError

from executors.base import Executor, ExecutorError
from executors.runfiles import RunFiles
from executors.spec import (
    DatabaseMount,
    Phase,
    ProxyEndpoint,
    Reason,
    Resources,
    RunEvent,
    RunSpec,
    RunState,
)
from node.background import TaskOwner
from node.contract import container_environment
from node.crypto import CryptoError, Cryptor
from node.logging import bind_run, get_logger
from node.proxy_link import OrganizationKeys
from node.server.models import (
    KillContainers,
    NewTask,
    NodeIdentity,
    Run,
    RunStatus,
)
from node.server.rest import ServerClient, ServerError
from node.server.socket import Received, Sync
from node.telemetry import carrier_of, context_from
from node.token_seal import SealError, TokenSeal
from policies.admission import Admission, Admitted
from proxy import RunInfo, RunTable

log = get_logger(__name__)

#: How each terminal reason is reported to the server (vantage6 4.x run statuses).
STATUS_OF_REASON: dict[Reason, RunStatus] = {
    Reason.COMPLETED: RunStatus.COMPLETED,
    Reason.CRASHED: RunStatus.CRASHED,
    Reason.IMAGE_NOT_FOUND: RunStatus.NO_DOCKER_IMAGE,
    Reason.OOM_KILLED: RunStatus.CRASHED,
    Reason.DEADLINE_EXCEEDED: RunStatus.FAILED,
    Reason.KILLED: RunStatus.KILLED,
    Reason.START_FAILED: RunStatus.START_FAILED,
    Reason.NOT_ALLOWED: RunStatus.NOT_ALLOWED,
    Reason.LOST: RunStatus.UNKNOWN_ERROR,
}

#: A line the node adds to the run's log, saying in words why the run ended.
EXPLANATION: dict[Reason, str] = {
    Reason.CRASHED: "the algorithm exited with a non-zero exit code",
    Reason.IMAGE_NOT_FOUND: "the image does not exist or could not be pulled",
    Reason.OOM_KILLED: "the algorithm ran out of memory and was killed",
    Reason.DEADLINE_EXCEEDED: "the run exceeded its deadline and was stopped",
    Reason.KILLED: "the run was killed on request",
    Reason.START_FAILED: "the runtime could not start the container",
    Reason.NOT_ALLOWED: "the run was refused by this node's policies",
    Reason.LOST: "the run's container disappeared",
}


#: How many finished run ids the lifecycle remembers to ignore repeated terminal events.
FINISHED_MEMORY = 10_000


class StatusNotifier(Protocol):
    """Tells the collaboration about status changes (the socket link's ``emit``)."""

    async def emit(self, event: str, data: dict[str, Any]) -> None: ...


@dataclass
class _RunInFlight:
    """What the node remembers about a run while it is in flight (rebuildable)."""

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
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LifecycleConfig:
    """The node-level facts the lifecycle needs, fixed at start-up."""

    identity: NodeIdentity
    databases: tuple[DatabaseMount, ...]
    proxy: ProxyEndpoint | None
    max_concurrent_runs: int
    deadline_seconds: int
    executor_kind: str
    task_dir: Path
    allowed_algorithms: tuple[str, ...] = ()


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
    ) -> None:
        self._server = server
        self._notifier = notifier
        self._executor = executor
        self._admission = admission
        self._cryptor = cryptor
        self._config = config
        self._tracer = tracer
        self._slots = asyncio.Semaphore(config.max_concurrent_runs)
        self._runs: dict[int, _RunInFlight] = {}
        self._work = TaskOwner("runs")
        self._keys = keys
        self._token_seal = token_seal
        self._proxy_runs = proxy_runs
        self._accepting = True
        # Runs finished by this process, so a late or repeated terminal event (a relist
        # after a reconnect, reconcile racing the executor's own replay) is not uploaded
        # again. Bounded: the oldest ids are dropped first.
        # The value is the run's container token, forgotten by the proxy on eviction.
        self._finished: dict[int, str | None] = {}

    # -- the two streams ----------------------------------------------------------------

    async def consume_server_events(self, events: asyncio.Queue[Received]) -> None:
        """Dispatch server events; each is handled in its own owned task."""
        while True:
            event, at_ns = await events.get()
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
            self._on_run_event(event)

    # -- server side ----------------------------------------------------------------------

    async def sync(self, *, received_ns: int | None = None) -> None:
        """Catch up with the server: every open run of this node is claimed or started."""
        runs = await self._open_runs()
        log.info("runs.sync", open_runs=len(runs), in_flight=len(self._runs))
        await self._notifier.emit("node_info_update", self._node_info())
        self._take(runs, received_ns=received_ns)

    async def fetch_task(self, task_id: int, *, received_ns: int | None = None) -> None:
        """A ``new_task`` event: this node's open runs of that task, if any."""
        self._take(await self._open_runs(task_id=task_id), received_ns=received_ns)

    async def _open_runs(self, *, task_id: int | None = None) -> list[Run]:
        params: dict[str, str | int] = {
            "state": "open",
            "node_id": self._config.identity.id,
            "include": "task",
        }
        if task_id is not None:
            params["task_id"] = task_id
        runs = []
        for item in await self._server.list_pages("run", params=params):
            try:
                runs.append(Run.model_validate(item))
            except ValidationError as exc:
                log.error("runs.bad_run_payload", error=str(exc), run_id=item.get("id"))
        return runs

    def _take(self, runs: Sequence[Run], *, received_ns: int | None = None) -> None:
        for run in runs:
            # A run finished here may still be listed open by a listing made just before
            # its result was PATCHed; it is done, not lost.
            if run.id in self._runs or run.id in self._finished or not self._accepting:
                continue
            self._runs[run.id] = self._remember(run, start_ns=received_ns)
            self._work.spawn(self._admit_and_start(run), name=f"start-run-{run.id}")

    def _remember(
        self, run: Run, *, parent: dict[str, str] | None = None, start_ns: int | None = None
    ) -> _RunInFlight:
        """Start remembering a run; its trace starts when the server's event arrived."""
        task = run.task
        span = self._tracer.start_span(
            "run",
            context=context_from(parent),
            start_time=start_ns,
            attributes={
                "fednode.run_id": run.id,
                "fednode.task_id": task.id,
                "fednode.image": task.image,
                "fednode.executor": self._config.executor_kind,
                "fednode.node": self._config.identity.name,
            },
        )
        return _RunInFlight(
            run_id=run.id,
            task_id=task.id,
            image=task.image,
            init_org_id=task.init_org.id if task.init_org else None,
            parent_id=task.parent.id if task.parent else None,
            span=span,
        )

    async def kill(self, event: KillContainers) -> None:
        """Kill exactly the listed runs of this node's organization."""
        me = self._config.identity
        if event.collaboration_id != me.collaboration_id:
            return
        if event.node_id is not None and event.node_id != me.id:
            return
        if event.kill_list is None:
            targets = list(self._runs)
        else:
            targets = [t.run_id for t in event.kill_list if t.organization_id == me.organization_id]
        for run_id in targets:
            record = self._runs.get(run_id)
            if record is not None:
                record.killed = True
            log.info("run.kill_requested", run_id=run_id)
            try:
                await self._executor.kill(run_id)
            except ExecutorError as exc:
                log.warning("run.kill_failed", run_id=run_id, error=str(exc))

    # -- starting -------------------------------------------------------------------------

    async def _admit_and_start(self, run: Run) -> None:
        record = self._runs[run.id]
        with bind_run(run_id=run.id, task_id=run.task.id):
            try:
                await self._admit_and_start_bound(run, record)
            except ServerError as exc:
                # The run stays open on the server; the next sync picks it up again.
                log.error("run.server_error", error=str(exc))
                self._forget(record, status="server error", cleanup=False, finished=False)
            except Exception:
                # Never let one run take the node down; report it as a node-side failure.
                log.exception("run.start_crashed")
                await self._finish_without_container(
                    record, RunStatus.FAILED, "fednode could not start the run (node error)"
                )

    async def _admit_and_start_bound(self, run: Run, record: _RunInFlight) -> None:
        if run.started_at is not None:
            # Started before (by us, before a restart or a failed upload): follow the
            # runtime object if there is one, never start a second container.
            state = next((s for s in await self._executor.list_runs() if s.run_id == run.id), None)
            if state is not None:
                log.info("run.adopted", phase=state.phase.value)
                if state.phase.is_terminal:
                    self._on_run_event(
                        RunEvent.now(run.id, state.phase, state.reason, exit_code=state.exit_code)
                    )
                return
            await self._finish_without_container(
                record,
                RunStatus.FAILED,
                "the run's container was lost while the node was down; not restarting it "
                "to avoid running it twice",
            )
            return
        with self._tracer.start_as_current_span(
            "admit", context=trace.set_span_in_context(record.span)
        ) as admit:
            decision = self._admission.decide(
                image=run.task.image,
                organization_id=record.init_org_id,
                user_id=run.task.init_user.id if run.task.init_user else None,
                databases=[db.label for db in run.task.databases],
            )
            admit.set_attribute("fednode.admitted", isinstance(decision, Admitted))
        if not isinstance(decision, Admitted):
            log.warning("run.not_allowed", reason=decision.reason, image=run.task.image)
            await self._finish_without_container(
                record, RunStatus.NOT_ALLOWED, f"not allowed: {decision.reason}"
            )
            return
        try:
            input_bytes = self._cryptor.decrypt(run.input or "")
        except CryptoError as exc:
            log.warning("run.bad_input", error=str(exc))
            await self._finish_without_container(
                record, RunStatus.FAILED, f"the run's input cannot be decrypted: {exc}"
            )
            return

        await self._slots.acquire()
        record.holds_slot = True
        if record.killed:
            await self._finish_without_container(record, RunStatus.KILLED, "killed before start")
            return
        record.timings["slot"] = time.monotonic()
        # Both must happen before the container starts; neither needs the other.
        _, token = await asyncio.gather(
            self._patch(run.id, {"started_at": _now()}), self._container_token(run)
        )
        if token is None:
            await self._finish_without_container(
                record, RunStatus.FAILED, "could not obtain an algorithm container token"
            )
            return
        trace_context = carrier_of(record.span)
        spec = RunSpec(
            run_id=run.id,
            task_id=run.task.id,
            organization_id=self._config.identity.organization_id,
            collaboration_id=self._config.identity.collaboration_id,
            parent_task_id=record.parent_id,
            image=run.task.image,
            input=input_bytes,
            token=SecretStr(token),
            environment=container_environment(
                databases=self._config.databases,
                requested=[db.model_dump() for db in run.task.databases],
                proxy=self._config.proxy,
                trace_context=trace_context,
            ),
            databases=self._config.databases,
            resources=Resources(
                cpu=decision.resources.cpu,
                memory_mb=decision.resources.memory_mb,
                gpus=decision.resources.gpus,
            ),
            deadline_seconds=self._config.deadline_seconds,
            proxy=self._config.proxy,
            trace_context=trace_context,
            # Kept by the executor with the run, so a restarted node gets the token back
            # even where it may not read it from the runtime (Kubernetes Secrets).
            sealed_token=self._token_seal.seal(token, run_id=run.id, task_id=run.task.id),
        )
        with self._tracer.start_as_current_span(
            "start", context=trace.set_span_in_context(record.span)
        ):
            try:
                await self._executor.start(spec)
            except ExecutorError as exc:
                log.error("run.start_failed", error=str(exc))
                await self._finish_without_container(
                    record, RunStatus.START_FAILED, f"the runtime refused the run: {exc}"
                )
                return
        record.timings["started"] = time.monotonic()
        self._admit_to_proxy(record, token, trace_context)
        log.info("run.started", image=run.task.image)
        await self._patch(run.id, {"status": RunStatus.ACTIVE.value})
        await self._announce(record, RunStatus.ACTIVE)

    def _admit_to_proxy(
        self, record: _RunInFlight, token: str, trace_context: dict[str, str]
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

    async def _container_token(self, run: Run) -> str | None:
        try:
            body = await self._server.request(
                "POST",
                "token/container",
                json_body={"task_id": run.task.id, "image": run.task.image},
            )
        except ServerError as exc:
            log.warning("run.no_container_token", error=str(exc))
            return None
        token = body.get("container_token") if isinstance(body, dict) else None
        return str(token) if token else None

    # -- finishing ------------------------------------------------------------------------

    def _on_run_event(self, event: RunEvent) -> None:
        record = self._runs.get(event.run_id)
        if event.phase is Phase.RUNNING and record is not None and record.execute_span is None:
            record.execute_span = self._tracer.start_span(
                "execute", context=trace.set_span_in_context(record.span)
            )
        if not event.phase.is_terminal or event.run_id in self._finished:
            return
        if record is not None and record.finishing:
            return
        if record is not None:
            record.finishing = True
            if record.token is not None and self._proxy_runs is not None:
                self._proxy_runs.finish(record.token)  # 403 for its calls from now on
        self._work.spawn(self._finish(event), name=f"finish-run-{event.run_id}")

    async def _finish(self, event: RunEvent) -> None:
        record = self._runs.get(event.run_id) or await self._recall(event.run_id)
        if record is None or event.run_id in self._finished:
            return
        record.finishing = True
        with bind_run(run_id=record.run_id, task_id=record.task_id):
            try:
                await self._upload(record, event)
            except ServerError as exc:
                # Keep the runtime object: the next sync or restart retries the upload.
                log.error("run.upload_failed", error=str(exc))
                record.finishing = False
                self._forget(record, status="upload failed", cleanup=False, finished=False)

    async def _upload(self, record: _RunInFlight, event: RunEvent) -> None:
        if record.execute_span is not None:
            record.execute_span.set_attribute("fednode.exit_code", event.exit_code or 0)
            record.execute_span.end()
        reason = event.reason or (
            Reason.COMPLETED if event.phase is Phase.SUCCEEDED else Reason.CRASHED
        )
        if record.killed and reason is not Reason.COMPLETED:
            reason = Reason.KILLED
        status = STATUS_OF_REASON[reason]
        with self._tracer.start_as_current_span(
            "upload", context=trace.set_span_in_context(record.span)
        ):
            try:
                output = await self._executor.collect(record.run_id)
                result, container_log = output.output, output.log
            except ExecutorError as exc:
                result, container_log = b"", f"(no output could be collected: {exc})"
            note = EXPLANATION.get(reason)
            if note is not None:
                exit_part = f" (exit code {event.exit_code})" if event.exit_code is not None else ""
                container_log = f"{container_log}\nfednode: {note}{exit_part}. {event.message}"
            body: dict[str, Any] = {
                "log": container_log,
                "status": status.value,
                "finished_at": _now(),
            }
            if result:
                body["result"] = await self._encrypt_result(record, result)
            await self._patch(record.run_id, body, finished_ok=True)
        log.info(
            "run.finished", status=status.value, reason=reason.value, exit_code=event.exit_code
        )
        await self._announce(record, status)
        self._forget(record, status=status.value, reason=reason.value)

    async def _encrypt_result(self, record: _RunInFlight, result: bytes) -> str:
        if not self._cryptor.encrypted:
            return self._cryptor.encrypt(result, None)
        key = await self._keys.public_key(record.init_org_id) if record.init_org_id else None
        return self._cryptor.encrypt(result, key)

    async def _recall(self, run_id: int) -> _RunInFlight | None:
        """Rebuild the memory of a run we lost track of (e.g. after a restart)."""
        run = await self._fetch_run(run_id)
        if run is None:
            return None
        record = self._remember(run)
        self._runs[run_id] = record
        return record

    async def _fetch_run(self, run_id: int) -> Run | None:
        """The server's view of a run; ``None`` (and its runtime object removed) if unknown."""
        try:
            body = await self._server.request("GET", f"run/{run_id}")
            task = body.get("task") or {}
            if "image" not in task:
                body["task"] = await self._server.request("GET", f"task/{task.get('id')}")
            return Run.model_validate(body)
        except ServerError as exc:
            if exc.status != 404:
                log.error("run.server_lookup_failed", run_id=run_id, error=str(exc))
                return None
            # The server has no such run (its database was reset, or the run was deleted):
            # the runtime object is an orphan. Remove it so it cannot be mistaken for a
            # future run with the same id.
            log.warning("run.orphan_removed", run_id=run_id, error=str(exc))
            self._work.spawn(self._cleanup(run_id), name=f"cleanup-orphan-{run_id}")
            return None
        except (ValidationError, AttributeError) as exc:
            log.error("run.bad_run_payload", run_id=run_id, error=str(exc))
            return None

    async def _finish_without_container(
        self, record: _RunInFlight, status: RunStatus, message: str
    ) -> None:
        """End a run that never got (or lost) its container, with a status and a reason."""
        await self._patch(
            record.run_id,
            {"status": status.value, "log": f"fednode: {message}", "finished_at": _now()},
            finished_ok=True,
        )
        await self._announce(record, status)
        self._forget(record, status=status.value, cleanup=False)

    def _forget(
        self,
        record: _RunInFlight,
        *,
        status: str,
        reason: str | None = None,
        cleanup: bool = True,
        finished: bool = True,
    ) -> None:
        """Drop a run from memory; ``finished=False`` leaves it to the next sync to retry."""
        if record.holds_slot:
            record.holds_slot = False
            self._slots.release()
        record.span.set_attribute("fednode.status", status)
        if reason is not None:
            record.span.set_attribute("fednode.reason", reason)
        if status not in (RunStatus.COMPLETED.value,):
            record.span.set_status(Status(StatusCode.ERROR, status))
        record.span.end()
        self._runs.pop(record.run_id, None)
        if finished:
            self._finished[record.run_id] = record.token
            if record.token is not None and self._proxy_runs is not None:
                self._proxy_runs.finish(record.token)
            if len(self._finished) > FINISHED_MEMORY:
                oldest = next(iter(self._finished))
                token = self._finished.pop(oldest)
                if token is not None and self._proxy_runs is not None:
                    self._proxy_runs.discard(token)
        if cleanup:
            self._work.spawn(self._cleanup(record.run_id), name=f"cleanup-run-{record.run_id}")

    async def _cleanup(self, run_id: int) -> None:
        try:
            await self._executor.cleanup(run_id)
        except ExecutorError as exc:
            log.warning("run.cleanup_failed", run_id=run_id, error=str(exc))

    # -- reconciliation ------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Claim what the executor already has, before taking anything new.

        Runs still going are followed (they occupy a slot; after a restart the limit may be
        exceeded briefly); finished ones are uploaded; runs that the server already ended
        while we were away (killed by the user) are killed here too.
        """
        states = await self._executor.list_runs()
        for state in states:
            if state.run_id in self._runs:
                continue
            run = await self._fetch_run(state.run_id)
            if run is None:
                continue
            record = self._remember(run, parent=state.trace_context)
            self._runs[state.run_id] = record
            if state.phase.is_terminal:
                self._on_run_event(
                    RunEvent.now(state.run_id, state.phase, state.reason, exit_code=state.exit_code)
                )
                continue
            if not self._slots.locked():
                await self._slots.acquire()
                record.holds_slot = True
            token, why_not = self._recover_token(state, run)
            if token is not None:
                self._admit_to_proxy(record, token, state.trace_context)
            else:
                log.warning(
                    "run.token_not_recovered",
                    run_id=state.run_id,
                    reason=why_not,
                    hint="the proxy refuses this run's calls until it ends",
                )
            if _finished_on_server(run.status):
                record.killed = True
                try:
                    await self._executor.kill(state.run_id)
                except ExecutorError as exc:
                    log.warning("run.kill_failed", run_id=state.run_id, error=str(exc))
        log.info("runs.reconciled", found=len(states), claimed=len(self._runs))

    def _recover_token(self, state: RunState, run: Run) -> tuple[str | None, str]:
        """An adopted run's container token, or why it cannot be had.

        First the sealed copy the executor kept with the run (every runtime, including
        Kubernetes, whose Secret the node may not read), bound to the run and task ids the
        server gives; then the token file in the run's directory (podman, apptainer).
        """
        reasons = []
        if state.sealed_token:
            try:
                return (
                    self._token_seal.unseal(state.sealed_token, run_id=run.id, task_id=run.task.id),
                    "",
                )
            except SealError as exc:
                reasons.append(f"sealed token: {exc}")
        else:
            reasons.append("no sealed token kept with the run")
        token_file = RunFiles(self._config.task_dir, state.run_id).token
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            reasons.append(f"token file: {exc.strerror or exc}")
        else:
            if token:
                return token, ""
            reasons.append("token file: empty")
        return None, "; ".join(reasons)

    # -- shutdown -------------------------------------------------------------------------

    async def close(self, *, grace: float = 5.0) -> None:
        """Stop taking runs; let in-flight uploads finish for ``grace`` seconds."""
        self._accepting = False
        await self._work.close(grace=grace)
        for record in list(self._runs.values()):
            record.span.end()

    # -- helpers --------------------------------------------------------------------------

    async def _patch(self, run_id: int, body: dict[str, Any], *, finished_ok: bool = False) -> None:
        try:
            await self._server.request("PATCH", f"run/{run_id}", json_body=body)
        except ServerError as exc:
            if finished_ok and exc.status == 400 and "finished" in exc.message:
                log.info("run.already_finished_on_server", run_id=run_id)
                return
            raise

    async def _announce(self, record: _RunInFlight, status: RunStatus) -> None:
        me = self._config.identity
        await self._notifier.emit(
            "algorithm_status_change",
            {
                "node_id": me.id,
                "status": status.value,
                "run_id": record.run_id,
                "task_id": record.task_id,
                "collaboration_id": me.collaboration_id,
                "organization_id": me.organization_id,
                "parent_id": record.parent_id,
            },
        )

    def _node_info(self) -> dict[str, Any]:
        return {
            "encryption": self._cryptor.encrypted,
            "allowed_algorithms": list(self._config.allowed_algorithms) or "all",
            "database_labels": [db.label for db in self._config.databases],
            "database_types": {f"db_type_{db.label}": db.type for db in self._config.databases},
        }

    @property
    def in_flight(self) -> int:
        return len(self._runs)


def _finished_on_server(status: str) -> bool:
    try:
        return RunStatus(status).is_finished
    except ValueError:
        return False


def _now() -> str:
    return datetime.now(UTC).isoformat()
