"""The Kubernetes executor against the real API server (kwok plays the kubelets).

Every executor here acts as a ServiceAccount bound only to the Role of
``executors/kubernetes/rbac.py`` in a fresh namespace enforcing Pod Security ``restricted``;
the admin kubeconfig is used only to set up and to look at what the executor made. kwok
pods run no code: the tests play the container's part by writing the run's output file
into ``task_dir/run-<id>/output`` when the run is reported running
(:class:`~tests.integration.k8s_executor_helpers.EventLog`).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from executors.base import (
    ANNOTATION_SEALED_TOKEN,
    ANNOTATION_TRACEPARENT,
    LABEL_NODE,
    LABEL_RUN,
    ExecutorContext,
    ExecutorError,
    UnknownRun,
)
from executors.kubernetes.client import KubeClient, KubeError, connect
from executors.kubernetes.executor import KubernetesExecutor, run_network_policy_manifests
from executors.kubernetes.manifests import job_name, secret_name
from executors.kubernetes.rbac import ROLE_RULES, proxy_service_rule, role_rules
from executors.spec import Phase, ProxyEndpoint, Reason, Resources
from tests.integration.k8s_executor_helpers import (
    EventLog,
    chart_network_policies,
    make_spec,
    output_of,
    settings_for,
    task_volume,
)
from tests.peers.kubernetes import (
    GPU_NODE,
    POD_EXIT_CODE,
    POD_IMAGE_MISSING,
    POD_OOM_KILLED,
    POD_RUN_SECONDS,
    SCRIPT,
    K8sTestbed,
)

pytestmark = pytest.mark.kubernetes

NODE = "fednode-test-node"


@pytest.fixture
async def admin(k8s_testbed: K8sTestbed) -> AsyncIterator[Any]:
    """The admin client, to set up and to look at what the executor made (never to act
    for it)."""
    async with k8s_testbed.api_client() as api:
        yield api


@pytest.fixture
async def role_kubeconfig(
    k8s_testbed: K8sTestbed, k8s_namespace: str, admin: Any
) -> AsyncIterator[Path]:
    """A ServiceAccount bound to exactly the executor's Role (never admin), in a namespace
    that has the task-directory claim and the runs' NetworkPolicies (as the chart sets it
    up)."""
    async with task_volume(admin, k8s_namespace):
        rules = await chart_network_policies(admin, k8s_namespace, NODE)
        yield await k8s_testbed.service_account_kubeconfig(k8s_namespace, rules=rules)


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tasks"
    path.mkdir()
    return path


@pytest.fixture
async def executor(
    k8s_namespace: str, role_kubeconfig: Path, task_dir: Path
) -> AsyncIterator[KubernetesExecutor]:
    executor = KubernetesExecutor(
        settings_for(k8s_namespace, role_kubeconfig),
        context=ExecutorContext(node_name=NODE, task_dir=task_dir),
    )
    await executor.open()
    yield executor
    await executor.close()


@pytest.fixture
async def events(executor: KubernetesExecutor, task_dir: Path) -> AsyncIterator[EventLog]:
    with EventLog(executor, task_dir) as log:
        yield log


async def read_job(admin: Any, namespace: str, run_id: int) -> dict[str, Any]:
    """The run's Job as plain JSON (as the executor itself sees it)."""
    raw: Any = await client.BatchV1Api(admin).read_namespaced_job(  # the raw response
        job_name(NODE, run_id), namespace, _preload_content=False
    )
    job: dict[str, Any] = await raw.json()
    return job


async def exists(call: Any, *args: Any) -> bool:
    try:
        await call(*args)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


# -- one run, start to cleanup -------------------------------------------------------------


async def test_a_run_is_reported_pending_to_succeeded_and_its_output_collected(
    executor: KubernetesExecutor,
    events: EventLog,
    task_dir: Path,
    admin: Any,
    k8s_namespace: str,
) -> None:
    await executor.start(make_spec(1))
    await events.wait_terminal(1, timeout=30)

    assert events.phases(1) == [Phase.STARTING, Phase.RUNNING, Phase.SUCCEEDED]
    final = events.terminal(1)
    assert final is not None
    assert (final.reason, final.exit_code) == (Reason.COMPLETED, 0)
    output = await executor.collect(1)
    assert output.output == output_of(1)
    assert output.log == ""  # kwok keeps no container logs

    core = client.CoreV1Api(admin)
    await executor.cleanup(1)
    assert not (task_dir / "run-1").exists()
    assert not await exists(
        client.BatchV1Api(admin).read_namespaced_job, job_name(NODE, 1), k8s_namespace
    )
    assert await executor.list_runs() == [] or all(
        s.run_id != 1 for s in await executor.list_runs()
    )
    # the token Secret goes with the Job (owner reference, garbage collector)
    deadline = time.monotonic() + 20
    while await exists(core.read_namespaced_secret, secret_name(NODE, 1), k8s_namespace):
        assert time.monotonic() < deadline, "the token Secret outlived its Job"
        await asyncio.sleep(0.2)


async def test_the_job_is_locked_down_labelled_and_carries_what_a_restart_needs(
    executor: KubernetesExecutor,
    events: EventLog,
    admin: Any,
    k8s_namespace: str,
    task_dir: Path,
) -> None:
    spec = make_spec(2, annotations={POD_RUN_SECONDS: "forever"})
    await executor.start(spec)
    await events.wait_phase(2, Phase.RUNNING)

    job = await read_job(admin, k8s_namespace, 2)
    meta, spec_ = job["metadata"], job["spec"]
    assert meta["labels"][LABEL_RUN] == "2" and meta["labels"][LABEL_NODE] == NODE
    assert meta["annotations"]["fednode.io/task-id"] == "1002"
    assert meta["annotations"][ANNOTATION_TRACEPARENT] == spec.trace_context["traceparent"]
    assert meta["annotations"][ANNOTATION_SEALED_TOKEN] == spec.sealed_token
    assert spec_["backoffLimit"] == 0
    assert spec_["activeDeadlineSeconds"] == spec.deadline_seconds + 1  # 1 s start-time grain
    assert spec_["ttlSecondsAfterFinished"] == 3600
    pod = spec_["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "256Mi"},
        "limits": {"cpu": "500m", "memory": "256Mi"},
    }
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "/mnt/task" not in mounts  # the run's files one by one, never its folder
    assert (mounts["/mnt/task/input"]["subPath"], mounts["/mnt/task/input"]["readOnly"]) == (
        "run-2/input",
        True,
    )
    output = mounts["/mnt/task/output"]  # the API server leaves out readOnly: false
    assert (output["subPath"], output.get("readOnly", False)) == (
        "run-2/output",
        False,
    )
    assert mounts["/mnt/task/token"]["readOnly"] is True
    assert "/tmp" in mounts
    # the token is in a Secret owned by the Job, not on the shared volume
    assert (task_dir / "run-2" / "token").read_text() == ""
    assert (task_dir / "run-2" / "input").read_bytes() == spec.input
    # the pod was admitted under Pod Security restricted (the namespace enforces it)
    pods = await client.CoreV1Api(admin).list_namespaced_pod(
        k8s_namespace, label_selector=f"{LABEL_RUN}=2"
    )
    assert len(pods.items) == 1 and pods.items[0].status.phase == "Running"
    await executor.kill(2)
    await events.wait_terminal(2)


async def test_start_is_idempotent_and_a_repeated_start_creates_nothing(
    executor: KubernetesExecutor,
    events: EventLog,
    admin: Any,
    k8s_namespace: str,
) -> None:
    spec = make_spec(3, annotations={POD_RUN_SECONDS: "forever"})
    await asyncio.gather(executor.start(spec), executor.start(spec))
    await events.wait_phase(3, Phase.RUNNING)
    before = executor.requests.get("create jobs", 0)
    await executor.start(spec)  # known to the informer: not even a request
    assert executor.requests.get("create jobs", 0) == before
    jobs = await client.BatchV1Api(admin).list_namespaced_job(
        k8s_namespace, label_selector=f"{LABEL_RUN}=3"
    )
    assert len(jobs.items) == 1
    await executor.kill(3)
    await events.wait_terminal(3)


# -- many at once -------------------------------------------------------------------------


@pytest.mark.slow
async def test_200_runs_started_at_once_each_reported_once_even_when_finishing_together(
    executor: KubernetesExecutor,
    events: EventLog,
    admin: Any,
    k8s_namespace: str,
) -> None:
    run_ids = list(range(100, 300))
    # every pod runs 2 s after it starts: kwok finishes many of them in the same instant
    specs = [make_spec(r, annotations={POD_RUN_SECONDS: "2"}) for r in run_ids]
    requests_before = sum(executor.requests.values())
    await asyncio.gather(*(executor.start(s) for s in specs))
    await events.wait_terminal(run_ids, timeout=240)
    await asyncio.sleep(1)  # room for a late duplicate to show up

    terminal = Counter(e.run_id for e in events.events if e.phase.is_terminal)
    assert set(terminal) == set(run_ids) and set(terminal.values()) == {1}
    assert all(events.terminal(r).phase is Phase.SUCCEEDED for r in run_ids)  # type: ignore[union-attr]
    # every Job got its pod: all 200 admitted under Pod Security restricted
    for r in run_ids:
        assert events.phases(r)[-2:] == [Phase.RUNNING, Phase.SUCCEEDED]
    # completions landing in the same instant (kwok stamps finishedAt to the second)
    pods = await client.CoreV1Api(admin).list_namespaced_pod(k8s_namespace)
    finished = Counter(
        p.status.container_statuses[0].state.terminated.finished_at for p in pods.items
    )
    assert max(finished.values()) >= 5, finished

    outputs = await asyncio.gather(*(executor.collect(r) for r in run_ids))
    assert [o.output for o in outputs] == [output_of(r) for r in run_ids]
    await asyncio.gather(*(executor.cleanup(r) for r in run_ids))
    per_run = (sum(executor.requests.values()) - requests_before) / len(run_ids)
    assert per_run <= 6, executor.requests


# -- how runs end ---------------------------------------------------------------------------


async def test_kill_deletes_the_job_and_reports_killed(
    executor: KubernetesExecutor,
    events: EventLog,
    admin: Any,
    k8s_namespace: str,
) -> None:
    await executor.start(make_spec(4, annotations={POD_RUN_SECONDS: "forever"}))
    await events.wait_phase(4, Phase.RUNNING)
    await executor.kill(4)
    await events.wait_terminal(4)
    final = events.terminal(4)
    assert final is not None and (final.phase, final.reason) == (Phase.KILLED, Reason.KILLED)
    assert not await exists(
        client.BatchV1Api(admin).read_namespaced_job, job_name(NODE, 4), k8s_namespace
    )
    # the Job is gone, but until cleanup the run is listed as it ended
    assert [(s.run_id, s.phase) for s in await executor.list_runs()] == [(4, Phase.KILLED)]
    await executor.kill(4)  # again, and an unknown run: both ignored
    await executor.kill(999_999)
    await executor.cleanup(4)
    assert await executor.list_runs() == []


async def test_a_kill_racing_the_start_still_kills_the_run(
    executor: KubernetesExecutor,
    events: EventLog,
    admin: Any,
    k8s_namespace: str,
) -> None:
    spec = make_spec(9, annotations={POD_RUN_SECONDS: "forever"})
    await asyncio.gather(executor.start(spec), executor.kill(9))  # the kill finds no Job yet
    await events.wait_terminal(9)
    final = events.terminal(9)
    assert final is not None and final.phase is Phase.KILLED
    await executor.start(spec)  # a start after the kill creates nothing
    assert not await exists(
        client.BatchV1Api(admin).read_namespaced_job, job_name(NODE, 9), k8s_namespace
    )


async def test_a_run_past_its_deadline_fails_with_deadline_exceeded(
    executor: KubernetesExecutor,
    events: EventLog,
) -> None:
    await executor.start(make_spec(5, annotations={POD_RUN_SECONDS: "forever"}, deadline_seconds=2))
    await events.wait_terminal(5, timeout=30)
    final = events.terminal(5)
    assert final is not None
    assert (final.phase, final.reason) == (Phase.FAILED, Reason.DEADLINE_EXCEEDED)


async def test_an_image_that_cannot_be_pulled_fails_fast_and_its_job_is_removed(
    executor: KubernetesExecutor,
    events: EventLog,
    admin: Any,
    k8s_namespace: str,
) -> None:
    began = time.monotonic()
    await executor.start(
        make_spec(
            6, annotations={POD_IMAGE_MISSING: "true"}, image="registry.example/missing/nothing:1"
        )
    )
    await events.wait_terminal(6, timeout=30)
    final = events.terminal(6)
    assert final is not None
    assert (final.phase, final.reason) == (Phase.FAILED, Reason.IMAGE_NOT_FOUND)
    assert "ErrImagePull" in final.message
    assert time.monotonic() - began < 10
    deadline = time.monotonic() + 20
    while await exists(
        client.BatchV1Api(admin).read_namespaced_job, job_name(NODE, 6), k8s_namespace
    ):
        assert time.monotonic() < deadline, "the Job of a run with a bad image lingers"
        await asyncio.sleep(0.2)
    assert (await executor.collect(6)).log == ""


@pytest.mark.parametrize(
    ("annotations", "reason", "exit_code"),
    [({POD_EXIT_CODE: "3"}, Reason.CRASHED, 3), ({POD_OOM_KILLED: "true"}, Reason.OOM_KILLED, 137)],
    ids=["exit-3", "oom-killed"],
)
async def test_a_failing_container_is_reported_with_its_reason_and_exit_code(
    executor: KubernetesExecutor,
    events: EventLog,
    annotations: dict[str, str],
    reason: Reason,
    exit_code: int,
) -> None:
    await executor.start(make_spec(7, annotations=annotations))
    await events.wait_terminal(7)
    final = events.terminal(7)
    assert final is not None
    assert (final.phase, final.reason, final.exit_code) == (Phase.FAILED, reason, exit_code)
    assert [s.phase for s in await executor.list_runs()] == [Phase.FAILED]


async def test_a_job_deleted_behind_the_executors_back_is_reported_lost(
    executor: KubernetesExecutor,
    events: EventLog,
    admin: Any,
    k8s_namespace: str,
) -> None:
    await executor.start(make_spec(8, annotations={POD_RUN_SECONDS: "forever"}))
    await events.wait_phase(8, Phase.RUNNING)
    await client.BatchV1Api(admin).delete_namespaced_job(
        job_name(NODE, 8), k8s_namespace, propagation_policy="Background"
    )
    await events.wait_terminal(8)
    final = events.terminal(8)
    assert final is not None and (final.phase, final.reason) == (Phase.FAILED, Reason.LOST)


async def test_collect_of_a_run_never_seen_is_an_unknown_run(
    executor: KubernetesExecutor,
) -> None:
    with pytest.raises(UnknownRun):
        await executor.collect(424242)


# -- GPUs -----------------------------------------------------------------------------------


async def test_a_gpu_run_lands_on_the_gpu_node_and_the_next_waits_while_gpus_are_taken(
    executor: KubernetesExecutor,
    events: EventLog,
    admin: Any,
    k8s_namespace: str,
) -> None:
    forever = {POD_RUN_SECONDS: "forever"}
    await executor.start(make_spec(10, annotations=forever, gpus=4))
    await events.wait_phase(10, Phase.RUNNING)
    pods = await client.CoreV1Api(admin).list_namespaced_pod(
        k8s_namespace, label_selector=f"{LABEL_RUN}=10"
    )
    assert pods.items[0].spec.node_name == GPU_NODE
    assert pods.items[0].spec.containers[0].resources.limits["nvidia.com/gpu"] == "4"

    await executor.start(make_spec(11, annotations=forever, gpus=1))
    # all 4 GPUs are taken: the run waits unscheduled; it stays "starting"
    await asyncio.sleep(3)
    assert events.phases(11) == [Phase.STARTING]
    assert {s.run_id: s.phase for s in await executor.list_runs()}[11] is Phase.STARTING
    pods = await client.CoreV1Api(admin).list_namespaced_pod(
        k8s_namespace, label_selector=f"{LABEL_RUN}=11"
    )
    assert pods.items[0].spec.node_name is None  # unschedulable: Insufficient nvidia.com/gpu

    await executor.kill(10)  # frees the GPUs: the waiting run is scheduled and runs
    await events.wait_phase(11, Phase.RUNNING, timeout=30)
    pods = await client.CoreV1Api(admin).list_namespaced_pod(
        k8s_namespace, label_selector=f"{LABEL_RUN}=11"
    )
    assert pods.items[0].spec.node_name == GPU_NODE
    await executor.kill(11)
    await events.wait_terminal([10, 11])


async def test_a_run_asking_for_a_gpu_type_no_node_has_waits_unscheduled_with_the_selector(
    k8s_namespace: str, role_kubeconfig: Path, task_dir: Path, admin: Any
) -> None:
    executor = KubernetesExecutor(
        settings_for(k8s_namespace, role_kubeconfig, gpu_type_label="nvidia.com/gpu.product"),
        context=ExecutorContext(node_name=NODE, task_dir=task_dir),
    )
    await executor.open()
    try:
        with EventLog(executor, task_dir) as events:
            spec = make_spec(12, annotations={POD_RUN_SECONDS: "forever"}, gpus=1)
            typed = Resources(cpu=0.5, memory_mb=256, gpus=1, gpu_type="NVIDIA-H100-80GB-HBM3")
            await executor.start(spec.model_copy(update={"resources": typed}))
            await asyncio.sleep(3)
            pods = await client.CoreV1Api(admin).list_namespaced_pod(
                k8s_namespace, label_selector=f"{LABEL_RUN}=12"
            )
            phases = events.phases(12)
            await executor.kill(12)
            await events.wait_terminal([12])
    finally:
        await executor.close()

    (pod,) = pods.items
    assert pod.spec.node_selector["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert pod.spec.node_name is None  # the kwok GPU node has no H100: no node fits
    assert phases == [Phase.STARTING]


# -- least privilege and isolation ----------------------------------------------------------


async def test_the_role_suffices_and_cluster_scoped_or_foreign_requests_are_refused(
    executor: KubernetesExecutor,
    events: EventLog,
    k8s_testbed: K8sTestbed,
    role_kubeconfig: Path,
    k8s_namespace: str,
) -> None:
    # everything above ran as this ServiceAccount; one full run here for good measure
    await executor.start(make_spec(12))
    await events.wait_terminal(12)
    await executor.collect(12)
    await executor.cleanup(12)

    other = await k8s_testbed.create_namespace("fednode-other")
    try:
        async with k8s_testbed.api_client(role_kubeconfig) as api:
            core = client.CoreV1Api(api)
            refused = [
                core.list_node(),
                core.list_namespace(),
                core.read_namespace(other),
                core.list_namespaced_pod(other),
                core.list_namespaced_secret(k8s_namespace),  # not even its own secrets
                client.BatchV1Api(api).list_job_for_all_namespaces(),
            ]
            for call in refused:
                with pytest.raises(ApiException) as caught:
                    await call
                assert caught.value.status == 403
    finally:
        await k8s_testbed.delete_namespace(other)


async def test_open_verifies_the_charts_network_policies_and_refuses_missing_or_changed_ones(
    executor: KubernetesExecutor,
    admin: Any,
    k8s_namespace: str,
    role_kubeconfig: Path,
    task_dir: Path,
) -> None:
    # the executor (open, as the fixture's) only read them: the objects are the chart's
    assert executor.requests["get networkpolicies"] == 2
    assert "apply networkpolicies" not in executor.requests
    api = client.NetworkingV1Api(admin)
    raw: Any = await api.list_namespaced_network_policy(k8s_namespace, _preload_content=False)
    names = sorted(p["metadata"]["name"] for p in (await raw.json())["items"])
    deny_name, egress_name = names  # <prefix>-default-deny, <prefix>-egress

    def opening() -> KubernetesExecutor:
        return KubernetesExecutor(
            settings_for(k8s_namespace, role_kubeconfig),
            context=ExecutorContext(node_name=NODE, task_dir=task_dir),
        )

    # widened behind the node's back: egress anywhere
    await api.patch_namespaced_network_policy(
        egress_name,
        k8s_namespace,
        {"spec": {"egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}},
    )
    with pytest.raises(ExecutorError, match=f"{egress_name}.*differs.*0.0.0.0/0"):
        await opening().open()
    # gone
    await api.delete_namespaced_network_policy(deny_name, k8s_namespace)
    with pytest.raises(ExecutorError, match=f"{deny_name}.*missing.*runs.networkPolicies"):
        await opening().open()


async def test_the_node_token_cannot_write_network_policies_nor_read_or_patch_secrets(
    executor: KubernetesExecutor,
    admin: Any,
    k8s_namespace: str,
    role_kubeconfig: Path,
) -> None:
    policies = f"/apis/networking.k8s.io/v1/namespaces/{k8s_namespace}/networkpolicies"
    secrets = f"/api/v1/namespaces/{k8s_namespace}/secrets"
    name = next(iter(executor_policy_names(k8s_namespace)))
    await client.CoreV1Api(admin).create_namespaced_secret(
        k8s_namespace, {"metadata": {"name": "someone-elses"}, "stringData": {"k": "v"}}
    )
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "open-egress"},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}],
        },
    }
    api = await connect(kubeconfig=role_kubeconfig, context=None, max_connections=4)
    kube = KubeClient(api, request_timeout=10)
    try:
        calls = {
            "create networkpolicies": kube.create(policies, policy, what="t"),
            "apply networkpolicies": kube.apply(
                f"{policies}/open-egress", policy, field_manager="fednode", what="t"
            ),
            "patch its runs' policy": kube.merge_patch(
                f"{policies}/{name}", {"spec": {"egress": [{}]}}, what="t"
            ),
            "delete its runs' policy": kube.delete(f"{policies}/{name}", what="t"),
            "get another policy": kube.get(f"{policies}/open-egress", what="t"),
            "get secrets": kube.get(f"{secrets}/someone-elses", what="t"),
            "patch secrets": kube.merge_patch(
                f"{secrets}/someone-elses", {"stringData": {"k": "w"}}, what="t"
            ),
        }
        statuses = {}
        for what, call in calls.items():
            try:
                await call
                statuses[what] = 200
            except KubeError as error:
                statuses[what] = error.status
    finally:
        await kube.close()
    assert statuses == {what: 403 for what in calls}


def executor_policy_names(namespace: str) -> tuple[str, ...]:
    settings = settings_for(namespace, Path("unused"))
    return tuple(
        p["metadata"]["name"] for p in run_network_policy_manifests(settings, node_name=NODE)
    )


async def test_out_of_a_cluster_the_executor_can_apply_the_policies_itself_idempotently(
    k8s_testbed: K8sTestbed,
    admin: Any,
    task_dir: Path,
) -> None:
    namespace = await k8s_testbed.create_namespace("fednode-apply")
    try:
        async with task_volume(admin, namespace):
            kubeconfig = await k8s_testbed.service_account_kubeconfig(
                namespace, rules=role_rules(NODE, apply_network_policies=True)
            )
            for _ in range(2):  # server-side apply: the same objects, no conflict
                executor = KubernetesExecutor(
                    settings_for(namespace, kubeconfig, network_policies="apply"),
                    context=ExecutorContext(node_name=NODE, task_dir=task_dir),
                )
                await executor.open()
                await executor.close()
        raw: Any = await client.NetworkingV1Api(admin).list_namespaced_network_policy(
            namespace, _preload_content=False
        )
        policies = {p["metadata"]["name"]: p["spec"] for p in (await raw.json())["items"]}
        deny = next(s for n, s in policies.items() if n.endswith("-default-deny"))
        egress = next(s for n, s in policies.items() if n.endswith("-egress"))
        assert deny["policyTypes"] == ["Ingress", "Egress"]
        assert "ingress" not in deny and "egress" not in deny
        assert deny["podSelector"]["matchLabels"][LABEL_NODE] == NODE
        (proxy,) = egress["egress"]  # the proxy, and no DNS
        assert proxy["ports"] == [{"port": 7654, "protocol": "TCP"}]
        assert proxy["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "node"
    finally:
        await k8s_testbed.delete_namespace(namespace)


async def test_open_reads_the_proxy_services_cluster_ip_by_name_and_no_other_service(
    k8s_testbed: K8sTestbed,
    admin: Any,
    task_dir: Path,
) -> None:
    namespace = await k8s_testbed.create_namespace("fednode-proxy-service")
    core = client.CoreV1Api(admin)
    try:
        async with task_volume(admin, namespace):
            rules = await chart_network_policies(admin, namespace, NODE)
            kubeconfig = await k8s_testbed.service_account_kubeconfig(
                namespace, rules=[*rules, proxy_service_rule("fednode-proxy")]
            )

            def opening() -> KubernetesExecutor:
                return KubernetesExecutor(
                    settings_for(namespace, kubeconfig, proxy_service="fednode-proxy"),
                    context=ExecutorContext(node_name=NODE, task_dir=task_dir),
                )

            with pytest.raises(ExecutorError, match="Service 'fednode-proxy' is missing"):
                await opening().open()
            for name in ("fednode-proxy", "someone-elses"):
                await core.create_namespaced_service(
                    namespace,
                    {
                        "metadata": {"name": name},
                        "spec": {
                            "selector": {"app.kubernetes.io/component": "node"},
                            "ports": [{"name": "proxy", "port": 7654, "targetPort": "proxy"}],
                        },
                    },
                )
            proxy = await core.read_namespaced_service("fednode-proxy", namespace)
            executor = opening()
            await executor.open()
            try:
                assert executor.proxy_endpoint() == ProxyEndpoint(
                    host=proxy.spec.cluster_ip, port=7654
                )
                assert executor.requests["get services"] == 1
            finally:
                await executor.close()
            # the node's token reads that one Service, no other, and lists none
            async with k8s_testbed.api_client(kubeconfig) as api:
                as_node = client.CoreV1Api(api)
                for call in (
                    as_node.read_namespaced_service("someone-elses", namespace),
                    as_node.list_namespaced_service(namespace),
                ):
                    with pytest.raises(ApiException) as caught:
                        await call
                    assert caught.value.status == 403
    finally:
        await k8s_testbed.delete_namespace(namespace)


async def test_open_refuses_a_namespace_that_does_not_enforce_restricted(
    k8s_testbed: K8sTestbed,
    task_dir: Path,
) -> None:
    namespace = await k8s_testbed.create_namespace("fednode-baseline", pod_security="baseline")
    try:
        kubeconfig = await k8s_testbed.service_account_kubeconfig(namespace, rules=ROLE_RULES)
        executor = KubernetesExecutor(
            settings_for(namespace, kubeconfig),
            context=ExecutorContext(node_name=NODE, task_dir=task_dir),
        )
        with pytest.raises(ExecutorError, match="restricted"):
            await executor.open()
    finally:
        await k8s_testbed.delete_namespace(namespace)


async def test_open_says_the_api_server_is_unreachable_not_that_a_right_is_missing(
    k8s_namespace: str,
    role_kubeconfig: Path,
    task_dir: Path,
    tmp_path: Path,
) -> None:
    """What a NetworkPolicy that blocks the node's egress to the API server looks like (the
    chart's under Cilium, before networkPolicy.apiServer.cilium): connections that are never
    answered. The node used to advise granting `get namespaces`, a right it had."""

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = yaml.safe_load(await asyncio.to_thread(role_kubeconfig.read_text))
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    blackholed = tmp_path / "blackholed.kubeconfig"
    await asyncio.to_thread(blackholed.write_text, yaml.safe_dump(config))
    executor = KubernetesExecutor(
        settings_for(k8s_namespace, blackholed, request_timeout_seconds=2),
        context=ExecutorContext(node_name=NODE, task_dir=task_dir),
    )
    async with server:
        with pytest.raises(ExecutorError) as refused:
            await executor.open()

    assert "cannot reach the Kubernetes API server" in str(refused.value)
    assert "networkPolicy.apiServer" in str(refused.value)
    assert "grant" not in str(refused.value)


# -- restarts -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_watch_ended_by_the_server_resumes_from_its_version_without_a_relist(
    k8s_namespace: str,
    role_kubeconfig: Path,
    task_dir: Path,
) -> None:
    executor = KubernetesExecutor(
        settings_for(k8s_namespace, role_kubeconfig, watch_timeout_seconds=10),
        context=ExecutorContext(node_name=NODE, task_dir=task_dir),
    )
    await executor.open()
    try:
        with EventLog(executor, task_dir) as log:
            run_ids = [50, 51, 52]
            # they end after the server has closed the first watch requests (10 s)
            await asyncio.gather(
                *(
                    executor.start(make_spec(r, annotations={POD_RUN_SECONDS: "11"}))
                    for r in run_ids
                )
            )
            await log.wait_terminal(run_ids, timeout=40)
            await asyncio.sleep(0.5)
            assert Counter(e.run_id for e in log.events if e.phase.is_terminal) == Counter(run_ids)
        assert all(i.resumes >= 1 and i.relists == 0 for i in executor.informers)
    finally:
        await executor.close()


async def test_a_new_executor_instance_rebuilds_the_runs_from_labels(
    k8s_namespace: str,
    role_kubeconfig: Path,
    task_dir: Path,
) -> None:
    context = ExecutorContext(node_name=NODE, task_dir=task_dir)
    settings = settings_for(k8s_namespace, role_kubeconfig)
    first = KubernetesExecutor(settings, context=context)
    await first.open()
    with EventLog(first, task_dir) as log:
        await first.start(make_spec(30, annotations={POD_RUN_SECONDS: "forever"}))
        await first.start(make_spec(31, annotations={POD_RUN_SECONDS: "2"}))
        await log.wait(
            lambda: Phase.RUNNING in log.phases(30) and Phase.RUNNING in log.phases(31),
            timeout=30,
            what="both running",
        )
    await first.close()  # the node goes down; run 31 finishes meanwhile
    await asyncio.sleep(3)

    second = KubernetesExecutor(settings, context=context)
    await second.open()
    try:
        states = {s.run_id: s for s in await second.list_runs()}
        assert set(states) == {30, 31}
        assert states[30].phase is Phase.RUNNING and states[30].task_id == 1030
        assert states[31].phase is Phase.SUCCEEDED
        assert states[30].trace_context["traceparent"].startswith("00-")
        # what the node needs to admit run 30 to its proxy again (it may not read Secrets)
        assert states[30].sealed_token == "v1.sealed-token-of-run-30"
        with EventLog(second, task_dir) as log:
            await log.wait_terminal(31, timeout=10)  # the finish it missed is reported
            assert (await second.collect(31)).output == output_of(31)
            await second.kill(30)
            await log.wait_terminal(30)
            final = log.terminal(30)
            assert final is not None and final.phase is Phase.KILLED
            await second.cleanup(30)
            await second.cleanup(31)
        assert await second.list_runs() == []
    finally:
        await second.close()


# last in this file: the control plane takes a few seconds to settle after it


@pytest.mark.slow
async def test_a_watch_broken_by_an_apiserver_restart_resumes_and_misses_nothing(
    executor: KubernetesExecutor,
    events: EventLog,
) -> None:
    run_ids = list(range(20, 40))
    # they finish while the API server is down or coming back
    await asyncio.gather(
        *(executor.start(make_spec(r, annotations={POD_RUN_SECONDS: "3"})) for r in run_ids)
    )
    await events.wait(
        lambda: all(Phase.RUNNING in events.phases(r) for r in run_ids),
        timeout=60,
        what="all running",
    )
    restart = await asyncio.create_subprocess_exec(
        str(SCRIPT), "restart-apiserver", stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await restart.communicate()
    assert restart.returncode == 0, out.decode()

    await events.wait_terminal(run_ids, timeout=90)
    await asyncio.sleep(1)
    terminal = Counter(e.run_id for e in events.events if e.phase.is_terminal)
    assert terminal == Counter(run_ids)
    assert all(events.terminal(r).phase is Phase.SUCCEEDED for r in run_ids)  # type: ignore[union-attr]
    assert all(i.resumes + i.relists >= 1 for i in executor.informers)


async def test_a_network_databases_egress_policy_is_verified_and_only_runs_that_asked_carry_it(
    k8s_testbed: K8sTestbed, admin: Any, task_dir: Path
) -> None:
    """The chart's egress policy for a network database, on the real API server: the node
    (with only its Role) reads and checks it at start-up, refuses it widened, and puts the
    database's label only on the pods of runs whose task asked for the database — the
    label the policy selects. (Enforcement itself needs a CNI: tests/e2e/test_real_worker.)"""
    egress = {"clinic": {"cidr": "10.0.4.7/32", "port": 5432}}
    namespace = await k8s_testbed.create_namespace("fednode-dbegress")
    try:
        async with task_volume(admin, namespace):
            rules = await chart_network_policies(admin, namespace, NODE, database_egress=egress)
            kubeconfig = await k8s_testbed.service_account_kubeconfig(namespace, rules=rules)

            def opening() -> KubernetesExecutor:
                return KubernetesExecutor(
                    settings_for(namespace, kubeconfig, database_egress=egress),
                    context=ExecutorContext(node_name=NODE, task_dir=task_dir),
                )

            executor = opening()
            await executor.open()
            reads = executor.requests["get networkpolicies"]
            try:
                await executor.start(
                    make_spec(1).model_copy(update={"requested_databases": ("clinic",)})
                )
                await executor.start(make_spec(2))
                jobs = [await read_job_in(admin, namespace, run_id) for run_id in (1, 2)]
            finally:
                await executor.close()

            (policy,) = [
                p
                for p in run_network_policy_manifests(
                    settings_for(namespace, Path("unused"), database_egress=egress), node_name=NODE
                )
                if p["metadata"]["name"].endswith("-db-clinic")
            ]
            api = client.NetworkingV1Api(admin)
            name = policy["metadata"]["name"]
            await api.patch_namespaced_network_policy(
                name,
                namespace,
                {"spec": {"egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}},
            )
            with pytest.raises(ExecutorError, match=f"{name}.*differs.*0.0.0.0/0"):
                await opening().open()
    finally:
        await k8s_testbed.delete_namespace(namespace)

    assert reads == 3  # default deny, proxy egress, the database's egress
    assert policy["spec"]["podSelector"]["matchLabels"]["fednode.io/db-clinic"] == "true"
    assert policy["spec"]["egress"] == [
        {"to": [{"ipBlock": {"cidr": "10.0.4.7/32"}}], "ports": [{"port": 5432, "protocol": "TCP"}]}
    ]
    asked, not_asked = (job["spec"]["template"]["metadata"]["labels"] for job in jobs)
    assert asked.get("fednode.io/db-clinic") == "true"
    assert "fednode.io/db-clinic" not in not_asked


async def read_job_in(admin: Any, namespace: str, run_id: int) -> dict[str, Any]:
    raw: Any = await client.BatchV1Api(admin).read_namespaced_job(
        job_name(NODE, run_id), namespace, _preload_content=False
    )
    job: dict[str, Any] = await raw.json()
    return job
