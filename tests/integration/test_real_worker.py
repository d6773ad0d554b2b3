"""The Kubernetes executor on real pods: the testbed's real worker runs every container.

kubelet starts each run's Job pod in containerd; the conformance suite's probe algorithm
(``behaviour``) writes its own output, sleeps, exits with a code or allocates more memory
than its limit, exactly as the podman tests ask of it. Nothing here plays the container:
the outcome comes from runc, the kernel's OOM killer, the Job controller's deadline and
kubelet's status. The executor acts as a ServiceAccount bound to its Role only.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client, watch

from executors.base import ExecutorContext
from executors.kubernetes.executor import KubernetesExecutor
from executors.kubernetes.manifests import job_name
from executors.spec import Phase, Reason, Resources, RunEvent, RunSpec
from tests.conformance.podman_harness import build_behaviour_image
from tests.conformance.test_hostile_outputs import GIB, collect_unread
from tests.integration.k8s_executor_helpers import chart_network_policies, settings_for
from tests.peers.kubernetes import K8sRealWorker, K8sTestbed
from tests.peers.podman import PodmanService

pytestmark = [pytest.mark.kubernetes, pytest.mark.podman, pytest.mark.slow]

NODE = "fednode-real-test"


@pytest.fixture(scope="session")
def real_behaviour_image(podman_service: PodmanService, k8s_real_worker: K8sRealWorker) -> str:
    """The probe algorithm, built by podman and copied into the worker's containerd."""
    image = build_behaviour_image(podman_service)
    k8s_real_worker.import_images(image)
    return image


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tasks"
    path.mkdir()
    return path


@pytest.fixture
async def namespace(k8s_testbed: K8sTestbed) -> AsyncIterator[str]:
    name = await k8s_testbed.create_namespace("fednode-real")
    yield name
    await k8s_testbed.delete_namespace(name)


@pytest.fixture
async def open_executor(
    k8s_testbed: K8sTestbed, k8s_real_worker: K8sRealWorker, namespace: str, task_dir: Path
) -> AsyncIterator[Callable[[], Any]]:
    """Opens executors for the namespace (each closed at the end); runs land on the real
    worker through the executor's own node_selector and tolerations settings."""
    opened: list[KubernetesExecutor] = []
    async with k8s_real_worker.task_volume(namespace, task_dir):
        async with k8s_testbed.api_client() as admin:
            rules = await chart_network_policies(admin, namespace, NODE)
        kubeconfig = await k8s_testbed.service_account_kubeconfig(namespace, rules=rules)

        async def open_one() -> KubernetesExecutor:
            executor = KubernetesExecutor(
                settings_for(
                    namespace,
                    kubeconfig,
                    node_selector=k8s_real_worker.node_selector,
                    tolerations=[k8s_real_worker.toleration],
                ),
                context=ExecutorContext(node_name=NODE, task_dir=task_dir),
            )
            await executor.open()
            opened.append(executor)
            return executor

        yield open_one
        for executor in opened:
            await executor.close()


class Events:
    """An executor's event stream, recorded (and nothing else: no output is written)."""

    def __init__(self, executor: KubernetesExecutor) -> None:
        self.by_run: dict[int, list[RunEvent]] = defaultdict(list)
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._consume(executor))

    async def _consume(self, executor: KubernetesExecutor) -> None:
        async for event in executor.events():
            self.by_run[event.run_id].append(event)
            async with self._changed:
                self._changed.notify_all()

    def close(self) -> None:
        self._task.cancel()

    def phases(self, run_id: int) -> list[Phase]:
        return [e.phase for e in self.by_run[run_id]]

    async def wait(
        self, run_id: int, phase: Phase | None = None, *, timeout: float = 120
    ) -> RunEvent:
        """The run's first event in ``phase`` (any terminal phase when ``None``)."""

        def found() -> RunEvent | None:
            return next(
                (
                    e
                    for e in self.by_run[run_id]
                    if (e.phase is phase if phase else e.phase.is_terminal)
                ),
                None,
            )

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: found() is not None)
        event = found()
        assert event is not None
        return event


def spec(
    run_id: int, image: str, *, memory_mb: int = 128, deadline_seconds: int = 600, **behaviour: Any
) -> RunSpec:
    return RunSpec(
        run_id=run_id,
        task_id=5000 + run_id,
        organization_id=1,
        collaboration_id=1,
        image=image,
        input=json.dumps(behaviour).encode(),
        environment={"INPUT_FILE": "/mnt/task/input", "OUTPUT_FILE": "/mnt/task/output"},
        resources=Resources(cpu=0.5, memory_mb=memory_mb),
        deadline_seconds=deadline_seconds,
    )


async def pod_of(k8s_testbed: K8sTestbed, namespace: str, run_id: int) -> list[Any]:
    async with k8s_testbed.api_client() as api:
        pods = await client.CoreV1Api(api).list_namespaced_pod(
            namespace, label_selector=f"job-name={job_name(NODE, run_id)}"
        )
    return list(pods.items)


async def pods_gone(
    k8s_testbed: K8sTestbed, namespace: str, run_id: int, *, within: float = 60
) -> None:
    """Until the run's pods are gone (deleted by kubelet after the container stopped)."""
    selector = f"job-name={job_name(NODE, run_id)}"
    async with k8s_testbed.api_client() as api, asyncio.timeout(within):
        core = client.CoreV1Api(api)
        listed = await core.list_namespaced_pod(namespace, label_selector=selector)
        left = {pod.metadata.name for pod in listed.items}
        if not left:
            return
        async with watch.Watch() as w:
            async for event in w.stream(
                core.list_namespaced_pod,
                namespace,
                label_selector=selector,
                resource_version=listed.metadata.resource_version,
            ):
                if event["type"] == "DELETED":
                    left.discard(event["object"].metadata.name)
                    if not left:
                        return


async def test_the_container_writes_its_output_and_log_on_the_real_worker(
    open_executor: Callable[[], Any],
    real_behaviour_image: str,
    k8s_testbed: K8sTestbed,
    namespace: str,
    k8s_real_worker: K8sRealWorker,
) -> None:
    executor = await open_executor()
    events = Events(executor)
    await executor.start(
        spec(
            1, real_behaviour_image, output='{"written": "by the pod"}', log="hello from a real pod"
        )
    )
    final = await events.wait(1)
    events.close()

    # A run this short may finish between two of kubelet's status updates: `running` is
    # then never seen, and that is what the API server says too.
    assert events.phases(1)[0] is Phase.STARTING
    assert events.phases(1)[-1] is Phase.SUCCEEDED
    assert (final.reason, final.exit_code) == (Reason.COMPLETED, 0)
    collected = await executor.collect(1)
    assert json.loads(collected.output) == {"written": "by the pod"}
    assert "hello from a real pod" in collected.log
    (pod,) = await pod_of(k8s_testbed, namespace, 1)
    assert pod.spec.node_name == k8s_real_worker.node_name
    assert pod.status.container_statuses[0].container_id.startswith("containerd://")


async def test_a_non_zero_exit_is_reported_with_its_code(
    open_executor: Callable[[], Any], real_behaviour_image: str
) -> None:
    executor = await open_executor()
    events = Events(executor)
    await executor.start(spec(2, real_behaviour_image, exit_code=3))
    final = await events.wait(2)
    events.close()
    assert (final.phase, final.reason, final.exit_code) == (Phase.FAILED, Reason.CRASHED, 3)


async def test_a_run_over_its_memory_limit_is_oom_killed_by_the_kernel(
    open_executor: Callable[[], Any], real_behaviour_image: str
) -> None:
    executor = await open_executor()
    events = Events(executor)
    await executor.start(spec(3, real_behaviour_image, memory_mb=64, allocate_mb=256, sleep=30))
    final = await events.wait(3)
    events.close()
    assert (final.phase, final.reason, final.exit_code) == (Phase.FAILED, Reason.OOM_KILLED, 137)


async def test_a_run_past_its_deadline_is_stopped_by_the_job_controller(
    open_executor: Callable[[], Any],
    real_behaviour_image: str,
    k8s_testbed: K8sTestbed,
    namespace: str,
) -> None:
    executor = await open_executor()
    events = Events(executor)
    began = time.monotonic()
    await executor.start(spec(4, real_behaviour_image, sleep=120, deadline_seconds=8))
    final = await events.wait(4)
    events.close()
    assert (final.phase, final.reason) == (Phase.FAILED, Reason.DEADLINE_EXCEEDED), events.by_run[4]
    assert Phase.RUNNING in events.phases(4)  # it was really running when it was stopped
    assert time.monotonic() - began < 60
    await pods_gone(k8s_testbed, namespace, 4)  # the Job controller deletes the pod


async def test_killing_a_run_stops_its_real_container(
    open_executor: Callable[[], Any],
    real_behaviour_image: str,
    k8s_testbed: K8sTestbed,
    namespace: str,
) -> None:
    executor = await open_executor()
    events = Events(executor)
    await executor.start(spec(5, real_behaviour_image, sleep=300))
    await events.wait(5, Phase.RUNNING)
    await executor.kill(5)
    final = await events.wait(5, timeout=60)
    events.close()
    assert (final.phase, final.reason) == (Phase.KILLED, Reason.KILLED)
    await pods_gone(k8s_testbed, namespace, 5)


async def test_a_run_killed_while_kubelet_sets_its_pod_up_leaves_no_folder_behind(
    open_executor: Callable[[], Any],
    real_behaviour_image: str,
    k8s_testbed: K8sTestbed,
    namespace: str,
    task_dir: Path,
) -> None:
    # Found by the Kubernetes chaos campaign: the folder removed at cleanup while kubelet
    # still set the pod up came back as root-owned input/output directories (kubelet makes
    # a missing subPath), which the node (not root) could never remove. On a quiet machine
    # kubelet is usually past the mounts before the cleanup comes (this passed 5 of 5 times
    # without the fix): what this proves on the real kubelet is the contract — the folder
    # is gone once the pod is, and stays gone; tests/unit/test_k8s_observe.py the order.
    executor = await open_executor()
    events = Events(executor)
    await executor.start(spec(11, real_behaviour_image, sleep=300))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while not [p for p in await pod_of(k8s_testbed, namespace, 11) if p.spec.node_name]:
        assert loop.time() < deadline, "no pod for the Job on the worker"
        await asyncio.sleep(0.02)
    await executor.kill(11)  # kubelet has the pod now, its container not started yet
    await events.wait(11, timeout=60)
    events.close()
    await executor.cleanup(11)

    await pods_gone(k8s_testbed, namespace, 11)
    folder = task_dir / "run-11"
    deadline = loop.time() + 10
    while folder.exists():  # removed once no pod is left that kubelet could set up
        assert loop.time() < deadline, "the folder stayed after the pod was gone"
        await asyncio.sleep(0.05)
    await asyncio.sleep(2)  # and not made again
    assert not folder.exists(), sorted(str(p) for p in folder.rglob("*"))


async def test_a_restarted_executor_adopts_a_running_pod_and_sees_it_finish(
    open_executor: Callable[[], Any], real_behaviour_image: str
) -> None:
    first = await open_executor()
    events = Events(first)
    await first.start(spec(6, real_behaviour_image, sleep=6, output='{"survived": true}'))
    await events.wait(6, Phase.RUNNING)
    events.close()
    await first.close()  # the node goes away; kubelet keeps running the pod

    second = await open_executor()
    adopted = {state.run_id: state for state in await second.list_runs()}
    assert 6 in adopted
    later = Events(second)
    final = await later.wait(6)
    later.close()
    assert (final.phase, final.reason) == (Phase.SUCCEEDED, Reason.COMPLETED)
    assert json.loads((await second.collect(6)).output) == {"survived": True}


async def test_a_run_cannot_link_its_output_to_the_node_s_environment(
    open_executor: Callable[[], Any], real_behaviour_image: str
) -> None:
    """Issue 13's attack: ``ln -sf /proc/self/environ output`` made the node upload its own
    environment (``FEDNODE_API_KEY``). The output is now a file mount of its own: the run
    cannot replace it, says so, and fails; the node reads nothing but that file."""
    executor = await open_executor()
    events = Events(executor)
    await executor.start(
        spec(6, real_behaviour_image, output="x", output_link="/proc/self/environ")
    )
    final = await events.wait(6)
    events.close()

    collected = await executor.collect(6)
    assert b"PATH=" not in collected.output
    assert collected.output == b"x"
    assert (final.phase, final.reason, final.exit_code) == (Phase.FAILED, Reason.CRASHED, 17)
    assert "cannot replace the output with a link" in collected.log


async def test_a_multi_gigabyte_sparse_output_is_refused_unread_and_the_next_run_completes(
    open_executor: Callable[[], Any], real_behaviour_image: str
) -> None:
    executor = await open_executor()
    events = Events(executor)
    size = 3 * GIB
    await executor.start(spec(7, real_behaviour_image, output="x", output_size=size))
    final = await events.wait(7)
    await collect_unread(executor, 7, size=size)

    assert final.phase is Phase.SUCCEEDED
    await executor.start(spec(8, real_behaviour_image, output="next"))
    assert (await events.wait(8)).phase is Phase.SUCCEEDED
    events.close()
    assert (await executor.collect(8)).output == b"next"
