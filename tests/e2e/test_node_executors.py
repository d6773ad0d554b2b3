"""A node with two executors end to end: real vantage6 4.15.2 server, real podman for OCI
images and the FAKE apptainer for ``oras://`` references, chosen per run by route. Each
run reaches the proxy (podman's runs on the run network's gateway, apptainer's on
loopback through their relay: the proxy listens on both), names its executor in the trace
and ``/status``, and a restarted node finds each run on its own executor."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conformance.apptainer_harness import BEHAVIOUR_IMAGE, ApptainerHarness
from tests.e2e.conftest import StartNode, status_of
from tests.e2e.test_node_lifecycle import create, wait_for_run
from tests.peers.podman import PodmanService
from tests.peers.v6server import V6Collaboration

pytestmark = [pytest.mark.v6server, pytest.mark.podman, pytest.mark.slow]

ORAS_IMAGE = f"oras://{BEHAVIOUR_IMAGE}"


async def test_oci_runs_go_to_podman_and_oras_runs_to_apptainer_across_a_restart(
    v6_plain: V6Collaboration,
    start_node: StartNode,
    podman_service: PodmanService,
    behaviour_image: str,
    tmp_path: Path,
) -> None:
    fake = ApptainerHarness(node_name="unused", task_dir=tmp_path, work=tmp_path / "fake")
    fake.registry[ORAS_IMAGE] = {"program": "behave"}
    fake.write_registry()
    hpc = {
        "kind": "apptainer",
        "name": "hpc",
        "route": {"schemes": ["oras", "library", "sif"]},
        **fake.settings.model_dump(mode="json", exclude={"kind"}),
    }
    executors = [{"kind": "podman", "socket": podman_service.url}, hpc]
    node = await start_node(v6_plain, v6_plain.org_a, executors=executors)
    oci = await create(v6_plain, behaviour_image, sleep=8, output='{"on": "podman"}')
    oras = await create(v6_plain, ORAS_IMAGE, sleep=8, output='{"on": "apptainer"}')

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while len((shown := await asyncio.to_thread(status_of, node))["run_resources"]) < 2:
        assert loop.time() < deadline, f"the runs never showed in /status: {shown}"
        await asyncio.sleep(0.2)
    await node.shutdown()  # the runs go on without the node
    restarted = await start_node(v6_plain, v6_plain.org_a, executors=executors)
    runs = [await wait_for_run(v6_plain, task["id"], status="completed") for task in (oci, oras)]
    results = [
        await asyncio.to_thread(v6_plain.user.result_values, task["id"]) for task in (oci, oras)
    ]

    assert shown["executor"] == "podman, hpc (apptainer)"
    assert sorted(line.split("]")[0] for line in shown["run_resources"].values()) == [
        "[hpc",
        "[podman",
    ]
    assert results == [[{"on": "podman"}], [{"on": "apptainer"}]]
    executor_of = {
        str((span.attributes or {}).get("fednode.run_id")): (span.attributes or {}).get(
            "fednode.executor"
        )
        for span in node.spans
        if span.name == "run"
    }
    assert executor_of[str(runs[0]["id"])] == "podman"
    assert executor_of[str(runs[1]["id"])] == "hpc"
    assert restarted.node.ready.is_set()
