"""Registry credentials reach only their own registry: real podman, real registries.

Two real registries (``tests/peers/registry.py``) hold the same image and accept the same
username and password; the node is configured with the credential of one of them. A pull
from that one authenticates and the run succeeds. A task naming the image on the other
registry is the attack: a node that sent its credential along would pull it, and that
registry's log would record an ``authorized request``. It must get no credential at all
(the registry logs each of its requests as carrying no basic credentials: ``invalid
authorization credential``), and the run ends as a missing image.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from executors.base import ExecutorContext
from executors.credentials import RegistryCredential
from executors.podman.config import PodmanSettings
from executors.podman.executor import PodmanExecutor
from executors.spec import Phase, Reason, RunEvent
from tests.conformance.harness import EventRecorder
from tests.conformance.podman_harness import PodmanHarness
from tests.peers.registry import Registries, Registry, RegistryPodman

pytestmark = [pytest.mark.podman, pytest.mark.registry, pytest.mark.slow]

#: What the distribution registry logs for a request whose basic credential it accepted,
#: and for one that carried no basic credential at all.
AUTHORIZED = 'msg="authorized request"'
NO_CREDENTIALS = "invalid authorization credential"


def credential(registry: Registry) -> RegistryCredential:
    return RegistryCredential(
        registry=registry.host, username=registry.username, password=registry.password
    )


@pytest.fixture
async def node(
    registries: Registries, registry_podman: RegistryPodman, tmp_path: Path
) -> AsyncIterator[tuple[PodmanExecutor, EventRecorder, PodmanHarness]]:
    """A podman executor configured with the trusted registry's credential only."""
    harness = PodmanHarness(
        podman=registry_podman.service,
        behaviour_image=registry_podman.image(registries.trusted),
        node_name=f"registry-it-{uuid.uuid4().hex[:8]}",
        task_dir=tmp_path / "tasks",
    )
    harness.settings = PodmanSettings(socket=registry_podman.service.url, pull_policy="always")
    context = ExecutorContext(
        node_name=harness.node_name,
        task_dir=harness.task_dir,
        registry_credentials=(credential(registries.trusted),),
    )
    executor = PodmanExecutor(harness.settings, context=context)
    await executor.open()
    recorder = EventRecorder(executor)
    try:
        yield executor, recorder, harness
    finally:
        await recorder.aclose()
        await executor.close()
        await harness.aclose()


async def run_image(
    node: tuple[PodmanExecutor, EventRecorder, PodmanHarness],
    registry: Registry,
    image: str,
    *,
    run_id: int,
) -> tuple[RunEvent, str]:
    """Run ``image`` to its end; the end, and what ``registry`` logged meanwhile."""
    executor, events, harness = node
    before = len(registry.log())
    await executor.start(harness.spec(run_id).model_copy(update={"image": image}))
    ended = await events.terminal(run_id, timeout=120)
    return ended, registry.log()[before:]


async def test_a_pull_from_the_configured_registry_authenticates_and_the_run_succeeds(
    node: tuple[PodmanExecutor, EventRecorder, PodmanHarness],
    registries: Registries,
    registry_podman: RegistryPodman,
) -> None:
    trusted = registries.trusted

    ended, seen = await run_image(node, trusted, registry_podman.image(trusted), run_id=1)

    assert ended.phase is Phase.SUCCEEDED, ended
    assert AUTHORIZED in seen


async def test_a_pull_from_another_registry_carries_no_credentials(
    node: tuple[PodmanExecutor, EventRecorder, PodmanHarness],
    registries: Registries,
    registry_podman: RegistryPodman,
) -> None:
    other = registries.other

    ended, seen = await run_image(node, other, registry_podman.image(other), run_id=2)

    assert ended.phase is Phase.FAILED and ended.reason is Reason.IMAGE_NOT_FOUND, ended
    assert NO_CREDENTIALS in seen  # the pull did reach the other registry...
    assert AUTHORIZED not in seen and other.username not in seen  # ...without a credential
