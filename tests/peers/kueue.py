"""Real Kueue for the tests: its controller-manager running against the Kubernetes testbed.

``kueue`` (session) starts it through ``scripts/k8s-testbed up --kueue`` (built by
``scripts/kueue-setup``; see :mod:`testbed.kueue` for how it runs without cert-manager) and
stops it at the end if it started it. :class:`KueueQuotas` makes ResourceFlavors,
ClusterQueues and LocalQueues as the cluster's administrator would (as the admin) and
removes them after the test; :func:`kueue_namespace` is a runs namespace whose Jobs Kueue
manages (its webhooks only act on namespaces with :data:`testbed.kueue.NAMESPACE_LABEL`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from testbed import kueue as testbed_kueue
from testbed.kwok import GPU_LABEL, GPU_RESOURCE
from tests.peers.kubernetes import GPU_TOLERATION, K8sTestbed, _testbed

GROUP, VERSION = "kueue.x-k8s.io", "v1beta1"


@pytest.fixture(scope="session")
def kueue(k8s_testbed: K8sTestbed) -> Iterator[None]:
    """Kueue running against the testbed (started here unless it already runs)."""
    if k8s_testbed.external:
        pytest.fail("the Kueue tests run Kueue on the testbed itself", pytrace=False)
    if not testbed_kueue.is_built():
        pytest.fail(
            f"Kueue {testbed_kueue.KUEUE_VERSION} is not built: run scripts/kueue-setup "
            "(scripts/setup-peers does)",
            pytrace=False,
        )
    started_here = not testbed_kueue.healthy()
    result = _testbed("up", "--kueue")
    if result.returncode != 0:
        pytest.fail(
            f"Kueue did not start (scripts/k8s-testbed up --kueue, exit {result.returncode}):"
            f"\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}",
            pytrace=False,
        )
    yield
    if started_here and os.environ.get("FEDNODE_KEEP_PEERS") != "1":
        _testbed("kueue-down", timeout=60)


@pytest.fixture
async def kueue_namespace(k8s_testbed: K8sTestbed, kueue: None) -> AsyncIterator[str]:
    """A fresh restricted namespace whose Jobs Kueue's webhooks see; deleted after."""
    name = await k8s_testbed.create_namespace(
        "fednode-kueue", labels={testbed_kueue.NAMESPACE_LABEL: "true"}
    )
    yield name
    await k8s_testbed.delete_namespace(name)


class KueueQuotas:
    """The cluster administrator's side: flavors and queues, each named uniquely."""

    def __init__(self, api: Any) -> None:
        self._objects = client.CustomObjectsApi(api)
        self._made: list[tuple[str, str | None, str]] = []  # plural, namespace, name
        self.suffix = uuid.uuid4().hex[:6]

    async def gpu_flavor(self) -> str:
        """A ResourceFlavor for the kwok GPU node (Kueue adds its selector and toleration
        to a Job it admits)."""
        name = f"kwok-gpu-{self.suffix}"
        await self._create(
            "resourceflavors",
            None,
            {
                "metadata": {"name": name},
                "spec": {
                    "nodeLabels": {GPU_LABEL: "true"},
                    "tolerations": [GPU_TOLERATION],
                },
            },
        )
        return name

    async def cluster_queue(
        self,
        name: str,
        *,
        flavor: str,
        gpus: int,
        cohort: str | None = None,
        cpu: str = "16",
        memory: str = "64Gi",
    ) -> str:
        name = f"{name}-{self.suffix}"
        spec: dict[str, Any] = {
            "namespaceSelector": {},
            "queueingStrategy": "BestEffortFIFO",
            "resourceGroups": [
                {
                    "coveredResources": ["cpu", "memory", GPU_RESOURCE],
                    "flavors": [
                        {
                            "name": flavor,
                            "resources": [
                                {"name": "cpu", "nominalQuota": cpu},
                                {"name": "memory", "nominalQuota": memory},
                                {"name": GPU_RESOURCE, "nominalQuota": gpus},
                            ],
                        }
                    ],
                }
            ],
        }
        if cohort is not None:
            spec["cohort"] = f"{cohort}-{self.suffix}"
        await self._create("clusterqueues", None, {"metadata": {"name": name}, "spec": spec})
        return name

    async def local_queue(self, namespace: str, name: str, *, cluster_queue: str) -> str:
        await self._create(
            "localqueues",
            namespace,
            {"metadata": {"name": name}, "spec": {"clusterQueue": cluster_queue}},
        )
        return name

    async def workloads(self, namespace: str) -> list[dict[str, Any]]:
        listed = await self._objects.list_namespaced_custom_object(
            GROUP, VERSION, namespace, "workloads"
        )
        return list(listed.get("items") or [])

    async def _create(self, plural: str, namespace: str | None, body: dict[str, Any]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": _KINDS[plural], **body}
        if namespace is None:
            await self._objects.create_cluster_custom_object(GROUP, VERSION, plural, body)
        else:
            await self._objects.create_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, body
            )
        self._made.append((plural, namespace, body["metadata"]["name"]))

    async def remove(self) -> None:
        """Delete what was made, queues before the flavors they use."""
        for plural, namespace, name in reversed(self._made):
            try:
                if namespace is None:
                    await self._objects.delete_cluster_custom_object(GROUP, VERSION, plural, name)
                else:
                    await self._objects.delete_namespaced_custom_object(
                        GROUP, VERSION, namespace, plural, name
                    )
            except ApiException as error:
                if error.status != 404:
                    raise


_KINDS = {
    "resourceflavors": "ResourceFlavor",
    "clusterqueues": "ClusterQueue",
    "localqueues": "LocalQueue",
}


@pytest.fixture
async def kueue_quotas(k8s_testbed: K8sTestbed, kueue: None) -> AsyncIterator[KueueQuotas]:
    async with k8s_testbed.api_client() as api:
        quotas = KueueQuotas(api)
        yield quotas
        await quotas.remove()
