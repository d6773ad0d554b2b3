"""Claiming what already exists: runs the runtime has, and runs the server says started.

The node keeps no state of its own across a restart: what is true lives in the executor's
objects (labelled with run and task ids, annotated with the trace context and the sealed
token) and on the server. :meth:`Reconciler.reconcile` runs once at start-up, before the
first ``sync``, and claims every run the executor has, so none is started twice:

* a run still going is followed: it takes a free slot (after a restart the limit may be
  exceeded briefly), and the proxy accepts its token again — recovered first from the
  sealed copy the executor kept with the run (:mod:`node.token_seal`; on Kubernetes the
  node may not read the token's Secret), else from the executor
  (``Executor.recover_token``: podman and apptainer read the run's token file); if the
  server still says ``pending`` (the node died before it said ``active``), it hears ``active``;
* a run that ended while the node was down is finished (uploaded) as if its event had just
  come;
* a run the server has already ended — its result uploaded before the node died, or
  killed by its user while the node was away — is not uploaded again: it is killed if it
  still runs, and its runtime object and files are removed (decided from the run's status
  at the server);
* a run whose container was created but never started (the node died in between) is
  started, with the token that container already has;
* a runtime object the server does not know at all is removed
  (:meth:`node.lifecycle.finish.Finisher.look_up_object`);
* a run directory under ``task_dir`` that no runtime object backs — left behind by a
  start that failed after the executor wrote the decrypted input — is removed.

On every ``sync`` (each connection of the socket begins with one), a run followed here
that the server no longer lists open goes through :meth:`Reconciler.recheck`: if the
server has ended it — its user killed it while the node was down or its socket was away,
so the ``kill_containers`` event was never heard — it is killed and cleaned up, not
uploaded. The chaos campaign found such a run still running after the campaign ended.

Also on every ``sync``, a run the server lists as started (``started_at`` set) but that
this process does not follow goes through :meth:`Reconciler.adopt`: followed if the
runtime has it running or ended; started — once — if the runtime has no container for it
(the node died between telling the server ``started_at`` and creating the container) or
only a created one (it died before starting it). Starting it again cannot run it twice:
the runtime object is named after the run, so a second start adopts the first
(:meth:`executors.base.Executor.start`), and a run's object is removed only after the
server has its final status, when the run is no longer open.
"""

from __future__ import annotations

import os
from pathlib import Path

from executors.base import Executor, ExecutorError, TokenUnavailable
from executors.runfiles import RunFiles
from executors.spec import Phase, RunEvent, RunState
from node.background import TaskOwner
from node.lifecycle.finish import Finisher
from node.lifecycle.inflight import InFlight, RunInFlight
from node.lifecycle.server import RunServer, finished_status
from node.lifecycle.spec import LifecycleConfig
from node.lifecycle.start import Starter
from node.logging import bind_run, get_logger
from node.server.models import Run, RunStatus
from node.server.rest import ServerError
from node.token_seal import SealError, TokenSeal

log = get_logger(__name__)

#: The run directories' names under ``task_dir``: ``run-<id>`` (:class:`RunFiles`).
RUN_DIRECTORY_PREFIX = "run-"


class Reconciler:
    """Claims the runs that exist already; see the module docstring."""

    def __init__(
        self,
        *,
        executor: Executor,
        server: RunServer,
        inflight: InFlight,
        finisher: Finisher,
        starter: Starter,
        token_seal: TokenSeal,
        config: LifecycleConfig,
        work: TaskOwner,
    ) -> None:
        self._executor = executor
        self._server = server
        self._inflight = inflight
        self._finisher = finisher
        self._starter = starter
        self._work = work
        self._token_seal = token_seal
        self._config = config

    async def reconcile(self) -> None:
        """Claim what the executor already has, before taking anything new."""
        states = await self._executor.list_runs()
        for state in states:
            if state.run_id in self._inflight.runs:
                continue
            run = await self._finisher.look_up_object(state.run_id)
            if run is None:
                continue
            ended = finished_status(run.status)
            record = self._inflight.remember(run, parent=state.trace_context, fresh=False)
            if not ended and _never_started(state):
                # Created, never started (the node died in between): start it now, once,
                # with the token its container already has.
                await self._admit_recovered(state, run, record)
                self._work.spawn(
                    self._starter.start(run, record, token=record.token),
                    name=f"resume-run-{run.id}",
                )
                continue
            if ended and (state.phase.is_terminal or _never_started(state)):
                # Its result (or the user's kill) is at the server already: never again.
                self._finisher.ended_on_server(record, run.status)
                continue
            if state.phase.is_terminal:
                self._finisher.on_run_event(_event_of(state))
                continue
            await self._inflight.take_free_slot(record)
            await self._admit_recovered(state, run, record)
            if ended:
                record.ended_on_server = True  # killed by its user while we were away
                record.killed = True
                await self._kill(state.run_id)
            elif run.status != RunStatus.ACTIVE.value:
                await self._tell_active(run.id)
        swept = self._sweep({state.run_id for state in states} | set(self._inflight.runs))
        log.info(
            "runs.reconciled", found=len(states), claimed=len(self._inflight.runs), swept=swept
        )

    async def adopt(self, run: Run, record: RunInFlight) -> None:
        """A run the server says started: follow its runtime object, or start it once."""
        with bind_run(run_id=run.id, task_id=run.task.id, span=record.span):
            try:
                state = next(
                    (s for s in await self._executor.list_runs() if s.run_id == run.id), None
                )
            except ExecutorError as exc:
                log.error("run.adopt_deferred", error=str(exc))
                self._inflight.retry_later(record, why="runtime unreachable")
                return
            if state is None or _never_started(state):
                # The node died after telling the server started_at, before the container
                # was created (or started): start it now, once (see the module docstring).
                log.info(
                    "run.resumed",
                    container="created, never started" if state else "never created",
                )
                token = await self._token_or_none(state, run) if state is not None else None
                await self._starter.start(run, record, token=token)
                return
            try:
                log.info("run.adopted", phase=state.phase.value)
                if state.phase.is_terminal:
                    self._finisher.on_run_event(_event_of(state))
                    return
                await self._inflight.take_free_slot(record)
                await self._admit_recovered(state, run, record)
                if run.status != RunStatus.ACTIVE.value:
                    await self._tell_active(run.id)
            except Exception:
                log.exception("run.adopt_crashed")
                await self._finisher.end_without_container(
                    record, RunStatus.FAILED, "fednode could not follow the run (node error)"
                )

    async def recheck(self, run_id: int) -> None:
        """A run followed here that a ``sync`` did not list open: if the server has ended
        it (its user killed it while this node was down or its socket away, so the
        ``kill_containers`` event never came), stop it; its end is not uploaded, only
        cleaned up. A run the server still has open (listed a moment too early) is left be.
        """
        record = self._inflight.runs.get(run_id)
        if record is None or record.finishing:
            return
        with bind_run(run_id=run_id, task_id=record.task_id, span=record.span):
            try:
                run = await self._server.run(run_id)
            except ServerError as exc:
                log.warning("run.recheck_failed", error=str(exc), hint="the next sync asks again")
                return
            if not finished_status(run.status) or record.finishing:
                return
            log.info("run.ended_on_server_unheard", status=run.status)
            record.ended_on_server = record.killed = True  # a run waiting for a slot never starts
            await self._kill(run_id)

    async def _admit_recovered(self, state: RunState, run: Run, record: RunInFlight) -> None:
        """The proxy accepts a followed run's token again, if it can be recovered."""
        token = await self._token_or_none(state, run)
        if token is not None:
            self._inflight.admit_to_proxy(record, token, state.trace_context)

    async def _token_or_none(self, state: RunState, run: Run) -> str | None:
        """:meth:`recover_token`, with the reason it failed logged once."""
        try:
            return await self.recover_token(state, run)
        except TokenUnavailable as exc:
            log.warning(
                "run.token_not_recovered",
                run_id=state.run_id,
                reason=str(exc),
                hint="the proxy refuses this run's calls until it ends",
            )
            return None

    async def _tell_active(self, run_id: int) -> None:
        """A followed run the server still has ``pending``: it runs, so it is ``active``."""
        try:
            await self._server.mark_active(run_id)
        except ServerError as exc:
            log.warning("run.active_not_told", run_id=run_id, error=str(exc))

    async def recover_token(self, state: RunState, run: Run) -> str:
        """An adopted run's container token; :class:`TokenUnavailable` says why not.

        First the sealed copy the executor kept with the run (every runtime, including
        Kubernetes, whose Secret the node may not read), bound to the run and task ids the
        server gives; then whatever copy the executor can read back
        (``Executor.recover_token``; podman, apptainer: the run's token file).
        """
        reasons = []
        if state.sealed_token:
            try:
                return self._token_seal.unseal(
                    state.sealed_token, run_id=run.id, task_id=run.task.id
                )
            except SealError as exc:
                reasons.append(f"sealed token: {exc}")
        else:
            reasons.append("no sealed token kept with the run")
        try:
            return await self._executor.recover_token(state)
        except ExecutorError as exc:
            reasons.append(str(exc))
        raise TokenUnavailable("; ".join(reasons))

    def _sweep(self, known: set[int]) -> int:
        """Remove the run directories no runtime object and no run in flight backs."""
        swept = 0
        for run_id in _run_directories(self._config.task_dir):
            if run_id in known:
                continue
            if RunFiles(self._config.task_dir, run_id).remove():
                log.warning("run.directory_swept", run_id=run_id)
                swept += 1
            else:
                log.error(
                    "run.directory_not_removable",
                    run_id=run_id,
                    directory=str(self._config.task_dir / f"{RUN_DIRECTORY_PREFIX}{run_id}"),
                    hint="another user made (part of) it; remove it as that user",
                )
        return swept

    async def _kill(self, run_id: int) -> None:
        try:
            await self._executor.kill(run_id)
        except ExecutorError as exc:
            log.warning("run.kill_failed", run_id=run_id, error=str(exc))


def _run_directories(task_dir: Path) -> list[int]:
    """The run ids of the real directories named ``run-<id>`` directly under ``task_dir``."""
    try:
        entries = list(os.scandir(task_dir))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        suffix = entry.name.removeprefix(RUN_DIRECTORY_PREFIX)
        if suffix != entry.name and suffix.isdigit() and entry.is_dir(follow_symlinks=False):
            found.append(int(suffix))
    return found


def _event_of(state: RunState) -> RunEvent:
    """A terminal state found in the runtime, as the event nobody saw."""
    return RunEvent.now(state.run_id, state.phase, state.reason, exit_code=state.exit_code)


def _never_started(state: RunState) -> bool:
    """The runtime has the run's object, but its container was never started."""
    return state.phase in (Phase.PENDING, Phase.STARTING)
