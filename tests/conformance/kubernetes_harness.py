"""The conformance harness for the Kubernetes executor: the real API server, kwok kubelets.

Everything of the executor is real — Jobs and Secrets created as a ServiceAccount bound
only to the executor's Role, the Job controller, the scheduler, Pod Security
``restricted``, the watch streams. What kwok cannot do is run code, so the harness plays
the container's part, and says so:

* a :class:`~tests.conformance.harness.Behaviour` becomes the pod annotations kwok follows
  (``sleep`` → ``fednode.test/run-seconds``, ``exit_code`` → ``fednode.test/exit-code``,
  ``allocate_mb`` above the run's memory → ``fednode.test/oom-killed``: kwok ends the
  container as the kernel would, reason ``OOMKilled``, exit 137);
* the output the behaviour asks for is written into the run's folder
  (``task_dir/run-<id>/output``) when the executor reports the run ``running``, by a thin
  wrapper around the executor's event stream (:class:`PlaysTheContainer`); the attacks
  (``output_size``, ``output_link``) are played there too, as by a container that could
  reach the whole folder: what shows is the node's own refusal, which the real worker's
  file mounts (tests/integration/test_real_worker.py) never let a real run get to;
* kwok keeps no container logs, so a run's log is always empty here;
* images: one containing ``/missing/`` makes kwok report ``ErrImagePull``; the real
  ``average`` and ``diagnostics`` images cannot run, and network isolation is enforced by
  a CNI that kwok does not have — so ``supports`` is ``oom``, ``restart`` and
  ``output-files`` only.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from executors.base import ExecutorContext, ProxyPlacement
from executors.kubernetes.executor import KubernetesExecutor
from executors.kubernetes.manifests import job_name
from executors.spec import Phase, Resources, RunEvent, RunOutput, RunSpec, RunState
from tests.conformance.harness import Behaviour, Harness
from tests.integration.k8s_executor_helpers import (
    chart_network_policies,
    settings_for,
    task_volume,
)
from tests.peers.kubernetes import POD_EXIT_CODE, POD_OOM_KILLED, POD_RUN_SECONDS, K8sTestbed


class PlaysTheContainer:
    """The executor, unchanged, except that its consumer's view of ``running`` comes after
    the harness wrote the run's output file (what the algorithm would have done by then)."""

    kind: ClassVar[str] = KubernetesExecutor.kind

    def __init__(self, executor: KubernetesExecutor, harness: KubernetesHarness) -> None:
        self.inner = executor
        self._harness = harness

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def start(self, spec: RunSpec) -> None:
        await self.inner.start(spec)

    async def kill(self, run_id: int) -> None:
        await self.inner.kill(run_id)

    async def events(self) -> AsyncIterator[RunEvent]:
        async for event in self.inner.events():
            if event.phase is Phase.RUNNING:
                self._harness.write_output(event.run_id)
            yield event

    async def collect(self, run_id: int) -> RunOutput:
        return await self.inner.collect(run_id)

    async def cleanup(self, run_id: int) -> None:
        await self.inner.cleanup(run_id)

    async def list_runs(self) -> list[RunState]:
        return await self.inner.list_runs()

    def proxy_placement(self, *, host: str, advertise_host: str | None) -> ProxyPlacement:
        return self.inner.proxy_placement(host=host, advertise_host=advertise_host)

    async def recover_token(self, state: RunState) -> str:
        return await self.inner.recover_token(state)


class KubernetesHarness(Harness):
    kind: ClassVar[str] = "kubernetes"
    supports: ClassVar[frozenset[str]] = frozenset({"oom", "restart", "output-files"})
    unsupported_because: ClassVar[str] = (
        "kwok pods run no code and kwok has no CNI; the same behaviour on real pods is "
        "proven by tests/integration/test_real_worker.py and tests/e2e/test_real_worker.py"
    )
    slack: ClassVar[float] = 30.0

    def __init__(
        self,
        *,
        testbed: K8sTestbed,
        namespace: str,
        kubeconfig: Path,
        node_name: str,
        task_dir: Path,
    ) -> None:
        super().__init__(node_name=node_name, task_dir=task_dir)
        self.testbed = testbed
        self.namespace = namespace
        self.settings = settings_for(namespace, kubeconfig)
        self._behaviours: dict[int, Behaviour] = {}

    def behaviour_image(self) -> str:
        return "registry.example/fednode/behaviour:kwok"

    def average_image(self) -> str:
        return "registry.example/fednode/average:not-runnable-on-kwok"

    def diagnostics_image(self) -> str:
        return "registry.example/fednode/diagnostics:not-runnable-on-kwok"

    def missing_image(self) -> str:
        return "registry.example/missing/no-such-image:never"  # kwok: ErrImagePull

    def spec(self, run_id: int, behaviour: Behaviour = Behaviour(), **fields: Any) -> RunSpec:
        """The probe run, expressed for kwok (see the module docstring)."""
        resources: Resources = fields.get("resources") or Resources(cpu=1.0, memory_mb=256)
        annotations = {POD_RUN_SECONDS: f"{max(behaviour.sleep, 0.2):g}"}
        if behaviour.exit_code:
            annotations[POD_EXIT_CODE] = str(behaviour.exit_code)
        if behaviour.allocate_mb > resources.memory_mb:
            annotations[POD_OOM_KILLED] = "true"
        self._behaviours[run_id] = behaviour
        return super().spec(run_id, behaviour, annotations=annotations, **fields)

    def write_output(self, run_id: int) -> None:
        behaviour = self._behaviours.get(run_id)
        files = self.files(run_id)
        if behaviour is None or not files.directory.is_dir():
            return
        if behaviour.output:
            files.output.write_bytes(behaviour.output.encode())
        if behaviour.output_size:
            os.truncate(files.output, behaviour.output_size)
        if behaviour.output_link:
            files.output.unlink()
            files.output.symlink_to(behaviour.output_link)

    async def open_executor(self) -> PlaysTheContainer:
        executor = KubernetesExecutor(
            self.settings, context=ExecutorContext(node_name=self.node_name, task_dir=self.task_dir)
        )
        await executor.open()
        return PlaysTheContainer(executor, self)

    async def object_exists(self, run_id: int) -> bool:
        async with self.testbed.api_client() as api:
            try:
                await client.BatchV1Api(api).read_namespaced_job(
                    job_name(self.node_name, run_id), self.namespace
                )
            except ApiException as error:
                if error.status == 404:
                    return False
                raise
        return True


#: Tests of the suite that need a container's log, which kwok does not keep.
NEEDS_CONTAINER_LOGS = (
    "test_a_run_that_exits_non_zero_crashed_with_its_exit_code_and_its_log_is_collected",
)


@pytest.fixture
async def kubernetes_harness(
    k8s_testbed: K8sTestbed, k8s_namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[KubernetesHarness]:
    """A fresh restricted namespace with the task claim and a Role-bound ServiceAccount."""
    if request.node.originalname in NEEDS_CONTAINER_LOGS:
        request.node.add_marker(
            pytest.mark.xfail(
                reason="kwok keeps no container logs (pods/log answers 404); the crash itself "
                "is covered by tests/integration/test_k8s_executor.py",
                strict=True,
            )
        )
    async with k8s_testbed.api_client() as admin, task_volume(admin, k8s_namespace):
        node_name = f"conformance-{uuid.uuid4().hex[:8]}"
        rules = await chart_network_policies(admin, k8s_namespace, node_name)
        kubeconfig = await k8s_testbed.service_account_kubeconfig(k8s_namespace, rules=rules)
        task_dir = tmp_path / "tasks"
        task_dir.mkdir()
        yield KubernetesHarness(
            testbed=k8s_testbed,
            namespace=k8s_namespace,
            kubeconfig=kubeconfig,
            node_name=node_name,
            task_dir=task_dir,
        )
