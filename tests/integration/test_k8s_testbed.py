"""Smoke tests of the Kubernetes testbed: the promises executor tests rely on.

Each test talks to the real kube-apiserver with kubernetes_asyncio and observes outcomes
through watches: admission (Pod Security ``restricted``), scheduling onto kwok nodes
(including extended GPU resources and taints), and the pod behaviours the kwok stages
play from annotations (success, exit codes, OOM, missing images, deletion).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from tests.peers.kubernetes import (
    GPU_NODE,
    GPU_RESOURCE,
    GPU_TOLERATION,
    POD_EXIT_CODE,
    POD_IMAGE_MISSING,
    POD_OOM_KILLED,
    POD_RUN_SECONDS,
    K8sTestbed,
)

pytestmark = pytest.mark.kubernetes

IMAGE = "localhost/fednode/algorithm-test:1"


def restricted_pod_spec(
    *, resources: dict[str, Any] | None = None, tolerations: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A pod spec that satisfies Pod Security ``restricted`` (what fednode submits)."""
    return {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "tolerations": tolerations or [],
        "containers": [
            {
                "name": "algorithm",
                "image": IMAGE,
                "resources": resources or {"limits": {"cpu": "100m", "memory": "64Mi"}},
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
    }


def job(name: str, *, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": annotations or {}},
                "spec": restricted_pod_spec(),
            },
        },
    }


def pod(name: str, *, annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": restricted_pod_spec(**spec),
    }


async def watch_until(
    list_fn: Callable[..., Any],
    namespace: str,
    until: Callable[[Any], bool],
    *,
    within: float = 30,
    **selectors: str,
) -> Any:
    """List, then watch from that resourceVersion, until an object satisfies ``until``."""
    async with asyncio.timeout(within):
        listed = await list_fn(namespace, **selectors)
        for item in listed.items:
            if until(item):
                return item
        version = listed.metadata.resource_version
        while True:
            async with watch.Watch() as w:
                async for event in w.stream(
                    list_fn,
                    namespace,
                    resource_version=version,
                    timeout_seconds=int(within),
                    **selectors,
                ):
                    obj = event["object"]
                    version = obj.metadata.resource_version
                    if event["type"] in ("ADDED", "MODIFIED") and until(obj):
                        return obj


def condition(obj: Any, kind: str) -> Any:
    return next((c for c in (obj.status.conditions or []) if c.type == kind), None)


def job_finished(job: Any) -> bool:
    return any(
        c.type in ("Complete", "Failed") and c.status == "True"
        for c in (job.status.conditions or [])
    )


async def test_compliant_job_in_restricted_namespace_runs_on_a_kwok_node_and_succeeds(
    k8s_testbed: K8sTestbed,
    k8s_namespace: str,
) -> None:
    # Acting as fednode would: a namespaced ServiceAccount's token, not admin.
    executor = await k8s_testbed.service_account_kubeconfig(k8s_namespace)
    async with k8s_testbed.api_client(executor) as api:
        batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
        await batch.create_namespaced_job(k8s_namespace, job("run-1"))

        succeeded = await watch_until(
            core.list_namespaced_pod,
            k8s_namespace,
            lambda p: p.status.phase == "Succeeded",
            label_selector="job-name=run-1",
        )
        finished = await watch_until(
            batch.list_namespaced_job,
            k8s_namespace,
            job_finished,
            field_selector="metadata.name=run-1",
        )

    assert succeeded.spec.node_name.startswith("kwok-cpu-")
    terminated = succeeded.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (0, "Completed")
    assert condition(finished, "Complete").status == "True"
    assert finished.status.succeeded == 1


async def test_privileged_pod_is_rejected_by_pod_security(
    k8s_testbed: K8sTestbed,
    k8s_namespace: str,
) -> None:
    bad = pod("privileged")
    bad["spec"]["securityContext"] = {}
    bad["spec"]["containers"][0]["securityContext"] = {"privileged": True, "runAsUser": 0}

    async with k8s_testbed.api_client() as api:
        with pytest.raises(ApiException) as raised:
            await client.CoreV1Api(api).create_namespaced_pod(k8s_namespace, bad)

    assert raised.value.status == 403
    message = json.loads(raised.value.body or b"{}")["message"]
    assert 'violates PodSecurity "restricted:latest"' in message
    assert "privileged" in message


async def test_gpu_pods_land_on_the_gpu_node_until_its_gpus_run_out(
    k8s_testbed: K8sTestbed,
    k8s_namespace: str,
) -> None:
    def gpu_pod(name: str, gpus: int) -> dict[str, Any]:
        limits = {"cpu": "100m", "memory": "64Mi", GPU_RESOURCE: str(gpus)}
        return pod(
            name,
            annotations={POD_RUN_SECONDS: "forever"},
            resources={"limits": limits},
            tolerations=[GPU_TOLERATION],
        )

    async with k8s_testbed.api_client() as api:
        core = client.CoreV1Api(api)
        await core.create_namespaced_pod(k8s_namespace, gpu_pod("two-gpus", 2))
        running = await watch_until(
            core.list_namespaced_pod,
            k8s_namespace,
            lambda p: p.status.phase == "Running",
            field_selector="metadata.name=two-gpus",
        )
        await core.create_namespaced_pod(k8s_namespace, gpu_pod("three-gpus", 3))
        unschedulable = await watch_until(
            core.list_namespaced_pod,
            k8s_namespace,
            lambda p: getattr(condition(p, "PodScheduled"), "reason", None) == "Unschedulable",
            field_selector="metadata.name=three-gpus",
        )

    assert running.spec.node_name == GPU_NODE
    assert unschedulable.status.phase == "Pending"
    assert unschedulable.spec.node_name is None
    assert f"Insufficient {GPU_RESOURCE}" in condition(unschedulable, "PodScheduled").message


async def test_exit_code_annotation_fails_the_job_with_that_exit_code(
    k8s_testbed: K8sTestbed,
    k8s_namespace: str,
) -> None:
    async with k8s_testbed.api_client() as api:
        batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
        await batch.create_namespaced_job(
            k8s_namespace, job("crashes", annotations={POD_EXIT_CODE: "3", POD_RUN_SECONDS: "0.2"})
        )
        failed_job = await watch_until(
            batch.list_namespaced_job,
            k8s_namespace,
            job_finished,
            field_selector="metadata.name=crashes",
        )
        pods = await core.list_namespaced_pod(k8s_namespace, label_selector="job-name=crashes")

    assert condition(failed_job, "Failed").status == "True"
    assert condition(failed_job, "Failed").reason == "BackoffLimitExceeded"
    [failed_pod] = pods.items
    assert failed_pod.status.phase == "Failed"
    terminated = failed_pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")


@pytest.mark.parametrize(
    ("annotations", "image", "phase", "expect"),
    [
        (
            {POD_OOM_KILLED: "true", POD_RUN_SECONDS: "0.2"},
            IMAGE,
            "Failed",
            {"terminated": (137, "OOMKilled")},
        ),
        ({POD_IMAGE_MISSING: "true"}, IMAGE, "Pending", {"waiting": "ErrImagePull"}),
        ({}, "localhost/missing/algorithm:1", "Pending", {"waiting": "ErrImagePull"}),
    ],
    ids=["oom-killed", "image-missing-annotation", "image-missing-by-name"],
)
async def test_pod_outcome_follows_its_annotations(
    k8s_testbed: K8sTestbed,
    k8s_namespace: str,
    annotations: dict[str, str],
    image: str,
    phase: str,
    expect: dict[str, Any],
) -> None:
    manifest = pod("outcome", annotations=annotations)
    manifest["spec"]["containers"][0]["image"] = image

    def settled(p: Any) -> bool:
        statuses = p.status.container_statuses or []
        if "waiting" in expect:
            return any(
                s.state.waiting and s.state.waiting.reason == expect["waiting"] for s in statuses
            )
        return bool(p.status.phase == phase)

    async with k8s_testbed.api_client() as api:
        core = client.CoreV1Api(api)
        await core.create_namespaced_pod(k8s_namespace, manifest)
        seen = await watch_until(
            core.list_namespaced_pod, k8s_namespace, settled, field_selector="metadata.name=outcome"
        )

    assert seen.status.phase == phase
    state = seen.status.container_statuses[0].state
    if "terminated" in expect:
        assert (state.terminated.exit_code, state.terminated.reason) == expect["terminated"]


async def test_deleting_a_job_in_the_background_removes_its_running_pod(
    k8s_testbed: K8sTestbed,
    k8s_namespace: str,
) -> None:
    async with k8s_testbed.api_client() as api:
        batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
        await batch.create_namespaced_job(
            k8s_namespace, job("long", annotations={POD_RUN_SECONDS: "forever"})
        )
        running = await watch_until(
            core.list_namespaced_pod,
            k8s_namespace,
            lambda p: p.status.phase == "Running",
            label_selector="job-name=long",
        )

        listed = await core.list_namespaced_pod(k8s_namespace, label_selector="job-name=long")
        await batch.delete_namespaced_job("long", k8s_namespace, propagation_policy="Background")
        gone = False
        async with asyncio.timeout(30), watch.Watch() as w:
            async for event in w.stream(
                core.list_namespaced_pod,
                k8s_namespace,
                label_selector="job-name=long",
                resource_version=listed.metadata.resource_version,
                timeout_seconds=30,
            ):
                if event["type"] == "DELETED":
                    gone = event["object"].metadata.name == running.metadata.name
                    break

    assert gone
