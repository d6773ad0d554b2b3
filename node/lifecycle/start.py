"""The start of a run: from the server's open run to a started container.

A run the server assigns to this node, never started before, goes through
:meth:`Starter.start` in this order:

1. **admit** — the node's policies (:mod:`policies.admission`) accept the image, the
   initiating organization and user, and grant resources (the run's resource profile,
   else the defaults; a grant over a cap is refused); a refusal ends the run
   ``not allowed`` with the policy's reason, also on the ``admit`` span
   (``fednode.refused``); what was granted goes on the run's root span
   (``fednode.resources.*``) and into ``fednode status``;
2. **decrypt** the input with the node's private key (``failed`` if it cannot be);
3. **wait for a slot** (``max_concurrent_runs``, FIFO); a run killed while it waited ends
   ``killed by user`` without a container;
4. **tell the server** ``started_at`` and, at the same time, ask it for the run's
   container token;
5. **build the spec** (:func:`node.lifecycle.spec.build_spec`, pure) with the token and
   its sealed copy (:mod:`node.token_seal`) for the executor to keep with the run; with
   several executors (``executors:``) the run's route picks one
   (:class:`node.executor_set.Routes`), named on the spec, the trace and the logs;
6. **register the token with the proxy**, so the algorithm's first call is accepted even
   if it comes the instant the container starts;
7. **start** through the executor; then status ``active`` on the server and to the
   collaboration.

A start that fails after step 6 — the runtime refuses the run, or the node errs — takes
the token back from the proxy, ends the run with a status the server understands and
removes whatever the executor made (the run directory with the decrypted input included).
A :class:`~node.server.rest.ServerError` before any of that leaves the run open on the
server for the next ``sync``. A runtime that cannot be reached for a moment (its service
restarting) is asked again with backoff, for up to ``runtime_patience`` seconds: a start
is idempotent (the runtime object is named after the run), so asking again never makes a
second container.

A run the server says started but that never got (or never started) its container — the
node died in between — comes here too, from
:meth:`node.lifecycle.reconcile.Reconciler.adopt`: ``started_at`` is not told again, and
the token recovered from its created container, if any, is the one used.
"""

from __future__ import annotations

import asyncio

from opentelemetry import trace

from executors.base import Executor, ExecutorError
from executors.spec import RunSpec
from node.crypto import CryptoError, Cryptor
from node.lifecycle.finish import Finisher
from node.lifecycle.inflight import InFlight, RunInFlight
from node.lifecycle.patience import patiently
from node.lifecycle.server import RunServer
from node.lifecycle.spec import LifecycleConfig, build_spec
from node.logging import bind_run, get_logger
from node.server.models import Run, RunStatus
from node.server.rest import ServerError
from node.telemetry import carrier_of
from node.token_seal import TokenSeal
from policies.admission import Admission, Admitted

log = get_logger(__name__)


class Starter:
    """Admits and starts runs that were never started; see the module docstring."""

    def __init__(
        self,
        *,
        server: RunServer,
        executor: Executor,
        admission: Admission,
        cryptor: Cryptor,
        token_seal: TokenSeal,
        inflight: InFlight,
        finisher: Finisher,
        config: LifecycleConfig,
        tracer: trace.Tracer,
        runtime_patience: float,
    ) -> None:
        self._server = server
        self._executor = executor
        self._admission = admission
        self._cryptor = cryptor
        self._token_seal = token_seal
        self._inflight = inflight
        self._finisher = finisher
        self._config = config
        self._tracer = tracer
        self._patience = runtime_patience

    async def start(self, run: Run, record: RunInFlight, *, token: str | None = None) -> None:
        """Admit and start ``run``; every way it can end is reported to the server.

        ``token``: the container token a created container of this run already has.
        """
        with bind_run(run_id=run.id, task_id=run.task.id, span=record.span):
            try:
                await self._admit_and_start(run, record, token)
            except ServerError as exc:
                # The run stays open on the server; the next sync picks it up again.
                log.error("run.server_error", error=str(exc))
                self._inflight.retry_later(record, why="server error")
            except Exception:
                # Never let one run take the node down; report it as a node-side failure.
                log.exception("run.start_crashed")
                await self._finisher.end_after_failed_start(
                    record, RunStatus.FAILED, "fednode could not start the run (node error)"
                )

    async def _admit_and_start(self, run: Run, record: RunInFlight, token: str | None) -> None:
        admitted = self._admit(run, record)
        if not isinstance(admitted, Admitted):
            log.warning("run.not_allowed", reason=admitted, image=run.task.image)
            await self._finisher.end_without_container(
                record, RunStatus.NOT_ALLOWED, f"not allowed: {admitted}"
            )
            return
        try:
            input_bytes = self._cryptor.decrypt(run.input or "")
        except CryptoError as exc:
            log.warning("run.bad_input", error=str(exc))
            await self._finisher.end_without_container(
                record, RunStatus.FAILED, f"the run's input cannot be decrypted: {exc}"
            )
            return

        await self._inflight.take_slot(record)
        if record.killed:
            await self._finisher.end_without_container(
                record, RunStatus.KILLED, "killed before start"
            )
            return
        if token is None and run.started_at is None:
            # Both must happen before the container starts; neither needs the other.
            _, token = await asyncio.gather(
                self._server.mark_started(run.id), self._server.container_token(run)
            )
        elif token is None:
            token = await self._server.container_token(run)
        if token is None:
            await self._finisher.end_without_container(
                record, RunStatus.FAILED, "could not obtain an algorithm container token"
            )
            return
        trace_context = carrier_of(record.span)
        routes = self._config.routes
        if routes is not None:
            record.executor = routes.choose(
                image=run.task.image, profile=admitted.resources.profile
            )
            record.span.set_attribute("fednode.executor", record.executor)
        spec = build_spec(
            run,
            config=self._config,
            admitted=admitted,
            input_bytes=input_bytes,
            token=token,
            sealed_token=self._token_seal.seal(token, run_id=run.id, task_id=run.task.id),
            trace_context=trace_context,
            executor=record.executor,
        )
        record.resources = spec.resources
        record.profile = admitted.resources.profile
        record.span.set_attributes(resource_attributes(spec, profile=record.profile))
        # Before the container: its first call to the proxy may come at once.
        self._inflight.admit_to_proxy(record, token, trace_context)
        with self._tracer.start_as_current_span(
            "start", context=trace.set_span_in_context(record.span)
        ):
            try:
                await patiently(
                    lambda: self._executor.start(spec),
                    patience=self._patience,
                    event="run.start_retrying",
                )
            except ExecutorError as exc:
                log.error("run.start_failed", error=str(exc))
                await self._finisher.end_after_failed_start(
                    record, RunStatus.START_FAILED, f"the runtime refused the run: {exc}"
                )
                return
        log.info("run.started", image=run.task.image, executor=record.executor)
        if record.finishing:
            return  # a fast run's end came first; the server must not hear "active" after it
        try:
            told = await self._server.mark_active(run.id)
        except ServerError as exc:
            # The container runs: the run stays in flight here, and its end (uploaded with
            # retries) tells the server everything. Letting go of it now would have the next
            # sync adopt it a second time (found by the chaos campaign).
            log.warning("run.active_not_told", error=str(exc))
            return
        if told:
            if not record.finishing:
                await self._server.announce(record, RunStatus.ACTIVE)
        elif not record.finishing:
            # The server ended it while it started (its user killed it): stop it; its end
            # is not uploaded, only cleaned up.
            log.info("run.ended_on_server_while_starting")
            record.ended_on_server = record.killed = True
            await self._executor.kill(run.id)

    def _admit(self, run: Run, record: RunInFlight) -> Admitted | str:
        """The policies' decision: what the run may use, or why it may not run."""
        with self._tracer.start_as_current_span(
            "admit", context=trace.set_span_in_context(record.span)
        ) as span:
            decision = self._admission.decide(
                image=run.task.image,
                organization_id=record.init_org_id,
                user_id=run.task.init_user.id if run.task.init_user else None,
                databases=[db.label for db in run.task.databases],
            )
            span.set_attribute("fednode.admitted", isinstance(decision, Admitted))
            if not isinstance(decision, Admitted):
                span.set_attribute("fednode.refused", decision.reason)
        return decision if isinstance(decision, Admitted) else decision.reason


def resource_attributes(spec: RunSpec, *, profile: str | None) -> dict[str, str | int | float]:
    """What the run was given, as attributes of its trace's root span."""
    resources = spec.resources
    attributes: dict[str, str | int | float] = {
        "fednode.resources.profile": profile or "(defaults)",
        "fednode.resources.cpu": resources.cpu,
        "fednode.resources.memory_mb": resources.memory_mb,
        "fednode.resources.gpus": resources.gpus,
        "fednode.resources.deadline_seconds": spec.deadline_seconds,
    }
    if resources.gpu_type:
        attributes["fednode.resources.gpu_type"] = resources.gpu_type
    return attributes
