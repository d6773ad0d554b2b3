"""The end of a run: from the executor's terminal event to the uploaded result.

The executor reports a terminal phase (:class:`~executors.spec.RunEvent`); from then on the
proxy refuses the run's token (403) and the run's slot is free for the next one (its
container is done). :class:`Finisher` then collects the output file and the log, adds a
line saying in words why the run ended, encrypts the output for the organization that
started the task, and uploads result, log, status and ``finished_at`` in one PATCH (where
``share_algorithm_logs`` is false the log keeps only the node's own lines: the algorithm's
output goes to this node's log instead, as with the vantage6 4 node)
(:meth:`node.lifecycle.server.RunServer.upload`, retried with backoff while the server
cannot be reached). Last, the collaboration hears of the new status, the run leaves the
node's memory and its runtime objects and files are removed.

Nothing that goes wrong while finishing leaves a run hanging: a result that cannot be
encrypted (the initiating organization has no valid public key) ends the run ``failed``
with the reason in its log and no result; any other error ends it ``failed`` as a node
error. Only when even that cannot reach the server is the runtime object kept, for the next
``sync`` or restart to try again.

A run whose final status the server holds already (found so after a restart: uploaded
just before the node died, or killed by its user meanwhile) is not uploaded again; its
runtime object and files are removed once (:meth:`Finisher.ended_on_server`). A runtime
that cannot be reached while the output is collected is asked again with backoff, so a
result is never replaced by an empty one because podman was restarting.

Runs that never got a container (refused, undecryptable, lost) end through
:meth:`Finisher.end_without_container`; a run whose start failed half-way through
:meth:`Finisher.end_after_failed_start`, which also removes what the start made.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from pydantic import ValidationError

from executors.base import Executor, ExecutorError, UnknownRun
from executors.spec import Phase, Reason, RunEvent
from node.background import TaskOwner
from node.crypto import CryptoError, Cryptor
from node.lifecycle.inflight import InFlight, RunInFlight
from node.lifecycle.patience import patiently
from node.lifecycle.server import RunServer, finished_status, now
from node.logging import bind_run, get_logger
from node.proxy_link import OrganizationKeys
from node.server.models import Run, RunStatus
from node.server.rest import ServerError

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
    Reason.OUTPUT_REFUSED: RunStatus.FAILED,
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
    Reason.OUTPUT_REFUSED: "the node refused the run's output",
}


#: What the server gets instead of the algorithm's output with ``share_algorithm_logs: false``.
LOG_WITHHELD = "fednode: this node does not share algorithm logs (share_algorithm_logs: false)"


class ResultNotSealed(Exception):
    """The output cannot be encrypted for the organization that started the task."""


class Finisher:
    """Turns terminal run events into uploaded results; ends runs that never ran."""

    def __init__(
        self,
        *,
        server: RunServer,
        executor: Executor,
        inflight: InFlight,
        cryptor: Cryptor,
        keys: OrganizationKeys,
        tracer: trace.Tracer,
        work: TaskOwner,
        runtime_patience: float,
        share_algorithm_logs: bool = True,
    ) -> None:
        self._server = server
        self._share_logs = share_algorithm_logs
        self._executor = executor
        self._inflight = inflight
        self._cryptor = cryptor
        self._keys = keys
        self._tracer = tracer
        self._work = work
        self._patience = runtime_patience

    def on_run_event(self, event: RunEvent) -> None:
        """An executor event: trace and time the execution; finish the run on its terminal one."""
        metrics = self._inflight.metrics
        at = _timestamp(event)
        handled = time.time()
        if at is not None:
            metrics.executor_lag.observe(max(0.0, handled - at))
        record = self._inflight.runs.get(event.run_id)
        if record is not None:
            record.phase = event.phase.value
        if event.phase is Phase.RUNNING and record is not None and record.execute_span is None:
            record.execute_span = self._tracer.start_span(
                "execute", context=trace.set_span_in_context(record.span)
            )
            record.running_at = at if at is not None else handled
            if record.received_ns is not None:
                latency = record.running_at - record.received_ns / 1e9
                metrics.start_latency.observe(max(0.0, latency))
        if event.phase.is_terminal and record is not None and record.running_at is not None:
            metrics.duration.observe(max(0.0, (at or handled) - record.running_at))
            record.running_at = None
        if not event.phase.is_terminal or self._inflight.is_finished(event.run_id):
            return
        if record is not None:
            if record.finishing:
                return
            record.finishing = True
            self._inflight.refuse_at_proxy(record)
            self._inflight.release_slot(record)  # the container is done
        try:
            self._work.spawn(self._finish(event, record), name=f"finish-run-{event.run_id}")
        except RuntimeError:
            # The node is stopping: the next start's reconcile uploads this end.
            log.info("run.finish_deferred", run_id=event.run_id)

    async def _finish(self, event: RunEvent, record: RunInFlight | None) -> None:
        if record is None:
            record = await self._recall(event.run_id)
        if record is None or self._inflight.is_finished(event.run_id):
            return
        record.finishing = True
        if record.ended_on_server:
            self.ended_on_server(record, "already ended on the server")
            return
        with bind_run(run_id=record.run_id, task_id=record.task_id, span=record.span):
            try:
                await self._upload(record, event)
            except Exception as exc:
                log.exception("run.finish_failed")
                await self._end_after_failed_finish(record, exc)

    async def _upload(self, record: RunInFlight, event: RunEvent) -> None:
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
            message = event.message
            try:
                output = await patiently(
                    lambda: self._executor.collect(record.run_id),
                    patience=self._patience,
                    event="run.collect_retrying",
                    final=(UnknownRun,),
                )
                result, container_log = output.output, self._shared_log(output.log)
            except ExecutorError as exc:
                result, container_log = b"", f"(no output could be collected: {exc})"
            else:
                if output.refused:  # a link, not a file, or too large: nothing is uploaded
                    if reason is Reason.COMPLETED:
                        reason = Reason.OUTPUT_REFUSED
                        status = STATUS_OF_REASON[reason]
                    message = f"{message} {output.refused}".strip()
            note = EXPLANATION.get(reason)
            if note is not None:
                exit_part = f" (exit code {event.exit_code})" if event.exit_code is not None else ""
                container_log = f"{container_log}\nfednode: {note}{exit_part}. {message}"
            body: dict[str, Any] = {"log": container_log, "status": status.value}
            if result:
                try:
                    body["result"] = await self._sealed(record, result)
                except ResultNotSealed as exc:
                    log.error("run.result_not_encrypted", error=str(exc))
                    status = RunStatus.FAILED
                    body["status"] = status.value
                    body["log"] = f"{container_log}\nfednode: {exc}; the result was not uploaded."
            body["finished_at"] = now()
            stored = await self._server.upload(record.run_id, body)
        if stored:
            log.info(
                "run.finished", status=status.value, reason=reason.value, exit_code=event.exit_code
            )
        else:  # its end was reported before (e.g. by this node's next life): not again
            log.info("run.end_reported_before", status=status.value, reason=reason.value)
        await self._server.announce(record, status)
        self._inflight.finished(record, status=status.value, reason=reason.value)
        self._spawn_cleanup(record.run_id)

    def _shared_log(self, container_log: str) -> str:
        """The part of the algorithm's log the server may have: all of it, or nothing."""
        if self._share_logs:
            return container_log
        log.info("run.algorithm_log", log=container_log, shared=False)
        return LOG_WITHHELD

    async def _sealed(self, record: RunInFlight, result: bytes) -> str:
        """The output encrypted for the task's initiator (base64 only, if unencrypted)."""
        if not self._cryptor.encrypted:
            return self._cryptor.encrypt(result, None)
        org = record.init_org_id
        try:
            key = await self._keys.public_key(org) if org else None
            return self._cryptor.encrypt(result, key)
        except CryptoError as exc:
            raise ResultNotSealed(
                f"the result cannot be encrypted for the initiating organization {org}: {exc}"
            ) from None
        except ServerError as exc:
            if exc.status == 0 or exc.status >= 500:
                raise
            raise ResultNotSealed(
                f"the public key of the initiating organization {org} cannot be had: {exc}"
            ) from None

    async def _end_after_failed_finish(self, record: RunInFlight, error: Exception) -> None:
        """Finishing broke: the run ends ``failed`` with the reason, its objects removed."""
        message = f"fednode could not finish the run (node error: {type(error).__name__}: {error})"
        try:
            await self._server.end(record.run_id, RunStatus.FAILED, message)
            await self._server.announce(record, RunStatus.FAILED)
        except ServerError as exc:
            # The server cannot be told: keep the runtime object; sync or restart retries.
            log.error("run.end_failed", error=str(exc))
            record.finishing = False
            self._inflight.retry_later(record, why="finish failed")
            return
        self._inflight.finished(record, status=RunStatus.FAILED.value, reason="node-error")
        self._spawn_cleanup(record.run_id)

    def ended_on_server(self, record: RunInFlight, status: str) -> None:
        """The server already has the run's final status: remove what is left, once."""
        log.info("run.already_ended_on_server", run_id=record.run_id, status=status)
        self._inflight.refuse_at_proxy(record)
        self._inflight.finished(record, status=status, count=False)
        self._spawn_cleanup(record.run_id)

    # -- runs without a container ---------------------------------------------------------

    async def end_without_container(
        self, record: RunInFlight, status: RunStatus, message: str
    ) -> None:
        """End a run that never got (or lost) its container, with a status and a reason."""
        try:
            await self._server.end(record.run_id, status, message)
        except ServerError as exc:
            # Refused (4xx): the run stays open on the server; the next sync tries again.
            log.error("run.end_failed", status=status.value, error=str(exc))
            self._inflight.retry_later(record, why="end refused")
            return
        await self._server.announce(record, status)
        self._inflight.finished(record, status=status.value)

    async def end_after_failed_start(
        self, record: RunInFlight, status: RunStatus, message: str
    ) -> None:
        """End a run whose start failed half-way, and remove what the start made."""
        self._inflight.withdraw_from_proxy(record)
        await self.end_without_container(record, status, message)
        self._spawn_cleanup(record.run_id)

    # -- runtime objects: recall and cleanup ----------------------------------------------

    async def _recall(self, run_id: int) -> RunInFlight | None:
        """Rebuild the memory of a run we lost track of (e.g. after a restart)."""
        run = await self.look_up_object(run_id)
        if run is None:
            return None
        record = self._inflight.remember(run)
        record.ended_on_server = finished_status(run.status)
        return record

    async def look_up_object(self, run_id: int) -> Run | None:
        """The server's view of a run the runtime has an object for; ``None`` if it cannot be
        had now (logged), or if the server has no such run — then the object is removed."""
        try:
            return await self._server.run(run_id)
        except ServerError as exc:
            if exc.status != 404:
                log.error("run.server_lookup_failed", run_id=run_id, error=str(exc))
                return None
            # The server has no such run (its database was reset, or the run was deleted):
            # the runtime object is an orphan. Remove it so it cannot be mistaken for a
            # future run with the same id.
            log.warning("run.orphan_removed", run_id=run_id, error=str(exc))
            self._spawn_cleanup(run_id)
            return None
        except (ValidationError, AttributeError) as exc:
            log.error("run.bad_run_payload", run_id=run_id, error=str(exc))
            return None

    def _spawn_cleanup(self, run_id: int) -> None:
        try:
            self._work.spawn(self._cleanup(run_id), name=f"cleanup-run-{run_id}")
        except RuntimeError:
            # The node is stopping: the runtime object stays, and the next start's
            # reconcile finds it finished on the server and removes it then.
            log.info("run.cleanup_deferred", run_id=run_id)

    async def _cleanup(self, run_id: int) -> None:
        try:
            await self._executor.cleanup(run_id)
        except ExecutorError as exc:
            log.warning("run.cleanup_failed", run_id=run_id, error=str(exc))


def _timestamp(event: RunEvent) -> float | None:
    """When the runtime says the event happened (POSIX seconds); ``None`` if it did not say."""
    if event.at == datetime.min.replace(tzinfo=UTC):
        return None
    return event.at.timestamp()
