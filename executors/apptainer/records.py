"""A run's record on disk, and what it means: apptainer keeps no state, so fednode does.

apptainer has no daemon and no list of containers: a run is a process tree. Everything a
restarted node needs to find and judge its runs is therefore written beside the run's
files, in ``<task_dir>/run-<id>/apptainer/``::

    run.json         the record (written by the executor before launch): labels, the
                     deadline, the supervisor's plan (argv, environment, network) and,
                     with peering, the run's host-side address and declared ports
    supervisor.json  written by the supervisor once apptainer runs: its pid and start time
                     (to tell it from a reused pid), apptainer's pid, when it started
    exit.json        written by the supervisor last: exit code, signal, or why it could
                     not start
    deadline         the node's mark that it ended the run for passing its deadline
    env, log, work/  the container's --env-file, apptainer's output, its --workdir

plus :class:`~executors.runfiles.RunFiles`' ``killed`` mark one level up. The directory
is never bound into the container (the run's files are bound one by one), so a run cannot
forge its own record.

:func:`phase_of` turns a :class:`RunRecord` into a phase and reason, the same way before
and after a restart. File access here is small, local and synchronous, like ``RunFiles``.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from executors.base import ANNOTATION_TRACEPARENT
from executors.outputs import read_log_tail
from executors.ports import DeclaredPort
from executors.runfiles import RunFiles
from executors.spec import Phase, Reason
from executors.verdict import Verdict

STATE_DIR_NAME = "apptainer"
#: apptainer's own fatal errors (``sylog.Fatalf``) start so and exit 255.
FATAL_PREFIX = "FATAL:"
FATAL_EXIT_CODE = 255
_LOG_TAIL_BYTES = 16 * 1024


class RunPaths:
    """The paths of one run's record (and its ``RunFiles``)."""

    def __init__(self, task_dir: Path, run_id: int) -> None:
        self.run_id = run_id
        self.files = RunFiles(task_dir, run_id)
        self.state = self.files.directory / STATE_DIR_NAME

    @property
    def record(self) -> Path:
        return self.state / "run.json"

    @property
    def supervisor(self) -> Path:
        return self.state / "supervisor.json"

    @property
    def exit(self) -> Path:
        return self.state / "exit.json"

    @property
    def deadline_marker(self) -> Path:
        return self.state / "deadline"

    @property
    def env_file(self) -> Path:
        return self.state / "env"

    @property
    def log(self) -> Path:
        return self.state / "log"

    @property
    def workdir(self) -> Path:
        return self.state / "work"

    def mark_deadline(self) -> None:
        self.deadline_marker.touch()

    async def read_log(self, *, limit: int) -> str:
        """The last ``limit`` bytes of apptainer's output (what the container printed)."""
        return await read_log_tail(
            self.files.task_dir,
            f"{self.files.directory.name}/{STATE_DIR_NAME}",
            self.log.name,
            limit=limit,
        )


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write ``document`` so a reader sees the old file or the whole new one, never half."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(document))
    temporary.replace(path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return document if isinstance(document, dict) else None


class Supervisor(NamedTuple):
    """The supervisor process of a run, as it recorded itself."""

    pid: int
    starttime: int  # /proc/<pid>/stat field 22: tells a reused pid from ours
    child_pid: int  # apptainer's pid, also its process group id
    started_at: float  # wall clock, seconds since the epoch

    @classmethod
    def from_document(cls, document: Mapping[str, Any] | None) -> Supervisor | None:
        if document is None:
            return None
        try:
            return cls(
                pid=int(document["pid"]),
                starttime=int(document["starttime"]),
                child_pid=int(document["child_pid"]),
                started_at=float(document["started_at"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


class Exit(NamedTuple):
    """How apptainer ended: an exit code, a signal, or why it never started."""

    exit_code: int | None = None
    signal: int | None = None
    start_error: str | None = None

    @classmethod
    def from_document(cls, document: Mapping[str, Any] | None) -> Exit | None:
        if document is None:
            return None
        code, sig, error = (
            document.get("exit_code"),
            document.get("signal"),
            document.get("start_error"),
        )
        return cls(
            exit_code=code if isinstance(code, int) else None,
            signal=sig if isinstance(sig, int) else None,
            start_error=str(error) if error is not None else None,
        )

    @property
    def shell_code(self) -> int | None:
        """The exit code as a shell reports it (128 + signal for a signalled process)."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code


class PeerRecord(NamedTuple):
    """A run's part in peering as its record says: where the node reaches it and on which
    ports, or why it takes no part (``unavailable``)."""

    address: str | None = None
    ports: tuple[DeclaredPort, ...] = ()
    unavailable: str | None = None

    @classmethod
    def from_document(cls, document: object) -> PeerRecord | None:
        if not isinstance(document, Mapping):
            return None
        address, unavailable = document.get("address"), document.get("unavailable")
        ports = []
        for entry in document.get("ports") or ():
            try:
                port, label = entry
                ports.append(DeclaredPort(int(port), None if label is None else str(label)))
            except (TypeError, ValueError):
                continue
        return cls(
            address=str(address) if address else None,
            ports=tuple(ports),
            unavailable=str(unavailable) if unavailable else None,
        )

    def document(self) -> dict[str, Any]:
        if self.unavailable is not None:
            return {"unavailable": self.unavailable}
        return {"address": self.address, "ports": [list(port) for port in self.ports]}


class RunRecord(NamedTuple):
    """A run's record as read from its files (and ``/proc``): what :func:`phase_of` reads.

    Not to be confused with the server's run status (``node.server.models.RunStatus``),
    which the node derives from the phase this record leads to.
    """

    run_id: int
    task_id: int
    labels: Mapping[str, str]
    deadline_seconds: int
    supervisor: Supervisor | None
    exit: Exit | None
    alive: bool
    killed: bool
    deadline_passed: bool
    fatal: str | None  # apptainer's FATAL line, when it exited 255
    peering: PeerRecord | None = None  # None: started with peering off

    @property
    def trace_context(self) -> dict[str, str]:
        traceparent = self.labels.get(ANNOTATION_TRACEPARENT)
        return {"traceparent": traceparent} if traceparent else {}


def read_record(paths: RunPaths) -> RunRecord | None:
    """The run's record from its files; ``None`` if it has no (readable) record."""
    record = read_json(paths.record)
    if record is None:
        return None
    supervisor = Supervisor.from_document(read_json(paths.supervisor))
    ended = Exit.from_document(read_json(paths.exit))
    alive = (
        ended is None
        and supervisor is not None
        and process_alive(supervisor.pid, supervisor.starttime)
    )
    if ended is None and supervisor is not None and not alive:
        # It may have written exit.json just before we looked at /proc: look again.
        ended = Exit.from_document(read_json(paths.exit))
    fatal = None
    if ended is not None and ended.exit_code == FATAL_EXIT_CODE:
        fatal = fatal_line(paths.log)
    labels = record.get("labels") or {}
    return RunRecord(
        run_id=paths.run_id,
        task_id=int(record.get("task_id", 0)),
        labels={str(k): str(v) for k, v in labels.items()},
        deadline_seconds=int(record.get("deadline_seconds", 0)),
        supervisor=supervisor,
        exit=ended,
        alive=alive,
        killed=paths.files.killed,
        deadline_passed=paths.deadline_marker.exists(),
        fatal=fatal,
        peering=PeerRecord.from_document(record.get("peering")),
    )


def fatal_line(log: Path) -> str | None:
    """The last line apptainer wrote as ``FATAL:`` in the log's tail, if any."""
    try:
        with log.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - _LOG_TAIL_BYTES))
            tail = handle.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    lines = [line.strip() for line in tail.splitlines() if line.startswith(FATAL_PREFIX)]
    return lines[-1] if lines else None


def records(task_dir: Path) -> Iterator[RunPaths]:
    """Every run directory under ``task_dir`` that holds an apptainer record."""
    try:
        entries = list(os.scandir(task_dir))
    except FileNotFoundError:
        return
    for entry in entries:
        name = entry.name
        if not name.startswith("run-") or not name[4:].isdigit():
            continue
        paths = RunPaths(task_dir, int(name[4:]))
        if paths.record.exists():
            yield paths


def process_alive(pid: int, starttime: int) -> bool:
    """Whether ``pid`` is running (not a zombie) and is the process that started then."""
    stat = process_stat(pid)
    if stat is None:
        return False
    state, started = stat
    return started == starttime and state not in ("Z", "X")


def process_stat(pid: int) -> tuple[str, int] | None:
    """State letter and start time (clock ticks after boot) of ``pid``, from ``/proc``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def phase_of(record: RunRecord) -> Verdict:
    """What the run's files say about it.

    An end is classified in this order: could not start (the supervisor's record, or
    apptainer's own FATAL error with exit 255); killed on request (the node's mark);
    deadline (the node's mark); SIGKILL without either mark (the kernel's OOM killer is
    what sends it, as on podman); exit 0; any other code or signal: crashed.
    A supervisor that vanished without a record ended with the node's kill or deadline
    mark if there is one, else the run is ``lost``.
    """
    ended = record.exit
    if ended is None:
        if record.supervisor is None:
            if record.killed:
                return Verdict(Phase.KILLED, Reason.KILLED, message="killed before it started")
            return Verdict(Phase.STARTING)
        if record.alive:
            return Verdict(Phase.RUNNING)
        if record.killed:
            return Verdict(Phase.KILLED, Reason.KILLED)
        if record.deadline_passed:
            return _deadline(record, None)
        return Verdict(
            Phase.FAILED, Reason.LOST, message="its supervisor process vanished without a record"
        )
    if ended.start_error is not None:
        return Verdict(
            Phase.FAILED, Reason.START_FAILED, message=f"could not start: {ended.start_error}"
        )
    code = ended.shell_code
    if record.killed:
        return Verdict(Phase.KILLED, Reason.KILLED, code)
    if record.deadline_passed:
        return _deadline(record, code)
    if ended.exit_code == FATAL_EXIT_CODE and record.fatal is not None:
        return Verdict(Phase.FAILED, Reason.START_FAILED, code, f"apptainer: {record.fatal}")
    if ended.signal == signal.SIGKILL:
        return Verdict(
            Phase.FAILED,
            Reason.OOM_KILLED,
            code,
            "the run was killed by SIGKILL, most likely for using more memory than its limit",
        )
    if code == 0:
        return Verdict(Phase.SUCCEEDED, Reason.COMPLETED, 0)
    if ended.signal is not None:
        name = _signal_name(ended.signal)
        return Verdict(Phase.FAILED, Reason.CRASHED, code, f"the algorithm was killed by {name}")
    return Verdict(Phase.FAILED, Reason.CRASHED, code, f"the algorithm exited with code {code}")


def _deadline(record: RunRecord, code: int | None) -> Verdict:
    return Verdict(
        Phase.FAILED,
        Reason.DEADLINE_EXCEEDED,
        code,
        f"the run passed its deadline of {record.deadline_seconds} s and was killed",
    )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
