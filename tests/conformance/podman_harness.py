"""The conformance harness for the podman executor: real podman, real images.

Behaviour runs use ``localhost/fednode/behaviour:<hash>``, built here from
``localhost/fednode/python-base`` and ``behaviour/`` through the podman service, and
tagged with a hash of the build inputs and the base image's id, so it is built once and
rebuilt only when one of them changes. Every test gets its own node name, so its
containers, its ``list_runs()`` and its leftovers are its own.
"""

from __future__ import annotations

import hashlib
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import pytest

from executors.base import LABEL_NODE, ExecutorContext
from executors.podman.api import LibpodClient
from executors.podman.config import PodmanSettings
from executors.podman.containers import container_name
from executors.podman.executor import PodmanExecutor
from tests.conformance.harness import Harness
from tests.peers.podman import PodmanService

BEHAVIOUR_DIR = Path(__file__).resolve().parent / "behaviour"
BEHAVIOUR_REPO = "localhost/fednode/behaviour"


def build_behaviour_image(podman: PodmanService) -> str:
    """``localhost/fednode/behaviour:<hash>``, built unless that tag is already there."""
    base_id = subprocess.run(
        podman.cli("image", "inspect", "--format", "{{.Id}}", podman.base_image),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    digest = hashlib.sha256(base_id.encode())
    for path in sorted(BEHAVIOUR_DIR.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    image = f"{BEHAVIOUR_REPO}:{digest.hexdigest()[:16]}"
    exists = subprocess.run(podman.cli("image", "exists", image), check=False)
    if exists.returncode != 0:
        build = subprocess.run(
            podman.cli(
                "build",
                "--quiet",
                "--pull=never",
                "--build-arg",
                f"BASE={podman.base_image}",
                "-t",
                image,
                str(BEHAVIOUR_DIR),
            ),
            check=False,
            capture_output=True,
            text=True,
        )
        if build.returncode != 0:
            pytest.fail(f"building {image} failed:\n{build.stdout}\n{build.stderr}")
    return image


class PodmanHarness(Harness):
    kind: ClassVar[str] = "podman"

    def __init__(
        self, *, podman: PodmanService, behaviour_image: str, node_name: str, task_dir: Path
    ) -> None:
        super().__init__(node_name=node_name, task_dir=task_dir)
        self.podman = podman
        self._behaviour_image = behaviour_image
        self.settings = PodmanSettings(socket=podman.url)

    def behaviour_image(self) -> str:
        return self._behaviour_image

    def average_image(self) -> str:
        return self.podman.average_image

    def diagnostics_image(self) -> str:
        return self.podman.diagnostics_image

    def missing_image(self) -> str:
        return "localhost/fednode/no-such-image:never"

    async def open_executor(self) -> PodmanExecutor:
        context = ExecutorContext(node_name=self.node_name, task_dir=self.task_dir)
        executor = PodmanExecutor(self.settings, context=context)
        await executor.open()
        return executor

    async def object_exists(self, run_id: int) -> bool:
        client = LibpodClient(self.settings.socket_path, timeout=30)
        await client.open()
        try:
            found = await client.inspect_container(container_name(self.node_name, run_id))
        finally:
            await client.close()
        return found is not None

    async def aclose(self) -> None:
        """Remove whatever containers the test left behind."""
        client = LibpodClient(self.settings.socket_path, timeout=60)
        await client.open()
        try:
            for entry in await client.list_containers(labels=[f"{LABEL_NODE}={self.node_name}"]):
                await client.remove_container(str(entry["Id"]))
        finally:
            await client.close()


@pytest.fixture(scope="session")
def behaviour_image(podman_service: PodmanService) -> str:
    return build_behaviour_image(podman_service)


@pytest.fixture
async def podman_harness(
    podman_service: PodmanService, behaviour_image: str, tmp_path: Path
) -> AsyncIterator[PodmanHarness]:
    harness = PodmanHarness(
        podman=podman_service,
        behaviour_image=behaviour_image,
        node_name=f"conformance-{uuid.uuid4().hex[:8]}",
        task_dir=tmp_path / "tasks",
    )
    yield harness
    await harness.aclose()
