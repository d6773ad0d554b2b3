"""Resource profiles end to end: the real vantage6 4.15.2 server sends tasks, the node's
profiles decide what each run gets, and real podman gives it (GPUs: STAND-IN CDI devices,
``tests/peers/podman.py``). Refusals reach the server as ``not allowed`` with the cap named;
what a run got is on its trace and in ``/status``."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.e2e.conftest import StartNode, status_of
from tests.e2e.test_node_lifecycle import create, wait_for_run
from tests.peers.podman import PodmanGpuService
from tests.peers.v6server import V6Collaboration

pytestmark = [pytest.mark.v6server, pytest.mark.podman, pytest.mark.slow]


async def test_a_profiles_task_gets_its_gpu_cpu_and_deadline_and_one_over_a_cap_is_refused(
    v6_plain: V6Collaboration,
    start_node: StartNode,
    podman_gpu_service: PodmanGpuService,
    behaviour_image: str,
) -> None:
    average = re.escape("localhost/fednode/average:latest")
    profiles = [
        {"name": "too-big", "images": [average], "gpus": 2},
        {
            "name": "gpu-probe",
            "images": [re.escape(behaviour_image)],
            "gpus": 1,
            "cpu": 0.5,
            "memory_mb": 256,
            "deadline_seconds": 600,
        },
    ]
    node = await start_node(
        v6_plain,
        v6_plain.org_a,
        executor={
            "kind": "podman",
            "socket": podman_gpu_service.url,
            "gpu_devices": [podman_gpu_service.device("0"), podman_gpu_service.device("1")],
        },
        policies={"resources": {"max_gpus": 1, "profiles": profiles}},
    )
    describe = {"env": ["FAKE_GPU_VISIBLE"], "paths": ["/dev/fakegpu0", "/dev/fakegpu1"]}
    task = await create(v6_plain, behaviour_image, sleep=3, describe=describe)
    refused = await create(v6_plain, "localhost/fednode/average:latest")

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while not (shown := await asyncio.to_thread(status_of, node))["run_resources"]:
        assert loop.time() < deadline, f"the run never showed in /status: {shown}"
        await asyncio.sleep(0.2)
    run = await wait_for_run(v6_plain, task["id"], status="completed")
    (seen,) = await asyncio.to_thread(v6_plain.user.result_values, task["id"])
    not_allowed = await wait_for_run(v6_plain, refused["id"], status="not allowed")

    assert list(shown["run_resources"].values()) == ["gpu-probe: 0.5 CPU, 256 MB, 1 GPU"]
    assert "gpu-probe" in shown["resource_profiles"]
    visible = seen["env"]["FAKE_GPU_VISIBLE"]
    assert visible in ("0", "1")
    assert seen["paths"][f"/dev/fakegpu{visible}"]["kind"] == "char"
    assert "policies.resources.max_gpus allows at most 1" in not_allowed["log"]
    assert "resource profile 'too-big'" in not_allowed["log"]
    (root,) = [
        span
        for span in node.spans
        if span.name == "run"
        and str((span.attributes or {}).get("fednode.run_id")) == str(run["id"])
    ]
    attributes = root.attributes or {}
    assert attributes["fednode.resources.profile"] == "gpu-probe"
    assert attributes["fednode.resources.gpus"] == 1
    assert attributes["fednode.resources.deadline_seconds"] == 600
