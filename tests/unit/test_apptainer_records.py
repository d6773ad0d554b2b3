"""Reading an apptainer run's record back into a phase: the same before and after a restart."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from executors.apptainer.records import (
    Exit,
    RunPaths,
    RunRecord,
    Supervisor,
    phase_of,
    process_alive,
    process_stat,
    read_record,
    records,
)
from executors.spec import Phase, Reason

SUPERVISOR = Supervisor(pid=4242, starttime=1, child_pid=4243, started_at=0.0)


def status(**fields: Any) -> RunRecord:
    values: dict[str, Any] = {
        "run_id": 1,
        "task_id": 2,
        "labels": {},
        "deadline_seconds": 60,
        "supervisor": SUPERVISOR,
        "exit": None,
        "alive": False,
        "killed": False,
        "deadline_passed": False,
        "fatal": None,
    }
    values.update(fields)
    return RunRecord(**values)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"supervisor": None}, (Phase.STARTING, None, None)),
        ({"supervisor": None, "killed": True}, (Phase.KILLED, Reason.KILLED, None)),
        ({"alive": True}, (Phase.RUNNING, None, None)),
        ({"exit": Exit(exit_code=0)}, (Phase.SUCCEEDED, Reason.COMPLETED, 0)),
        ({"exit": Exit(exit_code=3)}, (Phase.FAILED, Reason.CRASHED, 3)),
        ({"exit": Exit(signal=signal.SIGSEGV)}, (Phase.FAILED, Reason.CRASHED, 139)),
        ({"exit": Exit(signal=signal.SIGKILL)}, (Phase.FAILED, Reason.OOM_KILLED, 137)),
        (
            {"exit": Exit(signal=signal.SIGTERM), "killed": True},
            (Phase.KILLED, Reason.KILLED, 143),
        ),
        (
            {"exit": Exit(signal=signal.SIGKILL), "killed": True},
            (Phase.KILLED, Reason.KILLED, 137),
        ),
        (
            {"exit": Exit(signal=signal.SIGTERM), "deadline_passed": True},
            (Phase.FAILED, Reason.DEADLINE_EXCEEDED, 143),
        ),
        (
            {"exit": Exit(exit_code=255), "fatal": "FATAL:   container creation failed"},
            (Phase.FAILED, Reason.START_FAILED, 255),
        ),
        ({"exit": Exit(exit_code=255)}, (Phase.FAILED, Reason.CRASHED, 255)),
        ({"exit": Exit(start_error="no python")}, (Phase.FAILED, Reason.START_FAILED, None)),
        ({}, (Phase.FAILED, Reason.LOST, None)),  # supervisor gone without a record
        ({"killed": True}, (Phase.KILLED, Reason.KILLED, None)),
        ({"deadline_passed": True}, (Phase.FAILED, Reason.DEADLINE_EXCEEDED, None)),
    ],
)
def test_what_the_files_say_is_the_phase(
    fields: dict[str, Any], expected: tuple[Phase, Reason | None, int | None]
) -> None:
    verdict = phase_of(status(**fields))

    assert (verdict.phase, verdict.reason, verdict.exit_code) == expected


def test_messages_say_what_happened() -> None:
    assert "code 3" in phase_of(status(exit=Exit(exit_code=3))).message
    assert "SIGSEGV" in phase_of(status(exit=Exit(signal=signal.SIGSEGV))).message
    fatal = phase_of(status(exit=Exit(exit_code=255), fatal="FATAL:   mount source gone"))
    assert "mount source gone" in fatal.message
    deadline = phase_of(status(exit=Exit(signal=15), deadline_passed=True, deadline_seconds=9))
    assert "9 s" in deadline.message


def test_a_record_is_read_with_its_marks_and_the_fatal_line_of_the_log(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path, 5)
    paths.state.mkdir(parents=True)
    labels = {"fednode.io/node": "n1", "fednode.io/traceparent": "00-aa-bb-01"}
    paths.record.write_text(json.dumps({"task_id": 9, "labels": labels, "deadline_seconds": 30}))
    paths.supervisor.write_text(
        json.dumps({"pid": 1, "starttime": 0, "child_pid": 2, "started_at": 1.5})
    )
    paths.exit.write_text(json.dumps({"exit_code": 255}))
    paths.log.write_text("algorithm says hi\nFATAL:   could not open image x.sif\n")
    paths.files.mark_killed()

    read = read_record(paths)

    assert read is not None
    assert (read.task_id, read.deadline_seconds, read.killed) == (9, 30, True)
    assert read.supervisor == Supervisor(pid=1, starttime=0, child_pid=2, started_at=1.5)
    assert read.exit == Exit(exit_code=255)
    assert read.fatal == "FATAL:   could not open image x.sif"
    assert read.trace_context == {"traceparent": "00-aa-bb-01"}
    assert [p.run_id for p in records(tmp_path)] == [5]


def test_no_record_no_run(tmp_path: Path) -> None:
    RunPaths(tmp_path, 6).files.mark_killed()  # a kill mark alone is no run

    assert read_record(RunPaths(tmp_path, 6)) is None
    assert list(records(tmp_path)) == []
    assert list(records(tmp_path / "missing")) == []


def test_a_process_is_alive_only_with_the_start_time_it_recorded() -> None:
    stat = process_stat(os.getpid())
    assert stat is not None
    _state, started = stat

    assert process_alive(os.getpid(), started)
    assert not process_alive(os.getpid(), started + 1)  # a reused pid is not ours
    assert not process_alive(2**22 + 1, started)  # above pid_max: never a process
