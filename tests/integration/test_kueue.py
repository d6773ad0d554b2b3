"""The Kubernetes executor with ``executor.kueue`` against real Kueue on the testbed.

Kueue's controller-manager runs as a process against the real API server
(:mod:`tests.peers.kueue`); its quotas are on the kwok GPU node (4 ``nvidia.com/gpu``).
Each executor acts as a ServiceAccount bound only to the Role of
``executors/kubernetes/rbac.py`` with Kueue's rule; the admin makes the queues, as a
cluster administrator would. kwok pods run no code (the tests write the run's output, see
:class:`~tests.integration.k8s_executor_helpers.EventLog`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from executors.base import ExecutorContext
from executors.kubernetes.executor import KubernetesExecutor
from executors.kubernetes.manifests import LABEL_KUEUE_QUEUE, job_name
from executors.kubernetes.rbac import role_rules
from executors.spec import Phase, Reason
from tests.integration.k8s_executor_helpers import (
    EventLog,
    chart_network_policies,
    make_spec,
    settings_for,
    task_volume,
)
from tests.peers.kubernetes import POD_RUN_SECONDS, K8sTestbed
from tests.peers.kueue import KueueQuotas

pytestmark = pytest.mark.kubernetes


@contextlib.asynccontextmanager
async def kueue_node(
    k8s_testbed: K8sTestbed, namespace: str, *, node: str, queue: str, tmp_path: Path
) -> AsyncIterator[EventLog]:
    """A node's Kubernetes executor in ``namespace`` whose runs go to LocalQueue ``queue``,
    with what the chart gives it (task claim, runs' NetworkPolicies, the Role with Kueue's
    rule), and the log of its events."""
    task_dir = tmp_path / node
    task_dir.mkdir()
    async with k8s_testbed.api_client() as admin, task_volume(admin, namespace):
        await chart_network_policies(admin, namespace, node)
        kubeconfig = await k8s_testbed.service_account_kubeconfig(
            namespace, rules=role_rules(node, kueue=True)
        )
        executor = KubernetesExecutor(
            settings_for(namespace, kubeconfig, kueue={"queue_name": queue}),
            context=ExecutorContext(node_name=node, task_dir=task_dir),
        )
        await executor.open()
        try:
            with EventLog(executor, task_dir) as log:
                yield log
        finally:
            await executor.close()


def admitted_at_once(log: EventLog, run_ids: list[int]) -> int:
    """The most runs that were admitted (past ``pending``) and not yet ended at one time."""
    edges: list[tuple[float, int]] = []
    for run_id in run_ids:
        events = log.by_run[run_id]
        admitted = next(e for e in events if e.phase is not Phase.PENDING)
        ended = next(e for e in events if e.phase.is_terminal)
        edges += [(admitted.at.timestamp(), 1), (ended.at.timestamp(), -1)]
    most = current = 0
    for _, step in sorted(edges, key=lambda edge: (edge[0], edge[1])):  # ends before starts
        current += step
        most = max(most, current)
    return most


async def test_a_cluster_queue_of_two_gpus_admits_two_gpu_runs_at_once_and_all_complete(
    k8s_testbed: K8sTestbed, kueue_namespace: str, kueue_quotas: KueueQuotas, tmp_path: Path
) -> None:
    flavor = await kueue_quotas.gpu_flavor()
    cluster_queue = await kueue_quotas.cluster_queue("two-gpus", flavor=flavor, gpus=2)
    queue = await kueue_quotas.local_queue(kueue_namespace, "runs", cluster_queue=cluster_queue)
    runs = list(range(1, 7))

    async with kueue_node(
        k8s_testbed, kueue_namespace, node="kueue-node", queue=queue, tmp_path=tmp_path
    ) as log:
        for run_id in runs:
            await log.executor.start(
                make_spec(run_id, gpus=1, annotations={POD_RUN_SECONDS: "1.5"})
            )
        await log.wait_terminal(runs, timeout=180)

    assert [log.terminal(r).phase for r in runs] == [Phase.SUCCEEDED] * 6  # type: ignore[union-attr]
    assert admitted_at_once(log, runs) == 2
    waited = [r for r in runs if log.phases(r)[0] is Phase.PENDING]
    assert len(waited) == 6, "every run waited for Kueue before it started"
    reasons = [e.message for r in runs for e in log.by_run[r] if e.phase is Phase.PENDING]
    assert any("insufficient unused quota for nvidia.com/gpu" in m for m in reasons), reasons


async def test_a_second_nodes_queue_in_the_same_cohort_borrows_idle_gpu_quota(
    k8s_testbed: K8sTestbed, kueue_quotas: KueueQuotas, tmp_path: Path, kueue: None
) -> None:
    flavor = await kueue_quotas.gpu_flavor()
    lender = await kueue_quotas.cluster_queue("site-a", flavor=flavor, gpus=2, cohort="sites")
    borrower = await kueue_quotas.cluster_queue(
        "site-b", flavor=flavor, gpus=0, cohort="sites", cpu="0", memory="0"
    )
    from testbed.kueue import NAMESPACE_LABEL

    first = await k8s_testbed.create_namespace("fednode-kueue", labels={NAMESPACE_LABEL: "true"})
    second = await k8s_testbed.create_namespace("fednode-kueue", labels={NAMESPACE_LABEL: "true"})
    try:
        await kueue_quotas.local_queue(first, "runs", cluster_queue=lender)
        queue = await kueue_quotas.local_queue(second, "runs", cluster_queue=borrower)
        async with kueue_node(
            k8s_testbed, second, node="kueue-node-b", queue=queue, tmp_path=tmp_path
        ) as log:
            for run_id in (1, 2):
                await log.executor.start(
                    make_spec(run_id, gpus=1, annotations={POD_RUN_SECONDS: "4"})
                )
            await log.wait(
                lambda: all(Phase.RUNNING in log.phases(r) for r in (1, 2)),
                timeout=90,
                what="both runs of the borrowing queue running",
            )
            workloads = await kueue_quotas.workloads(second)
            await log.wait_terminal([1, 2], timeout=90)
    finally:
        await k8s_testbed.delete_namespace(first)
        await k8s_testbed.delete_namespace(second)

    assert admitted_at_once(log, [1, 2]) == 2  # on a queue whose own GPU quota is 0
    assert [log.terminal(r).phase for r in (1, 2)] == [Phase.SUCCEEDED] * 2  # type: ignore[union-attr]
    # both admitted at once through the borrower's queue, one GPU each (none of its own)
    admissions = [w["status"].get("admission") or {} for w in workloads]
    assert [a.get("clusterQueue") for a in admissions] == [borrower, borrower], workloads
    assert all(
        a["podSetAssignments"][0]["resourceUsage"]["nvidia.com/gpu"] == "1" for a in admissions
    )


async def test_a_run_larger_than_any_quota_waits_with_kueues_reason_and_can_be_killed(
    k8s_testbed: K8sTestbed,
    kueue_namespace: str,
    kueue_quotas: KueueQuotas,
    tmp_path: Path,
) -> None:
    flavor = await kueue_quotas.gpu_flavor()
    cluster_queue = await kueue_quotas.cluster_queue("two-gpus", flavor=flavor, gpus=2)
    queue = await kueue_quotas.local_queue(kueue_namespace, "runs", cluster_queue=cluster_queue)

    async with (
        k8s_testbed.api_client() as admin,
        kueue_node(
            k8s_testbed, kueue_namespace, node="kueue-node", queue=queue, tmp_path=tmp_path
        ) as log,
    ):
        await log.executor.start(make_spec(1, gpus=3))
        await log.wait(
            lambda: any("maximum capacity" in e.message for e in log.by_run[1]),
            timeout=60,
            what="Kueue's reason why run 1 cannot be admitted",
        )
        job = await _job(admin, kueue_namespace, "kueue-node", 1)
        states = await log.executor.list_runs()
        await log.executor.kill(1)
        await log.wait_terminal(1, timeout=30)

    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][LABEL_KUEUE_QUEUE] == queue
    assert [s.phase for s in states if s.run_id == 1] == [Phase.PENDING]
    assert set(log.phases(1)) == {Phase.PENDING, Phase.KILLED}  # never failed, never ran
    assert log.terminal(1).reason is Reason.KILLED  # type: ignore[union-attr]
    waiting = [e.message for e in log.by_run[1] if e.phase is Phase.PENDING]
    assert "insufficient quota for nvidia.com/gpu" in waiting[-1], waiting


async def _job(admin: Any, namespace: str, node: str, run_id: int) -> dict[str, Any]:
    from kubernetes_asyncio import client

    raw: Any = await client.BatchV1Api(admin).read_namespaced_job(
        job_name(node, run_id), namespace, _preload_content=False
    )
    job: dict[str, Any] = await raw.json()
    return job
