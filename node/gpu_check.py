"""``fednode gpu-check``: does a run see exactly the GPUs it was given, on this host?

The executor tests prove fednode asks each runtime for the right devices (stand-in CDI
devices on podman, the extended resource on Kubernetes, ``CUDA_VISIBLE_DEVICES`` for
apptainer); only a host with real GPUs can show that the runtime then gives the
container those GPUs and no others. This check does that through the node's own executor,
built from the node's own configuration: it starts ``runs`` runs at once, each asking for
``gpus`` GPUs, of an image whose entry point writes ``nvidia-smi -L`` into its output
(``algorithms/gpu-probe``), and passes when every run lists exactly ``gpus`` GPUs and no
GPU appears in two runs. The runs carry the node name ``<name>-gpu-check``, so a node
running beside it never takes them for its own.

:func:`judge` is the verdict, pure; :func:`check` does the runs. ``scripts/gpu-check``
runs it on podman (and explains the Kubernetes form) and says SKIPPED where there is no
NVIDIA GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from executors.base import Executor, ExecutorContext, UnknownRun
from executors.outputs import OutputLimits
from executors.registry import load_factory
from executors.spec import (
    CONTAINER_TASK_DIR,
    OUTPUT_FILE_NAME,
    Phase,
    Resources,
    RunEvent,
    RunSpec,
)
from node.settings import NodeSettings

#: ``nvidia-smi -L``: ``GPU 0: NVIDIA H200 (UUID: GPU-1f2e...)``.
_GPU_LINE = re.compile(r"^GPU (\d+): (.*) \(UUID: ([^)]+)\)\s*$")
#: Run ids of the check's runs (far from the server's, which count up from 1).
FIRST_RUN_ID = 900_000_000


@dataclass(frozen=True)
class RunSeen:
    """What one check run reported: its end and the GPUs ``nvidia-smi -L`` listed."""

    run_id: int
    phase: Phase
    gpus: tuple[str, ...]  # UUIDs
    output: str


@dataclass(frozen=True)
class Verdict:
    passed: bool
    lines: tuple[str, ...]


def gpus_listed(output: str) -> tuple[str, ...]:
    """The GPU UUIDs in ``nvidia-smi -L`` output (MIG lines and others are not GPUs)."""
    found = (_GPU_LINE.match(line) for line in output.splitlines())
    return tuple(match.group(3) for match in found if match is not None)


def judge(seen: Sequence[RunSeen], *, gpus: int) -> Verdict:
    """Pass when every run succeeded and saw exactly ``gpus`` GPUs, none shared."""
    lines: list[str] = []
    passed = True
    owner: dict[str, int] = {}
    for run in seen:
        listed = ", ".join(run.gpus) or "none"
        if run.phase is not Phase.SUCCEEDED:
            passed = False
            lines.append(f"FAIL run {run.run_id}: ended {run.phase.value}: {run.output[-500:]}")
            continue
        if len(run.gpus) != gpus:
            passed = False
            lines.append(
                f"FAIL run {run.run_id}: given {gpus} GPU(s), sees {len(run.gpus)}: {listed}"
            )
            continue
        shared = [uuid for uuid in run.gpus if uuid in owner]
        if shared:
            passed = False
            others = ", ".join(f"{uuid} (also run {owner[uuid]})" for uuid in shared)
            lines.append(f"FAIL run {run.run_id}: sees a GPU another run has: {others}")
            continue
        owner.update(dict.fromkeys(run.gpus, run.run_id))
        lines.append(f"ok   run {run.run_id}: sees exactly its {gpus} GPU(s): {listed}")
    return Verdict(passed, tuple(lines))


async def check(
    settings: NodeSettings,
    *,
    image: str,
    runs: int,
    gpus: int,
    seconds: float,
    executor_name: str | None = None,
) -> Verdict:
    """Start the runs through the configured executor (``executor_name`` of
    ``executors:``; default: the first); judge what they saw."""
    entries = {entry.name: entry for entry in settings.executor_entries}
    entry = entries[executor_name] if executor_name else settings.executor_entries[0]
    factory = load_factory(entry.kind)
    executor: Executor = factory(
        entry.settings,
        context=ExecutorContext(
            node_name=f"{settings.name}-gpu-check",
            task_dir=settings.task_dir,
            registry_credentials=tuple(settings.docker_registries),
            limits=OutputLimits(max_output_bytes=64 * 1024, max_log_bytes=64 * 1024),
        ),
    )
    run_ids = [FIRST_RUN_ID + n for n in range(runs)]
    await executor.open()
    try:
        ends: dict[int, RunEvent] = {}
        watching = asyncio.create_task(_watch(executor, set(run_ids), ends))
        await asyncio.gather(*(executor.start(_spec(run_id, image, gpus)) for run_id in run_ids))
        try:
            await asyncio.wait_for(asyncio.shield(watching), seconds)
        except TimeoutError:
            for run_id in run_ids:
                if run_id not in ends:
                    await executor.kill(run_id)
            await asyncio.wait_for(watching, 60)
        seen = []
        for run_id in run_ids:
            end = ends[run_id]
            try:
                output = await executor.collect(run_id)
                text = output.output.decode(errors="replace") or output.log
            except UnknownRun:  # it never had a container (refused: too many GPUs, say)
                text = end.message
            seen.append(RunSeen(run_id, end.phase, gpus_listed(text), text))
        return judge(seen, gpus=gpus)
    finally:
        for run_id in run_ids:
            with contextlib.suppress(Exception):  # best effort: the verdict is what counts
                await executor.cleanup(run_id)
        await executor.close()


async def _watch(executor: Executor, run_ids: set[int], ends: dict[int, RunEvent]) -> None:
    async for event in executor.events():
        if event.run_id in run_ids and event.phase.is_terminal:
            ends.setdefault(event.run_id, event)
            if run_ids <= ends.keys():
                return


def _spec(run_id: int, image: str, gpus: int) -> RunSpec:
    return RunSpec(
        run_id=run_id,
        task_id=run_id,
        organization_id=0,
        collaboration_id=0,
        image=image,
        environment={"OUTPUT_FILE": f"{CONTAINER_TASK_DIR}/{OUTPUT_FILE_NAME}"},
        resources=Resources(cpu=1.0, memory_mb=512, gpus=gpus),
        deadline_seconds=600,
    )
