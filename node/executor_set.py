"""Several executors behind the one ``Executor`` interface, each run going to one of them.

A node may configure ``executors:`` — say Kubernetes for OCI images and apptainer on an
HPC host for SIF files, or podman next to a GPU partition. :class:`Routes` decides which
executor a run goes to (pure, from the run's image and resource profile): the first
executor whose route matches — an image pattern matching the WHOLE reference, the
reference's scheme (``oras://``, ``library://``, ``docker://``, a ``*.sif`` file), or the
run's profile — else the first executor, the default. The node writes the choice on the
spec as the label :data:`LABEL_EXECUTOR`, so it is on the run's runtime object too.

:class:`ExecutorSet` is what the lifecycle talks to: ``start`` hands the spec to the
executor its label names; ``kill``, ``collect``, ``cleanup`` and ``recover_token`` go to
the executor that has the run (remembered from ``start``, and from ``list_runs``, which
asks every executor — so after a restart, reconcile's listing tells the set where each
run is); ``events`` merges every executor's stream. A stream that breaks breaks the
merged one (the node's consumer then stops the node, as with one executor).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from common.logging import get_logger
from executors.base import Executor, ExecutorError, ProxyPlacement
from executors.ports import DeclaredPort, PeerEndpoints
from executors.spec import RunEvent, RunOutput, RunSpec, RunState

log = get_logger(__name__)

#: The label naming the executor a run went to (on the spec and the runtime's object).
LABEL_EXECUTOR = "fednode.io/executor"
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://")


@dataclass(frozen=True)
class Route:
    """When a run goes to executor ``name`` (see the module docstring)."""

    name: str
    images: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()


def scheme_of(image: str) -> str:
    """``oras``, ``library``, ``docker`` (the scheme, or an OCI name), or ``sif`` for a
    ``*.sif`` file reference."""
    match = _SCHEME.match(image)
    if match is not None:
        return match.group(1)
    return "sif" if image.endswith(".sif") else "docker"


class Routes:
    """Which executor a run goes to; the first route is the default."""

    def __init__(self, routes: Sequence[Route]) -> None:
        if not routes:
            raise ValueError("at least one executor")
        self._routes = [
            (route, [re.compile(pattern) for pattern in route.images]) for route in routes
        ]
        self.default = routes[0].name

    @property
    def names(self) -> list[str]:
        return [route.name for route, _ in self._routes]

    def choose(self, *, image: str, profile: str | None) -> str:
        scheme = scheme_of(image)
        for route, patterns in self._routes:
            if (
                any(rx.fullmatch(image) for rx in patterns)
                or scheme in route.schemes
                or (profile is not None and profile in route.profiles)
            ):
                return route.name
        return self.default


class ExecutorSet:
    """The executors of a node as one; see the module docstring."""

    kind: ClassVar[str] = "set"

    def __init__(self, executors: dict[str, Executor], *, default: str) -> None:
        self._executors = executors
        self._default = default
        self._owner: dict[int, str] = {}
        self._merged: asyncio.Queue[RunEvent | ExecutorError] = asyncio.Queue()
        self._pumps: list[asyncio.Task[None]] = []

    @property
    def members(self) -> dict[str, Executor]:
        return dict(self._executors)

    def executor_of(self, run_id: int) -> str | None:
        """The name of the executor that has the run, if the set knows it."""
        return self._owner.get(run_id)

    async def open(self) -> None:
        """Open every executor in order (closing those opened if one fails), then merge
        their event streams."""
        opened: list[Executor] = []
        try:
            for executor in self._executors.values():
                await executor.open()
                opened.append(executor)
        except BaseException:
            for executor in reversed(opened):
                await executor.close()
            raise
        for name, executor in self._executors.items():
            self._pumps.append(
                asyncio.create_task(self._pump(name, executor), name=f"events-{name}")
            )

    async def close(self) -> None:
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        self._pumps.clear()
        for executor in reversed(self._executors.values()):
            await executor.close()

    async def _pump(self, name: str, executor: Executor) -> None:
        try:
            async for event in executor.events():
                self._merged.put_nowait(event)
            failure = ExecutorError(f"executor {name!r}: its event stream ended")
        except ExecutorError as exc:
            failure = ExecutorError(f"executor {name!r}: {exc}")
        self._merged.put_nowait(failure)

    async def events(self) -> AsyncIterator[RunEvent]:
        while True:
            item = await self._merged.get()
            if isinstance(item, ExecutorError):
                raise item
            yield item

    async def start(self, spec: RunSpec) -> None:
        name = spec.labels.get(LABEL_EXECUTOR, self._default)
        executor = self._executors.get(name)
        if executor is None:
            raise ExecutorError(f"run {spec.run_id} names executor {name!r}, which is not set up")
        self._owner[spec.run_id] = name
        await executor.start(spec)

    async def kill(self, run_id: int) -> None:
        await (await self._of(run_id)).kill(run_id)

    async def collect(self, run_id: int) -> RunOutput:
        return await (await self._of(run_id)).collect(run_id)

    async def cleanup(self, run_id: int) -> None:
        await (await self._of(run_id)).cleanup(run_id)
        self._owner.pop(run_id, None)

    async def list_runs(self) -> list[RunState]:
        """Every executor's runs; the set learns where each run is."""
        runs: list[RunState] = []
        for name, executor in self._executors.items():
            for state in await executor.list_runs():
                self._owner[state.run_id] = name
                runs.append(state)
        return runs

    def proxy_placement(self, *, host: str, advertise_host: str | None) -> ProxyPlacement:
        """The default executor's; the node places the proxy for each member itself."""
        default = self._executors[self._default]
        return default.proxy_placement(host=host, advertise_host=advertise_host)

    # -- peering (executors.ports.PeerEndpoints): the run's own executor answers ----------

    async def declared_ports(self, run_id: int, image: str) -> list[DeclaredPort] | None:
        executor = await self._of(run_id)
        if not isinstance(executor, PeerEndpoints):
            return []
        return await executor.declared_ports(run_id, image)

    async def run_address(self, run_id: int) -> str | None:
        name = self.executor_of(run_id)
        executor = self._executors.get(name) if name is not None else None
        if not isinstance(executor, PeerEndpoints):
            return None
        return await executor.run_address(run_id)

    async def recover_token(self, state: RunState) -> str:
        return await (await self._of(state.run_id)).recover_token(state)

    async def _of(self, run_id: int) -> Executor:
        """The executor that has the run (asking all of them once if the set does not know;
        the default if none has it: its answers for an unknown run stand)."""
        if run_id not in self._owner:
            await self.list_runs()
        return self._executors[self._owner.get(run_id, self._default)]
