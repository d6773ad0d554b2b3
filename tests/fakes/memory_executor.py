"""An IN-MEMORY TEST EXECUTOR: runs are asyncio tasks that pretend to be containers.

Not a runtime and not shipped: it isolates nothing and runs no image. It exists so that
the node's run lifecycle can be tested in milliseconds, and it proves it keeps the executor
contract by passing the executor conformance suite (``tests/conformance/memory_harness.py``).

A :class:`MemoryRuntime` plays the runtime (a podman service, a cluster): it holds the
runs, each driven by its own task, and outlives the :class:`MemoryExecutor` instances
opened over it, so a test can "restart the node" by closing one executor and opening
another over the same runtime — runs keep going, and the new instance reports what it
finds, as the real executors do.

A run does what its input says, read as the conformance probe's JSON
(``tests/conformance/behaviour/behave.py``: ``exit_code``, ``sleep``, ``output``, ``log``);
any other input is a run that succeeds at once with no output. Images exist only if the
runtime was told of them (``images``; ``None``: every image exists). The run files are
written under ``task_dir`` like the file-sharing executors do (:class:`RunFiles`), so the
node can read a token back from them. Tests may make the runtime misbehave:
``refuse_starts`` (``start`` fails after the run files were written, as a runtime that
rejects the container does) and ``broken_collect``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from executors.base import ExecutorError, ProxyPlacement, UnknownRun
from executors.runfiles import RunFiles
from executors.spec import Phase, Reason, RunEvent, RunOutput, RunSpec, RunState

_CLOSED = None


@dataclass
class MemoryRun:
    """One pretend container."""

    spec: RunSpec
    phase: Phase = Phase.STARTING
    reason: Reason | None = None
    exit_code: int | None = None
    output: bytes = b""
    log: str = ""
    kill_requested: bool = False
    program: asyncio.Task[None] | None = field(default=None, repr=False)


class MemoryRuntime:
    """The runs of in-memory test executors; shared by every executor opened over it."""

    def __init__(self, *, task_dir: Path, images: set[str] | None = None) -> None:
        self.task_dir = task_dir
        self.images = images
        self.runs: dict[int, MemoryRun] = {}
        self.refuse_starts: str | None = None
        self.broken_collect: Exception | None = None
        self.started: list[int] = []
        self._listeners: list[asyncio.Queue[RunEvent | None]] = []

    def subscribe(self) -> asyncio.Queue[RunEvent | None]:
        queue: asyncio.Queue[RunEvent | None] = asyncio.Queue()
        self._listeners.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[RunEvent | None]) -> None:
        if queue in self._listeners:
            self._listeners.remove(queue)
        queue.put_nowait(_CLOSED)

    def publish(self, run: MemoryRun, *, message: str = "") -> None:
        event = RunEvent.now(
            run.spec.run_id, run.phase, run.reason, exit_code=run.exit_code, message=message
        )
        for queue in self._listeners:
            queue.put_nowait(event)

    def launch(self, spec: RunSpec) -> None:
        """Create the run and its program (synchronously: a kill right after finds it)."""
        run = self.runs[spec.run_id] = MemoryRun(spec)
        self.started.append(spec.run_id)
        self.publish(run)
        run.program = asyncio.create_task(self._program(run), name=f"memory-run-{spec.run_id}")
        run.program.add_done_callback(lambda _: self._killed_unless_ended(run))

    def _killed_unless_ended(self, run: MemoryRun) -> None:
        """A program cancelled before it began (a kill racing the start) ends killed too."""
        if not run.phase.is_terminal and run.kill_requested:
            self._end(run, Phase.KILLED, Reason.KILLED, "killed")

    async def _program(self, run: MemoryRun) -> None:
        spec = run.spec
        if self.images is not None and spec.image not in self.images:
            self._end(run, Phase.FAILED, Reason.IMAGE_NOT_FOUND, f"image {spec.image} not found")
            return
        behaviour = _behaviour(spec.input)
        run.phase = Phase.RUNNING
        self.publish(run)
        run.log = f"{behaviour.get('log', 'behave: started')}\nbehave: on stderr\n"
        try:
            await asyncio.wait_for(
                asyncio.sleep(float(behaviour.get("sleep", 0))), spec.deadline_seconds
            )
        except TimeoutError:
            self._end(run, Phase.FAILED, Reason.DEADLINE_EXCEEDED, "deadline exceeded")
            return
        except asyncio.CancelledError:
            self._end(run, Phase.KILLED, Reason.KILLED, "killed")
            return
        run.output = str(behaviour.get("output", "")).encode()
        run.exit_code = int(behaviour.get("exit_code", 0))
        if run.exit_code == 0:
            self._end(run, Phase.SUCCEEDED, Reason.COMPLETED)
        else:
            self._end(run, Phase.FAILED, Reason.CRASHED)

    def _end(self, run: MemoryRun, phase: Phase, reason: Reason, message: str = "") -> None:
        run.phase, run.reason = phase, reason
        self.publish(run, message=message)

    def kill(self, run_id: int) -> None:
        run = self.runs.get(run_id)
        if run is None or run.phase.is_terminal:
            return
        run.kill_requested = True
        if run.program is not None:
            run.program.cancel()

    async def aclose(self) -> None:
        """Stop every program still going (the end of a test)."""
        programs = [r.program for r in self.runs.values() if r.program and not r.program.done()]
        for program in programs:
            program.cancel()
        for program in programs:
            with contextlib.suppress(asyncio.CancelledError):
                await program


class MemoryExecutor:
    """An in-memory test executor over a :class:`MemoryRuntime`; see the module docstring."""

    kind: ClassVar[str] = "memory"

    def __init__(self, runtime: MemoryRuntime) -> None:
        self.runtime = runtime
        self._queue: asyncio.Queue[RunEvent | None] | None = None

    async def open(self) -> None:
        """Follow the runtime; what is already there is reported as it is now."""
        self._queue = self.runtime.subscribe()
        for run in self.runtime.runs.values():
            if run.phase is not Phase.STARTING:
                self._queue.put_nowait(
                    RunEvent.now(run.spec.run_id, run.phase, run.reason, exit_code=run.exit_code)
                )

    async def close(self) -> None:
        if self._queue is not None:
            self.runtime.unsubscribe(self._queue)
            self._queue = None

    async def start(self, spec: RunSpec) -> None:
        if spec.run_id in self.runtime.runs:
            return
        files = RunFiles(self.runtime.task_dir, spec.run_id)
        files.prepare(spec)
        if self.runtime.refuse_starts is not None:
            raise ExecutorError(self.runtime.refuse_starts)
        self.runtime.launch(spec)

    async def kill(self, run_id: int) -> None:
        self.runtime.kill(run_id)

    async def events(self) -> AsyncIterator[RunEvent]:
        queue = self._queue
        if queue is None:
            return
        while (event := await queue.get()) is not _CLOSED:
            yield event

    async def collect(self, run_id: int) -> RunOutput:
        if self.runtime.broken_collect is not None:
            raise self.runtime.broken_collect
        run = self.runtime.runs.get(run_id)
        if run is None:
            raise UnknownRun(run_id)
        return RunOutput(run.output, run.log)

    async def cleanup(self, run_id: int) -> None:
        run = self.runtime.runs.pop(run_id, None)
        if run is not None and run.program is not None and not run.program.done():
            run.program.cancel()
        RunFiles(self.runtime.task_dir, run_id).remove()

    async def list_runs(self) -> list[RunState]:
        return [
            RunState(
                run_id=run.spec.run_id,
                task_id=run.spec.task_id,
                phase=run.phase,
                reason=run.reason,
                exit_code=run.exit_code,
                trace_context=dict(run.spec.trace_context),
                sealed_token=run.spec.sealed_token,
            )
            for run in self.runtime.runs.values()
        ]

    def proxy_placement(self, *, host: str, advertise_host: str | None) -> ProxyPlacement:
        return ProxyPlacement(host, advertise_host or host)

    async def recover_token(self, state: RunState) -> str:
        """From the run's token file, as the file-sharing executors do."""
        return RunFiles(self.runtime.task_dir, state.run_id).read_token()


def _behaviour(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
