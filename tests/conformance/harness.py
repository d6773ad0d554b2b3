"""The executor conformance suite's contract with each runtime: a :class:`Harness`.

The tests in this folder say what every executor must do (start, report each phase once,
kill, enforce deadlines and memory limits, fail fast on a missing image, survive a restart,
clean up). They never name a runtime. Each runtime provides a harness that knows how to
express "a run that exits with code N / sleeps S seconds / needs too much memory / uses an
image that does not exist" for that runtime, opens executors, and looks at the runtime's
own objects. A new executor joins the suite by writing one harness and adding its kind to
``KINDS`` in ``conftest.py``.

Runs ask for behaviour through :class:`Behaviour`, the input of the probe algorithm in
``behaviour/behave.py`` (vantage6 4.x file contract): the podman harness builds an image
from it; a fake runtime can interpret the same JSON itself.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from executors.base import Executor
from executors.runfiles import RunFiles
from executors.spec import DatabaseMount, Phase, ProxyEndpoint, Resources, RunEvent, RunSpec
from node.contract import container_environment

DATA_DIR = Path(__file__).resolve().parents[2] / "algorithms" / "data"
#: ``partial_average("age")`` over ``employees_a.csv`` (algorithms/README.md).
AVERAGE_CSV = DATA_DIR / "employees_a.csv"
AVERAGE_EXPECTED = {"sum": 400, "count": 10}
#: Things a runtime may be unable to show (a fake binary cannot run out of memory).
#: ``output-files``: the run's output is a file the node reads back (the hostile-output tests).
CAPABILITIES = frozenset({"oom", "network", "algorithms", "restart", "output-files"})


@dataclass(frozen=True)
class Behaviour:
    """What a probe run does: the JSON input of ``behaviour/behave.py``."""

    exit_code: int = 0
    sleep: float = 0.0
    allocate_mb: int = 0
    output: str = ""
    log: str = "behave: started"
    #: Attacks: replace the output with a link to this path; make it this large (sparse).
    output_link: str = ""
    output_size: int = 0
    #: ``{"env": [names], "paths": [paths]}``: the output reports them (injected devices).
    describe: dict[str, list[str]] = field(default_factory=dict)

    def to_input(self) -> bytes:
        return json.dumps(asdict(self)).encode()


class Harness(abc.ABC):
    """One runtime's side of the conformance suite."""

    #: The executor kind (``podman``, ``kubernetes``, ``apptainer``).
    kind: ClassVar[str]
    #: The subset of :data:`CAPABILITIES` this runtime can demonstrate.
    supports: ClassVar[frozenset[str]] = CAPABILITIES
    #: Why the others cannot be shown here, and where they are proven instead.
    unsupported_because: ClassVar[str] = ""
    #: Seconds a run takes to go from start to running at worst (scales the timeouts).
    slack: ClassVar[float] = 30.0

    def __init__(self, *, node_name: str, task_dir: Path) -> None:
        self.node_name = node_name
        self.task_dir = task_dir

    # -- what runs look like on this runtime -----------------------------------------------

    @abc.abstractmethod
    def behaviour_image(self) -> str:
        """An image whose entry point is ``behaviour/behave.py``."""

    @abc.abstractmethod
    def average_image(self) -> str:
        """The vantage6 ``average`` algorithm image."""

    @abc.abstractmethod
    def diagnostics_image(self) -> str:
        """The ``diagnostics`` isolation probe image."""

    @abc.abstractmethod
    def missing_image(self) -> str:
        """An image name that exists nowhere (and cannot be pulled)."""

    # -- executors and the runtime's own objects -------------------------------------------

    @abc.abstractmethod
    async def open_executor(self) -> Executor:
        """A new, opened executor instance for this node (a node restart opens another)."""

    @abc.abstractmethod
    async def object_exists(self, run_id: int) -> bool:
        """Whether the runtime still has an object (container, Job) for the run."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what the harness made (executors are closed by the fixture)."""

    # -- specs (shared) --------------------------------------------------------------------

    def spec(
        self,
        run_id: int,
        behaviour: Behaviour = Behaviour(),
        **fields: Any,
    ) -> RunSpec:
        """A probe run that behaves as told; ``fields`` override RunSpec fields."""
        return self._spec(run_id, self.behaviour_image(), behaviour.to_input(), **fields)

    def average_spec(self, run_id: int, *, column: str = "age") -> RunSpec:
        database = DatabaseMount(
            label="default", type="csv", uri=str(AVERAGE_CSV), is_local_path=True
        )
        task_input = {"method": "partial_average", "kwargs": {"column_name": column}}
        return self._spec(
            run_id,
            self.average_image(),
            json.dumps(task_input).encode(),
            databases=(database,),
            requested=[{"label": "default"}],
        )

    def diagnostics_spec(
        self, run_id: int, *, targets: list[str] | None = None, **fields: Any
    ) -> RunSpec:
        """The diagnostics probe; ``targets`` (``host:port``) replace its internet targets."""
        kwargs: dict[str, Any] = {"timeout": 1}
        if targets is not None:
            kwargs["targets"] = targets
        task_input = {"method": "diagnose", "kwargs": kwargs}
        return self._spec(
            run_id, self.diagnostics_image(), json.dumps(task_input).encode(), **fields
        )

    def missing_image_spec(self, run_id: int) -> RunSpec:
        return self._spec(run_id, self.missing_image(), Behaviour().to_input())

    def files(self, run_id: int) -> RunFiles:
        return RunFiles(self.task_dir, run_id)

    def _spec(
        self,
        run_id: int,
        image: str,
        task_input: bytes,
        *,
        databases: tuple[DatabaseMount, ...] = (),
        requested: list[dict[str, Any]] | None = None,
        proxy: ProxyEndpoint | None = None,
        resources: Resources | None = None,
        **fields: Any,
    ) -> RunSpec:
        environment = container_environment(
            databases=databases, requested=requested or [], proxy=proxy
        )
        return RunSpec(
            run_id=run_id,
            task_id=1000 + run_id,
            organization_id=1,
            collaboration_id=1,
            image=image,
            input=task_input,
            environment=environment,
            databases=databases,
            proxy=proxy,
            resources=resources or Resources(cpu=1.0, memory_mb=256),
            deadline_seconds=fields.pop("deadline_seconds", 600),
            **fields,
        )


class EventRecorder:
    """Consumes an executor's event stream and lets tests wait for what they expect."""

    def __init__(self, executor: Executor) -> None:
        self.by_run: defaultdict[int, list[RunEvent]] = defaultdict(list)
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._consume(executor), name="conformance-events")

    async def _consume(self, executor: Executor) -> None:
        async for event in executor.events():
            async with self._changed:
                self.by_run[event.run_id].append(event)
                self._changed.notify_all()

    def phases(self, run_id: int) -> list[Phase]:
        return [event.phase for event in self.by_run[run_id]]

    async def wait_for(self, run_id: int, phase: Phase, *, timeout: float) -> RunEvent:
        """The first event of ``run_id`` with ``phase`` (``timeout`` seconds at most)."""
        return await self._wait(run_id, lambda e: e.phase is phase, timeout)

    async def terminal(self, run_id: int, *, timeout: float) -> RunEvent:
        """The run's terminal event."""
        return await self._wait(run_id, lambda e: e.phase.is_terminal, timeout)

    async def _wait(self, run_id: int, match: Any, timeout: float) -> RunEvent:
        def found() -> RunEvent | None:
            return next((e for e in self.by_run[run_id] if match(e)), None)

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: found() is not None), timeout)
            except TimeoutError:
                raise AssertionError(
                    f"run {run_id}: expected event not seen in {timeout} s; "
                    f"saw {self.phases(run_id)}"
                ) from None
        event = found()
        assert event is not None
        return event

    async def settle(self, seconds: float = 0.5) -> None:
        """Give late duplicates a chance to show up (used before asserting "exactly once")."""
        await asyncio.sleep(seconds)

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@dataclass
class ExecutorUnderTest:
    """An opened executor, its event recorder and its runtime's harness."""

    harness: Harness
    executor: Executor
    events: EventRecorder
    _closed: list[Executor] = field(default_factory=list)

    async def restart(self, *, down_for: float = 0.0) -> None:
        """Close this executor instance (runs keep running), wait ``down_for`` seconds, and
        open a new one, as a node restart does; the recorder follows the new instance."""
        await self.events.aclose()
        await self.executor.close()
        self._closed.append(self.executor)
        await asyncio.sleep(down_for)
        self.executor = await self.harness.open_executor()
        self.events = EventRecorder(self.executor)

    async def aclose(self) -> None:
        await self.events.aclose()
        await self.executor.close()
