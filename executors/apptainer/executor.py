"""The apptainer executor: each run is an ``apptainer run`` under a detached supervisor.

How a run goes, and where each step is observed:

* ``start(spec)``: ``starting`` is published; the image is made a SIF in the cache
  (:mod:`~executors.apptainer.images`, pulled per the policy; a missing image ends the run
  as ``image-not-found`` here); the run's files, its ``--env-file`` and its record
  (:mod:`~executors.apptainer.records`) are written; then the supervisor
  (``supervisor.py``) is launched, detached from the node, and reports the pids.
  ``running`` is published when it has started apptainer. A run that already has a record
  is adopted, never started twice.
* The end: the node holds a pidfd of each run's supervisor on the event loop
  (``add_reader``: readable when the process exits). The supervisor writes ``exit.json``
  before it exits, so when the pidfd fires the record is complete, and it is classified by
  :func:`~executors.apptainer.records.phase_of`. No polling, no thread per run.
* The deadline: one timer handle per running run on the event loop, armed from the
  recorded start time (so a restarted node re-arms it, or fires it at once if it passed
  while the node was down). It writes the ``deadline`` mark and asks the supervisor to
  stop the run.
* ``kill`` writes the kill mark, then sends SIGTERM to the supervisor, which sends SIGTERM
  to apptainer's process group and SIGKILL after ``kill_grace_seconds``. Should the
  supervisor not end by then (plus a margin), the node SIGKILLs both process groups.
* After a restart ``open()`` reads every record of this node, publishes each run's phase,
  and follows the running ones (pidfd, deadline), level-triggered like the other executors.
* Peering (:class:`~executors.ports.PeerEndpoints`, docs/networking.md): with the node's
  forwarder ports in the context, a ``relay`` run gets a host-side loopback address of its
  own and its ports from the node's ``peering.image_ports`` (a SIF has no ``EXPOSE`` to
  read), both recorded in ``run.json`` before launch; its supervisor relays the forwarder
  ports out and the declared ports in. ``proxy_network: host`` runs take no part
  (:class:`~executors.base.PeeringUnavailable`).

Nothing here runs apptainer on the event loop's thread or polls; the subprocesses
(``apptainer --version``, ``apptainer pull``, the supervisor's launcher) are asyncio's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from common.logging import get_logger
from executors.apptainer.command import (
    NetworkMode,
    PeerPlan,
    PlanError,
    env_file_text,
    gpu_environment,
    network_mode,
    peering_refusal,
    run_argv,
    run_loopback_address,
    supervisor_plan,
)
from executors.apptainer.config import ApptainerSettings
from executors.apptainer.images import ImageCache
from executors.apptainer.records import (
    Exit,
    PeerRecord,
    RunPaths,
    RunRecord,
    Supervisor,
    phase_of,
    process_alive,
    read_json,
    read_record,
    records,
    write_json,
)
from executors.base import (
    ANNOTATION_TRACEPARENT,
    LABEL_NODE,
    ExecutorContext,
    ExecutorError,
    ImageUnavailable,
    PeeringUnavailable,
    ProxyPlacement,
    UnknownRun,
    run_labels,
)
from executors.devices import DeviceAllocator, devices_label
from executors.events import RunEventStream
from executors.memory import GoneRuns, StartsInFlight
from executors.ports import DeclaredPort, configured_ports
from executors.spec import Phase, Reason, RunEvent, RunOutput, RunSpec, RunState
from executors.tasks import TaskOwner
from executors.verdict import Verdict

log = get_logger(__name__)

SUPERVISOR = Path(__file__).resolve().with_name("supervisor.py")
#: apptainer 1.1 made user-namespace mode the default and added ``--no-eval``; 1.2 added
#: ``--no-mount bind-paths``.
MIN_APPTAINER = (1, 2)
#: Seconds past the supervisor's own grace before the node SIGKILLs a run itself.
_BACKSTOP_MARGIN = 5.0
_VERSION = re.compile(r"(apptainer|singularity(?:-ce)?) version v?(\d+)\.(\d+)", re.IGNORECASE)


class ApptainerExecutor:
    """Runs each algorithm with ``apptainer run`` under a supervisor; see the module docstring."""

    kind: ClassVar[str] = "apptainer"
    settings_model: ClassVar[type[BaseModel]] = ApptainerSettings

    def __init__(self, settings: ApptainerSettings, *, context: ExecutorContext) -> None:
        self._settings = settings
        self._context = context
        self._stream = RunEventStream()
        self._binary: str | None = None
        self._images: ImageCache | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._euid = os.geteuid()
        self._pidfds: dict[int, int] = {}
        self._deadlines: dict[int, asyncio.TimerHandle] = {}
        self._backstops: dict[int, asyncio.TimerHandle] = {}
        self._tasks = TaskOwner("apptainer", expected=(ExecutorError,))
        self._starting = StartsInFlight()
        #: Removed runs: nothing late about them is published.
        self._gone = GoneRuns()
        self._gpus = DeviceAllocator(settings.gpu_devices)

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Find apptainer, check it, and take up every run of this node found on disk.

        Returns once each of those runs has had its current phase published and the
        running ones are followed.
        """
        binary = shutil.which(self._settings.binary)
        if binary is None:
            raise ExecutorError(
                f"apptainer executable {self._settings.binary!r} not found "
                "(executor.binary: a name on PATH or a path)"
            )
        _require_pidfd()
        version = await self._version(binary)
        self._binary = binary
        self._loop = asyncio.get_running_loop()
        cache = self._settings.image_cache or self._context.task_dir / ".apptainer-images"
        self._images = ImageCache(
            settings=self._settings,
            binary=binary,
            directory=cache,
            tasks=self._tasks,
            credentials=self._context.registry_credentials,
        )
        _prepare_directories(self._context.task_dir, self._images)
        self._relist()
        log.info(
            "apptainer.opened",
            binary=binary,
            version=version,
            image_cache=str(cache),
            proxy_network=self._settings.proxy_network,
            unprivileged=self._euid != 0,
        )

    async def close(self) -> None:
        """Stop following runs; they keep running under their supervisors."""
        loop = self._loop
        for run_id in list(self._pidfds):
            self._unwatch(run_id)
        for handle in (*self._deadlines.values(), *self._backstops.values()):
            handle.cancel()
        self._deadlines.clear()
        self._backstops.clear()
        await self._tasks.close()
        if loop is not None:
            log.info("apptainer.closed")

    def events(self) -> AsyncIterator[RunEvent]:
        return aiter(self._stream)

    # -- runs ---------------------------------------------------------------------------------

    async def start(self, spec: RunSpec) -> None:
        """Pull, prepare and launch the run; adopt it instead if it already has a record.

        A missing image, a spec apptainer cannot run as asked, or a supervisor that cannot
        start apptainer ends as a ``failed`` event with a reason; nothing here raises for a
        single run's problem. A second start of a run whose start is under way here waits
        for that one instead.
        """
        await self._starting.run(spec.run_id, lambda: self._start(spec))

    async def _start(self, spec: RunSpec) -> None:
        run_id = spec.run_id
        paths = self._paths(run_id)
        bound = log.bind(run_id=run_id, task_id=spec.task_id)
        record = read_record(paths)
        if record is not None and self._ours(record):
            bound.info("apptainer.run.adopted")
            await self._adopt(paths, record)
            return
        self._stream.publish(RunEvent.now(run_id, Phase.STARTING))
        try:
            sif = await self._image_cache().ensure(spec.image)
        except ImageUnavailable as exc:
            bound.warning("apptainer.run.image_unavailable", image=spec.image, error=str(exc))
            self._stream.fail(run_id, Reason.IMAGE_NOT_FOUND, str(exc))
            return
        devices = await self._gpus.take_for(spec, stream=self._stream, log=bound)
        if devices is None:
            return
        try:
            self._prepare(spec, paths, sif, devices)
        except PlanError as exc:
            self._gpus.release(run_id)
            bound.error("apptainer.run.refused", error=str(exc))
            self._stream.fail(run_id, Reason.START_FAILED, str(exc))
            return
        except BaseException:
            self._gpus.release(run_id)
            raise
        if paths.files.killed:
            self._gpus.release(run_id)
            bound.info("apptainer.run.killed_before_start")
            self._stream.publish(
                RunEvent.now(run_id, Phase.KILLED, Reason.KILLED, message="killed before start")
            )
            return
        await self._launch(paths, deadline_seconds=spec.deadline_seconds)

    async def _adopt(self, paths: RunPaths, record: RunRecord) -> None:
        """A run with a record: launch it if it never was, else follow and report it."""
        verdict = phase_of(record)
        if verdict.phase is Phase.STARTING:
            self._stream.publish(RunEvent.now(record.run_id, Phase.STARTING))
            await self._launch(paths, deadline_seconds=record.deadline_seconds)
            return
        self._take_up(record, verdict)

    def _prepare(self, spec: RunSpec, paths: RunPaths, sif: Path, devices: tuple[str, ...]) -> None:
        """Write the run's files, env file and record (last: a record means "ready")."""
        mode = network_mode(spec, self._settings)
        argv = run_argv(
            binary=self._binary_path(),
            spec=spec,
            sif=sif,
            paths=paths,
            settings=self._settings,
            mode=mode,
            euid=self._euid,
        )
        peering = self._peering(spec, mode)
        plan = supervisor_plan(
            argv=argv,
            spec=spec,
            settings=self._settings,
            mode=mode,
            peer=(
                PeerPlan(peering.address, self._context.peer_ports, peering.ports)
                if peering is not None and peering.address is not None
                else None
            ),
            euid=self._euid,
        )
        env_text = env_file_text(spec.environment | gpu_environment(devices, self._settings))
        labels = run_labels(spec, node_name=self._context.node_name) | devices_label(devices)
        traceparent = spec.trace_context.get("traceparent")
        if traceparent:
            labels[ANNOTATION_TRACEPARENT] = traceparent
        paths.files.prepare(spec)
        paths.state.mkdir(mode=0o700, exist_ok=True)
        paths.workdir.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(paths.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(env_text)
        record = {
            "run_id": spec.run_id,
            "task_id": spec.task_id,
            "labels": labels,
            "image": spec.image,
            "sif": str(sif),
            "deadline_seconds": spec.deadline_seconds,
            "network": mode.value,
            "plan": plan,
        }
        if peering is not None:
            record["peering"] = peering.document()
        write_json(paths.record, record)

    def _peering(self, spec: RunSpec, mode: NetworkMode) -> PeerRecord | None:
        """The run's part in peering (``None``: peering is off at this node).

        The address is derived from the run id; one that another unfinished run of this
        node holds is skipped (this runs on the event loop without a pause between reading
        the records and writing the new one, so two starts cannot pick the same).
        """
        if not self._context.peer_ports:
            return None
        refusal = peering_refusal(mode, spec.proxy.host if spec.proxy else None)
        if refusal is not None:
            log.info("apptainer.run.no_peering", run_id=spec.run_id, reason=refusal)
            return PeerRecord(unavailable=refusal)
        taken = {
            record.peering.address
            for record in self._read_records()
            if record.peering is not None
            and record.peering.address is not None
            and record.run_id != spec.run_id
            and not phase_of(record).phase.is_terminal
        }
        return PeerRecord(
            address=run_loopback_address(spec.run_id, taken),
            ports=tuple(configured_ports(spec.image, self._context.peer_image_ports)),
        )

    async def _launch(self, paths: RunPaths, *, deadline_seconds: int) -> None:
        """Start the run's supervisor and follow it; report ``running`` once apptainer runs."""
        run_id = paths.run_id
        python = self._settings.supervisor_python or sys.executable
        try:
            process = await asyncio.create_subprocess_exec(
                python,
                "-I",
                str(SUPERVISOR),
                str(paths.state),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=paths.state,
            )
            out, err = await asyncio.wait_for(
                process.communicate(), timeout=self._settings.call_timeout_seconds
            )
        except (OSError, TimeoutError) as exc:
            message = f"the run's supervisor could not be started ({python}): {exc!r}"
            self._record_start_error(paths, message)
            log.error("apptainer.run.launch_failed", run_id=run_id, error=message)
            self._stream.fail(run_id, Reason.START_FAILED, message)
            return
        report = _parse_report(out, err)
        supervisor = Supervisor.from_document(report)
        if supervisor is None:
            message = str(report.get("error") or "the run's supervisor gave no report")
            self._record_start_error(paths, message)
            log.error("apptainer.run.start_failed", run_id=run_id, error=message)
            self._stream.fail(run_id, Reason.START_FAILED, message)
            return
        self._follow(run_id, supervisor)
        self._stream.publish(RunEvent.now(run_id, Phase.RUNNING))
        log.info(
            "apptainer.run.started",
            run_id=run_id,
            supervisor_pid=supervisor.pid,
            apptainer_pid=supervisor.child_pid,
        )
        self._arm_deadline(run_id, supervisor, deadline_seconds)
        if paths.files.killed:
            # kill() came while the supervisor was being launched.
            self._terminate(run_id, supervisor)

    async def kill(self, run_id: int) -> None:
        """Stop the run (SIGTERM, SIGKILL after the grace); its end is ``killed``/``killed``."""
        paths = self._paths(run_id)
        record = read_record(paths)
        if record is None or not self._ours(record):
            if run_id in self._starting:
                paths.files.mark_killed()  # start() checks this before and after launching
                self._gpus.withdraw(run_id)  # a start waiting for GPUs ends its wait
                log.info("apptainer.run.kill_requested", run_id=run_id, before_start=True)
            return
        verdict = phase_of(record)
        if verdict.phase.is_terminal:
            return  # it ended on its own first; that end stands
        paths.files.mark_killed()
        log.info("apptainer.run.kill_requested", run_id=run_id)
        if record.supervisor is None:
            if run_id not in self._starting:  # a record never launched (node died mid-start)
                self._stream.publish(
                    RunEvent.now(run_id, Phase.KILLED, Reason.KILLED, message="killed before start")
                )
            return
        self._terminate(run_id, record.supervisor)

    async def collect(self, run_id: int) -> RunOutput:
        paths = self._paths(run_id)
        if not _has_record(paths):
            raise UnknownRun(run_id)
        limits = self._context.limits
        read = await paths.files.read_output(limit=limits.max_output_bytes)
        return RunOutput(read.data, await paths.read_log(limit=limits.max_log_bytes), read.refused)

    async def cleanup(self, run_id: int) -> None:
        """Stop following the run, end it if it still runs, and remove all its files."""
        self._gone.add(run_id)
        self._gpus.release(run_id)
        self._unwatch(run_id)
        self._disarm(run_id)
        paths = self._paths(run_id)
        record = read_record(paths)
        if record is not None and record.alive and record.supervisor is not None:
            log.warning("apptainer.run.removed_while_running", run_id=run_id)
            kill_process_groups(record.supervisor)
        paths.files.remove()
        self._stream.forget(run_id)
        log.info("apptainer.run.cleaned_up", run_id=run_id)

    # -- peering (executors.ports.PeerEndpoints) ----------------------------------------

    async def declared_ports(self, run_id: int, image: str) -> list[DeclaredPort]:
        """The ports the run's supervisor listens on for it: the node's ``image_ports``
        for its image (8888 for an image no rule names), as recorded at its start."""
        peering = self._peer_record(run_id)
        return list(peering.ports) if peering is not None else []

    async def run_address(self, run_id: int) -> str | None:
        """The run's host-side loopback address while its supervisor runs."""
        record = read_record(self._paths(run_id))
        if record is None or not self._ours(record) or not record.alive:
            return None
        if record.peering is None:
            raise PeeringUnavailable(
                f"run {run_id} was started without peering (no listeners for it)"
            )
        if record.peering.unavailable is not None:
            raise PeeringUnavailable(record.peering.unavailable)
        return record.peering.address

    def _peer_record(self, run_id: int) -> PeerRecord | None:
        record = read_record(self._paths(run_id))
        return record.peering if record is not None and self._ours(record) else None

    def proxy_placement(self, *, host: str, advertise_host: str | None) -> ProxyPlacement:
        """On ``proxy.host``; runs are told loopback, where their relay (or, with
        ``proxy_network: host``, the host's loopback) answers."""
        return ProxyPlacement(host, advertise_host or "127.0.0.1")

    async def recover_token(self, state: RunState) -> str:
        """From the run's token file, which the node wrote and the container reads."""
        return self._paths(state.run_id).files.read_token()

    async def list_runs(self) -> list[RunState]:
        """Every run of this node with a record on disk, phases rebuilt from the files."""
        runs: list[RunState] = []
        for record in self._read_records():
            verdict = phase_of(record)
            runs.append(
                RunState(
                    run_id=record.run_id,
                    task_id=record.task_id,
                    phase=verdict.phase,
                    reason=verdict.reason,
                    exit_code=verdict.exit_code,
                    trace_context=record.trace_context,
                )
            )
        return sorted(runs, key=lambda state: state.run_id)

    # -- following runs -----------------------------------------------------------------------

    def _relist(self) -> None:
        """Publish every run's current phase and follow the running ones (after a restart)."""
        for record in self._read_records():
            self._take_up(record, phase_of(record))

    def _take_up(self, record: RunRecord, verdict: Verdict) -> None:
        run_id = record.run_id
        self._gpus.observe(run_id, record.labels, ended=verdict.phase.is_terminal)
        if verdict.phase is Phase.RUNNING and record.supervisor is not None:
            self._follow(run_id, record.supervisor)
            self._stream.publish(RunEvent.now(run_id, Phase.RUNNING))
            self._arm_deadline(run_id, record.supervisor, record.deadline_seconds)
            return
        self._publish(record, verdict)

    def _follow(self, run_id: int, supervisor: Supervisor) -> None:
        """Watch the supervisor's exit with a pidfd on the event loop."""
        if run_id in self._pidfds:
            return
        try:
            fd = os.pidfd_open(supervisor.pid)
        except ProcessLookupError:
            self._loop_().call_soon(self._settle, run_id)
            return
        if not process_alive(supervisor.pid, supervisor.starttime):
            os.close(fd)  # gone already, or the pid now belongs to another process
            self._loop_().call_soon(self._settle, run_id)
            return
        self._pidfds[run_id] = fd
        self._loop_().add_reader(fd, self._on_supervisor_exit, run_id)

    def _unwatch(self, run_id: int) -> None:
        fd = self._pidfds.pop(run_id, None)
        if fd is None:
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.remove_reader(fd)
        os.close(fd)

    def _on_supervisor_exit(self, run_id: int) -> None:
        self._unwatch(run_id)
        self._settle(run_id)

    def _settle(self, run_id: int) -> None:
        """The supervisor is gone: read the record once and publish the run's end."""
        self._disarm(run_id)
        if run_id in self._gone:
            return
        record = read_record(self._paths(run_id))
        if record is None:
            return
        self._publish(record, phase_of(record))

    def _publish(self, record: RunRecord, verdict: Verdict) -> None:
        run_id = record.run_id
        self._gpus.observe(run_id, record.labels, ended=verdict.phase.is_terminal)
        if not verdict.phase.is_terminal:
            self._stream.publish(verdict.event(run_id))
            return
        if self._stream.publish_end(verdict.event(run_id), ran=record.supervisor is not None):
            log.info(
                "apptainer.run.ended",
                run_id=run_id,
                phase=verdict.phase.value,
                reason=verdict.reason.value if verdict.reason else None,
                exit_code=verdict.exit_code,
            )

    # -- stopping runs ------------------------------------------------------------------------

    def _arm_deadline(self, run_id: int, supervisor: Supervisor, deadline_seconds: int) -> None:
        if deadline_seconds <= 0 or run_id in self._deadlines:
            return
        delay = supervisor.started_at + deadline_seconds - _now()
        self._deadlines[run_id] = self._loop_().call_later(
            max(0.0, delay), self._on_deadline, run_id
        )

    def _disarm(self, run_id: int) -> None:
        """Cancel the run's deadline and backstop timers, if armed."""
        for timers in (self._deadlines, self._backstops):
            handle = timers.pop(run_id, None)
            if handle is not None:
                handle.cancel()

    def _on_deadline(self, run_id: int) -> None:
        self._deadlines.pop(run_id, None)
        paths = self._paths(run_id)
        record = read_record(paths)
        if record is None or not record.alive or record.supervisor is None:
            return
        paths.mark_deadline()
        log.warning(
            "apptainer.run.deadline_passed", run_id=run_id, deadline_seconds=record.deadline_seconds
        )
        self._terminate(run_id, record.supervisor)

    def _terminate(self, run_id: int, supervisor: Supervisor) -> None:
        """Ask the supervisor to stop the run; SIGKILL both groups if it does not end in time."""
        fd = self._pidfds.get(run_id)
        try:
            if fd is not None:
                signal.pidfd_send_signal(fd, signal.SIGTERM)
            elif process_alive(supervisor.pid, supervisor.starttime):
                os.kill(supervisor.pid, signal.SIGTERM)
            else:
                return
        except ProcessLookupError:
            return
        if run_id not in self._backstops:
            delay = self._settings.kill_grace_seconds + _BACKSTOP_MARGIN
            self._backstops[run_id] = self._loop_().call_later(
                delay, self._backstop, run_id, supervisor
            )

    def _backstop(self, run_id: int, supervisor: Supervisor) -> None:
        self._backstops.pop(run_id, None)
        if process_alive(supervisor.pid, supervisor.starttime):
            log.warning("apptainer.run.supervisor_unresponsive", run_id=run_id, pid=supervisor.pid)
            kill_process_groups(supervisor)

    # -- plumbing -----------------------------------------------------------------------------

    def _read_records(self) -> list[RunRecord]:
        found = []
        for paths in records(self._context.task_dir):
            if paths.run_id in self._gone:
                continue
            record = read_record(paths)
            if record is not None and self._ours(record):
                found.append(record)
        return found

    def _ours(self, record: RunRecord) -> bool:
        return record.labels.get(LABEL_NODE) == self._context.node_name

    def _record_start_error(self, paths: RunPaths, message: str) -> None:
        if read_json(paths.exit) is None:
            write_json(paths.exit, Exit(start_error=message)._asdict())

    async def _version(self, binary: str) -> str:
        """``apptainer --version``; refuses apptainer older than :data:`MIN_APPTAINER`."""
        try:
            process = await asyncio.create_subprocess_exec(
                binary,
                "--version",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **self._settings.apptainer_environment},
            )
            out, _ = await asyncio.wait_for(
                process.communicate(), timeout=self._settings.call_timeout_seconds
            )
        except (OSError, TimeoutError) as exc:
            raise ExecutorError(f"could not run {binary} --version: {exc!r}") from exc
        text = out.decode(errors="replace").strip()
        if process.returncode != 0:
            raise ExecutorError(f"{binary} --version failed ({process.returncode}): {text}")
        match = _VERSION.search(text)
        if match is None:
            log.warning("apptainer.version_unknown", output=text)
            return text
        product, major, minor = match.group(1).lower(), int(match.group(2)), int(match.group(3))
        if product == "apptainer" and (major, minor) < MIN_APPTAINER:
            raise ExecutorError(
                f"{binary} is {text}; fednode needs apptainer "
                f"{'.'.join(map(str, MIN_APPTAINER))} or newer"
            )
        return text

    def _paths(self, run_id: int) -> RunPaths:
        return RunPaths(self._context.task_dir, run_id)

    def _binary_path(self) -> str:
        if self._binary is None:
            raise ExecutorError("the apptainer executor is not open")
        return self._binary

    def _image_cache(self) -> ImageCache:
        if self._images is None:
            raise ExecutorError("the apptainer executor is not open")
        return self._images

    def _loop_(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise ExecutorError("the apptainer executor is not open")
        return self._loop


def _require_pidfd() -> None:
    """Runs are followed with pidfds (Linux >= 5.3); say so plainly where there are none."""
    try:
        fd = os.pidfd_open(os.getpid())
    except (AttributeError, OSError) as exc:
        raise ExecutorError(
            f"the apptainer executor follows runs with pidfds (Linux 5.3 or newer): {exc!r}"
        ) from exc
    os.close(fd)


def _prepare_directories(task_dir: Path, images: ImageCache) -> None:
    task_dir.mkdir(parents=True, exist_ok=True)
    images.prepare()


def _has_record(paths: RunPaths) -> bool:
    return paths.record.exists()


def _parse_report(out: bytes, err: bytes) -> dict[str, Any]:
    """The launcher's one JSON line; an ``error`` document when there is none."""
    for line in reversed(out.decode(errors="replace").splitlines()):
        with contextlib.suppress(json.JSONDecodeError):
            document = json.loads(line)
            if isinstance(document, dict):
                return document
    detail = err.decode(errors="replace").strip()[-2000:] or "no output"
    return {"error": f"the run's supervisor gave no report: {detail}"}


def kill_process_groups(supervisor: Supervisor) -> None:
    """SIGKILL apptainer's process group, then the supervisor's (its session), if it lives."""
    if not process_alive(supervisor.pid, supervisor.starttime):
        return
    for group in (supervisor.child_pid, supervisor.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


def _now() -> float:
    return time.time()
