"""The conformance harness for the apptainer executor, against a FAKE apptainer binary.

apptainer cannot be installed on this machine (``shared/reference/feasibility.md`` §2), so
the executor runs ``tests/fakes/apptainer_fake.py``: a stand-in that checks its arguments
like apptainer 1.3 and behaves like a run (output, log, exit codes, death by signal), but
isolates nothing. Everything of the executor itself is real: the supervisors, the pidfds,
the deadline timers, the records on disk, the restart.

What the fake cannot show is declared: it cannot run the real ``average`` or
``diagnostics`` images, nor run out of memory, so only ``restart`` and ``output-files``
are among ``supports``.
Its "registry" knows one image, the behaviour probe; every other reference is missing.

On a host with a real apptainer (the manual HPC check in ``docs/executors.md``), the same
suite runs against it instead: ``FEDNODE_REAL_APPTAINER=$(command -v apptainer)`` and
``FEDNODE_APPTAINER_IMAGE_CACHE=<dir holding behaviour.sif>`` select
:class:`RealApptainerHarness`.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from executors.apptainer.config import ApptainerSettings
from executors.apptainer.executor import ApptainerExecutor, kill_process_groups
from executors.apptainer.records import RunPaths, read_record, records
from executors.base import ExecutorContext
from executors.credentials import RegistryCredential
from executors.ports import ImagePorts
from tests.conformance.harness import Harness

FAKE_APPTAINER = Path(__file__).resolve().parents[1] / "fakes" / "apptainer_fake.py"
BEHAVIOUR_IMAGE = "localhost/fednode/behaviour:fake"


class ApptainerHarness(Harness):
    kind: ClassVar[str] = "apptainer"
    supports: ClassVar[frozenset[str]] = frozenset({"restart", "output-files"})
    unsupported_because: ClassVar[str] = (
        "apptainer cannot be installed here: the runtime is a named fake that runs no real "
        "image, has no memory limit and no network; docs/executors.md has the manual check "
        "for a real HPC host"
    )
    slack: ClassVar[float] = 15.0

    def __init__(self, *, node_name: str, task_dir: Path, work: Path, **settings: Any) -> None:
        super().__init__(node_name=node_name, task_dir=task_dir)
        #: What the node hands the executor as ``docker_registries``.
        self.credentials: tuple[RegistryCredential, ...] = tuple(
            settings.pop("registry_credentials", ())
        )
        work.mkdir(parents=True, exist_ok=True)
        self.calls_file = work / "fake-apptainer-calls.jsonl"
        self.registry_file = work / "fake-apptainer-registry.json"
        self.registry: dict[str, dict[str, str]] = {
            f"docker://{BEHAVIOUR_IMAGE}": {"program": "behave"},
        }
        self.write_registry()
        values: dict[str, Any] = {
            "binary": str(FAKE_APPTAINER),
            "image_cache": work / "images",
            "kill_grace_seconds": 3.0,
            "apptainer_environment": {
                "FAKE_APPTAINER_CALLS": str(self.calls_file),
                "FAKE_APPTAINER_REGISTRY": str(self.registry_file),
            },
        }
        #: What the node hands the executor when peering is on (``ExecutorContext``).
        self.peer_ports: tuple[int, ...] = tuple(settings.pop("peer_ports", ()))
        self.peer_image_ports: tuple[ImagePorts, ...] = tuple(settings.pop("peer_image_ports", ()))
        values.update(settings)
        self.settings = ApptainerSettings(**values)

    def write_registry(self) -> None:
        self.registry_file.write_text(json.dumps(self.registry))

    def calls(self) -> list[dict[str, Any]]:
        """Every call the fake apptainer recorded, oldest first."""
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def behaviour_image(self) -> str:
        return BEHAVIOUR_IMAGE

    def average_image(self) -> str:
        return "localhost/fednode/average:not-runnable-by-the-fake"

    def diagnostics_image(self) -> str:
        return "localhost/fednode/diagnostics:not-runnable-by-the-fake"

    def missing_image(self) -> str:
        return "localhost/fednode/no-such-image:never"

    async def open_executor(self) -> ApptainerExecutor:
        context = ExecutorContext(
            node_name=self.node_name,
            task_dir=self.task_dir,
            registry_credentials=self.credentials,
            peer_ports=self.peer_ports,
            peer_image_ports=self.peer_image_ports,
        )
        executor = ApptainerExecutor(self.settings, context=context)
        await executor.open()
        return executor

    async def object_exists(self, run_id: int) -> bool:
        return RunPaths(self.task_dir, run_id).record.exists()

    async def aclose(self) -> None:
        """SIGKILL whatever runs the test left behind (their supervisors are detached)."""
        for paths in records(self.task_dir):
            status = read_record(paths)
            if status is not None and status.alive and status.supervisor is not None:
                kill_process_groups(status.supervisor)


class RealApptainerHarness(ApptainerHarness):
    """The same suite against a real apptainer (not on this machine: the manual HPC check).

    The behaviour probe is ``behaviour.sif`` in the given image cache, built from
    ``behaviour/behave.py`` by the operator (``docs/executors.md`` shows the definition).
    """

    def __init__(
        self, *, node_name: str, task_dir: Path, work: Path, binary: str, image_cache: Path
    ) -> None:
        super().__init__(node_name=node_name, task_dir=task_dir, work=work)
        cgroups = os.environ.get("FEDNODE_APPTAINER_CGROUPS", "1") != "0"
        self.settings = ApptainerSettings(
            binary=binary, image_cache=image_cache, kill_grace_seconds=3.0, cgroup_limits=cgroups
        )

    def behaviour_image(self) -> str:
        return "behaviour.sif"


@pytest.fixture
async def apptainer_harness(tmp_path: Path) -> AsyncIterator[ApptainerHarness]:
    node_name = f"conformance-{uuid.uuid4().hex[:8]}"
    real = os.environ.get("FEDNODE_REAL_APPTAINER")
    harness: ApptainerHarness
    if real:
        harness = RealApptainerHarness(
            node_name=node_name,
            task_dir=tmp_path / "tasks",
            work=tmp_path / "apptainer",
            binary=real,
            image_cache=Path(os.environ["FEDNODE_APPTAINER_IMAGE_CACHE"]),
        )
    else:
        harness = ApptainerHarness(
            node_name=node_name, task_dir=tmp_path / "tasks", work=tmp_path / "fake-apptainer"
        )
    yield harness
    await harness.aclose()
