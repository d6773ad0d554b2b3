"""Several executors side by side in one node's :class:`~node.executor_set.ExecutorSet`:
real podman and the real Kubernetes control plane (kwok nodes) together, and the FAKE
apptainer for SIF references (``oras://``, ``library://``, ``*.sif``). Runs go where their
route says, each runtime's object names its executor, and after a restart the set finds
every run on its own runtime again (reconcile's listing covers all of them)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from executors.apptainer.executor import ApptainerExecutor
from executors.apptainer.records import RunPaths, read_record
from executors.base import LABEL_RUN, Executor, ExecutorContext
from executors.kubernetes.executor import KubernetesExecutor
from executors.podman.containers import container_name
from executors.podman.executor import PodmanExecutor
from executors.spec import Phase
from node.executor_set import LABEL_EXECUTOR, ExecutorSet, Route, Routes
from tests.conformance.apptainer_harness import BEHAVIOUR_IMAGE, ApptainerHarness
from tests.conformance.harness import Behaviour, EventRecorder
from tests.conformance.podman_harness import PodmanHarness, build_behaviour_image
from tests.integration.k8s_executor_helpers import (
    chart_network_policies,
    make_spec,
    settings_for,
    task_volume,
)
from tests.integration.test_podman_executor import inspect
from tests.peers.kubernetes import POD_RUN_SECONDS, K8sTestbed
from tests.peers.podman import PodmanService

pytestmark = [pytest.mark.podman, pytest.mark.kubernetes, pytest.mark.slow]

ROUTES = Routes(
    [
        Route(name="cluster"),  # the default: Kubernetes
        Route(name="hpc", schemes=("oras", "library", "sif")),
        Route(name="local", images=(r"localhost/fednode/.*",)),
    ]
)


@pytest.fixture
async def make_set(
    k8s_testbed: K8sTestbed,
    k8s_namespace: str,
    podman_service: PodmanService,
    tmp_path: Path,
) -> AsyncIterator[Any]:
    """``make_set()`` → (set, recorder, harnesses): one node's three executors, sharing its
    task directory; each call is one node process (a restart is a second call)."""
    node = f"set-{uuid.uuid4().hex[:8]}"
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    podman = PodmanHarness(
        podman=podman_service,
        behaviour_image=build_behaviour_image(podman_service),
        node_name=node,
        task_dir=task_dir,
    )
    apptainer = ApptainerHarness(node_name=node, task_dir=task_dir, work=tmp_path / "fake")
    apptainer.registry[f"oras://{BEHAVIOUR_IMAGE}"] = {"program": "behave"}
    apptainer.write_registry()
    opened: list[tuple[ExecutorSet, EventRecorder]] = []
    async with k8s_testbed.api_client() as admin, task_volume(admin, k8s_namespace):
        rules = await chart_network_policies(admin, k8s_namespace, node)
        kubeconfig = await k8s_testbed.service_account_kubeconfig(k8s_namespace, rules=rules)

        async def _make() -> tuple[ExecutorSet, EventRecorder, dict[str, Any]]:
            context = ExecutorContext(node_name=node, task_dir=task_dir)
            kubernetes = KubernetesExecutor(
                settings_for(k8s_namespace, kubeconfig), context=context
            )
            members: dict[str, Executor] = {
                "cluster": kubernetes,
                "hpc": ApptainerExecutor(apptainer.settings, context=context),
                "local": PodmanExecutor(podman.settings, context=context),
            }
            executors = ExecutorSet(members, default="cluster")
            await executors.open()
            recorder = EventRecorder(executors)
            opened.append((executors, recorder))
            harnesses = {"admin": admin, "podman": podman, "apptainer": apptainer}
            return executors, recorder, harnesses

        yield _make
        for executors, recorder in opened:
            await recorder.aclose()
            await executors.close()
        await podman.aclose()
        await apptainer.aclose()


def labelled(spec: Any, executor: str) -> Any:
    return spec.model_copy(update={"labels": {**spec.labels, LABEL_EXECUTOR: executor}})


async def test_runs_go_to_their_executor_and_are_found_there_again_after_a_restart(
    make_set: Any, k8s_namespace: str
) -> None:
    executors, events, harness = await make_set()
    podman, apptainer = harness["podman"], harness["apptainer"]
    forever = Behaviour(sleep=120)
    specs = {
        1: make_spec(1, annotations={POD_RUN_SECONDS: "forever"}),
        2: podman.spec(2, forever),
        3: apptainer.spec(3, forever).model_copy(update={"image": f"oras://{BEHAVIOUR_IMAGE}"}),
    }
    chosen = {
        run_id: ROUTES.choose(image=spec.image, profile=None) for run_id, spec in specs.items()
    }
    for run_id, spec in specs.items():
        await executors.start(labelled(spec, chosen[run_id]))
    for run_id in specs:
        await events.wait_for(run_id, Phase.RUNNING, timeout=90)

    pods = await client.CoreV1Api(harness["admin"]).list_namespaced_pod(
        k8s_namespace, label_selector=f"{LABEL_RUN}=1"
    )
    container = await inspect(podman.podman, container_name(podman.node_name, 2))
    record = read_record(RunPaths(apptainer.task_dir, 3))
    await events.aclose()
    await executors.close()  # the node stops; its runs go on

    restarted, events, _ = await make_set()
    listed = {state.run_id: state.phase for state in await restarted.list_runs()}
    owners = {run_id: restarted.executor_of(run_id) for run_id in specs}
    for run_id in specs:
        await restarted.kill(run_id)
    ends = {run_id: (await events.terminal(run_id, timeout=90)).phase for run_id in specs}

    assert chosen == {1: "cluster", 2: "local", 3: "hpc"}
    assert pods.items[0].metadata.labels[LABEL_EXECUTOR] == "cluster"
    assert container["Config"]["Labels"][LABEL_EXECUTOR] == "local"
    assert record is not None and record.labels[LABEL_EXECUTOR] == "hpc"
    assert listed == {1: Phase.RUNNING, 2: Phase.RUNNING, 3: Phase.RUNNING}
    assert owners == chosen
    assert ends == {1: Phase.KILLED, 2: Phase.KILLED, 3: Phase.KILLED}
