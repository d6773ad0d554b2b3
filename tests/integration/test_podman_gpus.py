"""GPU runs on real podman through CDI, with STAND-IN devices (this machine has no GPU).

A CDI spec written by the test peer (``fednode-test.example/gpu``) describes two "GPUs":
each injects a device node (``/dev/fakegpu<n>``, really the host's ``/dev/null`` or
``/dev/zero``), an environment variable and a bound file naming it — the three kinds of
edit NVIDIA's generated specs make. A podman service of its own reads the spec from the
test's folder (``tests/peers/podman.py``, ``podman_gpu_service``); the images and storage
are the shared podman's. What the container saw comes back as its output (``behave.py``,
``describe``). Whether a real GPU is usable inside is ``scripts/gpu-check``'s to show.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from executors.devices import LABEL_DEVICES
from executors.podman.config import PodmanSettings
from executors.podman.containers import container_name
from executors.podman.executor import PodmanExecutor
from executors.spec import Phase, Reason, Resources
from tests.conformance.harness import Behaviour, EventRecorder
from tests.conformance.podman_harness import PodmanHarness, build_behaviour_image
from tests.integration.test_podman_executor import inspect
from tests.peers.podman import (
    STAND_IN_GPU_KIND,
    STAND_IN_GPUS,
    PodmanGpuService,
    PodmanService,
)

pytestmark = [pytest.mark.podman, pytest.mark.slow]

KIND = STAND_IN_GPU_KIND
GPU0, GPU1 = f"{KIND}=0", f"{KIND}=1"
HOST_NODES = STAND_IN_GPUS
SEEN = Behaviour(
    sleep=2,
    describe={
        "env": ["FAKE_GPU_VISIBLE"],
        "paths": ["/dev/fakegpu0", "/dev/fakegpu1", "/run/fakegpu/gpu0", "/run/fakegpu/gpu1"],
    },
)


@pytest.fixture(scope="module")
def behaviour(podman_service: PodmanService) -> str:
    return build_behaviour_image(podman_service)


@pytest.fixture
async def make(
    podman_service: PodmanService,
    behaviour: str,
    podman_gpu_service: PodmanGpuService,
    tmp_path: Path,
) -> AsyncIterator[Any]:
    """``await make(**settings)`` → (executor, recorder, harness) on the CDI service; all
    closed, and the containers removed, afterwards. Each call is one node process of the
    same node (a restart is a second call)."""
    opened: list[tuple[PodmanExecutor, EventRecorder]] = []
    harness = PodmanHarness(
        podman=podman_service,
        behaviour_image=behaviour,
        node_name=f"podman-gpu-{uuid.uuid4().hex[:8]}",
        task_dir=tmp_path / "tasks",
    )

    async def _make(
        **settings: Any,
    ) -> tuple[PodmanExecutor, EventRecorder, PodmanHarness]:
        harness.settings = PodmanSettings(socket=podman_gpu_service.url, **settings)
        executor = await harness.open_executor()
        recorder = EventRecorder(executor)
        opened.append((executor, recorder))
        return executor, recorder, harness

    yield _make
    for executor, recorder in opened:
        await recorder.aclose()
        await executor.close()
    await harness.aclose()


async def seen(executor: PodmanExecutor, run_id: int) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((await executor.collect(run_id)).output)
    return report


async def test_concurrent_gpu_runs_see_their_own_cdi_device_and_environment_only(
    make: Any, podman_service: PodmanService
) -> None:
    # A bare entry is a device of cdi_gpu_kind.
    executor, events, harness = await make(cdi_gpu_kind=KIND, gpu_devices=[GPU0, "1"])

    for run_id in (1, 2):
        await executor.start(harness.spec(run_id, SEEN, resources=Resources(gpus=1)))
    labels = {}
    for run_id in (1, 2):
        await events.wait_for(run_id, Phase.RUNNING, timeout=60)
        document = await inspect(podman_service, container_name(harness.node_name, run_id))
        labels[run_id] = document["Config"]["Labels"][LABEL_DEVICES]
    ends = [await events.terminal(run_id, timeout=60) for run_id in (1, 2)]
    reports = [await seen(executor, run_id) for run_id in (1, 2)]

    assert [end.phase for end in ends] == [Phase.SUCCEEDED, Phase.SUCCEEDED]
    assert sorted(labels.values()) == [GPU0, GPU1]
    visible = [report["env"]["FAKE_GPU_VISIBLE"] for report in reports]
    assert sorted(visible) == ["0", "1"]  # distinct devices, not the first one twice
    for run_id, report in zip((1, 2), reports, strict=True):
        mine = labels[run_id].rsplit("=", 1)[1]
        other = "1" if mine == "0" else "0"
        assert report["env"]["FAKE_GPU_VISIBLE"] == mine
        assert report["paths"][f"/dev/fakegpu{mine}"] == {
            "kind": "char",
            "device": HOST_NODES[mine][1],
        }
        assert report["paths"][f"/dev/fakegpu{other}"] == {"kind": "missing"}
        assert report["paths"][f"/run/fakegpu/gpu{mine}"] == {
            "kind": "file",
            "text": f"GPU-stand-in-{mine}",
        }
        assert report["paths"][f"/run/fakegpu/gpu{other}"] == {"kind": "missing"}


async def test_a_gpu_run_waits_while_the_devices_are_busy_and_gets_the_one_freed(
    make: Any,
) -> None:
    executor, events, harness = await make(gpu_devices=[GPU0])
    await executor.start(harness.spec(1, SEEN, resources=Resources(gpus=1)))
    await events.wait_for(1, Phase.RUNNING, timeout=60)

    starting = asyncio.create_task(
        executor.start(harness.spec(2, SEEN, resources=Resources(gpus=1)))
    )
    await events.wait_for(2, Phase.STARTING, timeout=60)
    busy = await harness.object_exists(2)
    first = await events.terminal(1, timeout=60)
    await starting  # start() returns once the run has its device and its container
    second = await events.terminal(2, timeout=60)

    assert busy is False  # no container while its device was taken
    assert events.phases(2)[0] is Phase.STARTING
    assert (first.phase, second.phase) == (Phase.SUCCEEDED, Phase.SUCCEEDED)
    assert (await seen(executor, 2))["env"]["FAKE_GPU_VISIBLE"] == "0"


async def test_after_a_restart_a_new_run_does_not_get_a_running_runs_device(make: Any) -> None:
    executor, events, harness = await make(gpu_devices=[GPU0, GPU1])
    await executor.start(harness.spec(1, Behaviour(sleep=60), resources=Resources(gpus=1)))
    await events.wait_for(1, Phase.RUNNING, timeout=60)
    await events.aclose()
    await executor.close()  # the node stops; its run keeps its device

    restarted, events, harness = await make(gpu_devices=[GPU0, GPU1])
    await restarted.start(harness.spec(2, SEEN, resources=Resources(gpus=1)))
    end = await events.terminal(2, timeout=60)
    await restarted.kill(1)

    assert end.phase is Phase.SUCCEEDED
    assert (await seen(restarted, 2))["env"]["FAKE_GPU_VISIBLE"] == "1"
    assert (await events.terminal(1, timeout=60)).phase is Phase.KILLED


async def test_a_gpu_run_the_executor_can_never_serve_ends_not_allowed_with_the_reason(
    make: Any,
) -> None:
    executor, events, harness = await make(gpu_devices=[GPU0])
    await executor.start(harness.spec(1, resources=Resources(gpus=2)))
    await executor.start(harness.spec(2, resources=Resources(gpus=1, gpu_type="a100")))
    too_many = await events.terminal(1, timeout=30)
    typed = await events.terminal(2, timeout=30)

    assert (too_many.phase, too_many.reason) == (Phase.FAILED, Reason.NOT_ALLOWED)
    assert "asks for 2 GPU(s); this executor has 1 (executor.gpu_devices)" in too_many.message
    assert typed.reason is Reason.NOT_ALLOWED and "of type 'a100'" in typed.message
    assert not await harness.object_exists(1)


async def test_a_run_killed_while_it_waits_for_a_gpu_ends_killed_without_a_container(
    make: Any,
) -> None:
    executor, events, harness = await make(gpu_devices=[GPU0])
    await executor.start(harness.spec(1, Behaviour(sleep=60), resources=Resources(gpus=1)))
    await events.wait_for(1, Phase.RUNNING, timeout=60)
    waiting = asyncio.create_task(
        executor.start(harness.spec(2, SEEN, resources=Resources(gpus=1)))
    )
    await events.wait_for(2, Phase.STARTING, timeout=60)

    await executor.kill(2)
    await asyncio.wait_for(waiting, 30)
    end = await events.terminal(2, timeout=30)
    await executor.kill(1)

    assert (end.phase, end.reason) == (Phase.KILLED, Reason.KILLED)
    assert not await harness.object_exists(2)
    assert (await events.terminal(1, timeout=60)).phase is Phase.KILLED
