"""The conformance harness for the in-memory TEST executor (``tests/fakes/memory_executor.py``).

The in-memory executor is no runtime: it exists so the node's lifecycle can be unit-tested
in milliseconds, and this harness proves it keeps the same contract as the real executors
(phases in order and once each, kill, deadlines, missing images, idempotent start, restart,
cleanup). It runs no image, so only ``restart`` is among ``supports``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import pytest

from tests.conformance.harness import Harness
from tests.fakes.memory_executor import MemoryExecutor, MemoryRuntime

BEHAVIOUR_IMAGE = "localhost/fednode/behaviour:in-memory"


class MemoryHarness(Harness):
    kind: ClassVar[str] = "memory"
    supports: ClassVar[frozenset[str]] = frozenset({"restart"})
    unsupported_because: ClassVar[str] = (
        "the in-memory test executor runs no image: no real algorithm, no memory limit, "
        "no network; the real executors prove those"
    )
    slack: ClassVar[float] = 5.0

    def __init__(self, *, node_name: str, task_dir: Path) -> None:
        super().__init__(node_name=node_name, task_dir=task_dir)
        self.runtime = MemoryRuntime(task_dir=task_dir, images={BEHAVIOUR_IMAGE})

    def behaviour_image(self) -> str:
        return BEHAVIOUR_IMAGE

    def average_image(self) -> str:
        return "localhost/fednode/average:not-runnable-in-memory"

    def diagnostics_image(self) -> str:
        return "localhost/fednode/diagnostics:not-runnable-in-memory"

    def missing_image(self) -> str:
        return "localhost/fednode/no-such-image:never"

    async def open_executor(self) -> MemoryExecutor:
        executor = MemoryExecutor(self.runtime)
        await executor.open()
        return executor

    async def object_exists(self, run_id: int) -> bool:
        return run_id in self.runtime.runs

    async def aclose(self) -> None:
        await self.runtime.aclose()


@pytest.fixture
async def memory_harness(tmp_path: Path) -> AsyncIterator[MemoryHarness]:
    harness = MemoryHarness(node_name="conformance-memory", task_dir=tmp_path / "tasks")
    yield harness
    await harness.aclose()
