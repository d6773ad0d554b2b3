"""The Helm chart end to end on the real kubelet: install, tasks, upgrade in flight, uninstall.

Nothing of the node runs in this process: ``helm install`` deploys it as an operator would
(:mod:`tests.peers.helm_node`), the node pod runs the node image built from these sources
on the testbed's real worker with the chart's ServiceAccount, ConfigMap, Secret, claims and
NetworkPolicies, and its runs are Job pods beside it. The vantage6 4.15.2 server is the
session's, reached from the pod network through a relay the node's NetworkPolicy names.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from tests.chaos.accounting import read_node_log
from tests.chaos.kubernetes import images_on_worker, node_objects, recording
from tests.peers.helm_node import FULLNAME, HelmNode, helm_node, server_route
from tests.peers.kubernetes import K8sRealWorker, K8sTestbed
from tests.peers.podman import AVERAGE_IMAGE
from tests.peers.stack import CSV_OF
from tests.peers.v6server import V6Collaboration, V6Server

pytestmark = [
    pytest.mark.kubernetes,
    pytest.mark.helm,
    pytest.mark.v6server,
    pytest.mark.podman,
    pytest.mark.slow,
]


@pytest.fixture
async def site(
    tmp_path: Path,
    k8s_testbed: K8sTestbed,
    k8s_real_worker: K8sRealWorker,
    v6_server: V6Server,
    v6_plain: V6Collaboration,
) -> AsyncIterator[tuple[HelmNode, str]]:
    """The release for organization A of the session's plain collaboration (not installed
    yet) and the probe image."""
    probe, node_image = await asyncio.to_thread(images_on_worker, tmp_path, k8s_real_worker)
    async with (
        server_route(
            k8s_testbed, k8s_real_worker, host=v6_server.host, port=v6_server.port
        ) as route,
        helm_node(
            k8s_testbed,
            k8s_real_worker,
            tmp_path / "site",
            route=route,
            api_path=v6_server.api_path,
            api_key=v6_plain.org_a.api_key,
            csv=CSV_OF["a"],
            image=node_image,
        ) as node,
    ):
        yield node, probe


def create(collab: V6Collaboration, image: str, input_: dict[str, Any]) -> dict[str, Any]:
    return collab.create_task(input_=input_, image=image, organizations=[collab.org_a.id])


async def results_of(collab: V6Collaboration, task: dict[str, Any], timeout: float = 240) -> Any:
    user = collab.user
    await asyncio.to_thread(user.wait_for_results, task["id"], timeout=timeout)
    return await asyncio.to_thread(user.result_values, task["id"])


async def running_pods(node: HelmNode, count: int, *, timeout: float = 120) -> None:
    """Until ``count`` run pods of the node are Running."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        async with node.testbed.api_client() as api:
            pods = await client.CoreV1Api(api).list_namespaced_pod(
                node.namespace, label_selector=f"fednode.io/node={node.node_name}"
            )
        if sum(p.status.phase == "Running" for p in pods.items) >= count:
            return
        assert loop.time() < deadline, [p.status.phase for p in pods.items]
        await asyncio.sleep(1)


async def test_helm_install_tasks_upgrade_with_runs_in_flight_and_uninstall_on_the_real_worker(
    site: tuple[HelmNode, str], v6_plain: V6Collaboration, tmp_path: Path
) -> None:
    node, probe = site
    log_path = tmp_path / "node.log"

    installed = await node.install()
    first = await node.ready_pod(timeout=240)
    follower = asyncio.create_task(node.follow_logs(log_path))
    async with recording(node.testbed, node.namespace, node.node_name) as record:
        # tasks: a run of the probe, and a central run whose subtask goes through the proxy
        short = await asyncio.to_thread(
            create, v6_plain, probe, {"sleep": 0.2, "output": '{"short": 1}'}
        )
        central = await asyncio.to_thread(
            create,
            v6_plain,
            AVERAGE_IMAGE,
            {
                "method": "central_average",
                "kwargs": {
                    "column_name": "age",
                    "organizations": [v6_plain.org_a.id],
                },
            },
        )
        assert await results_of(v6_plain, short) == [{"short": 1}]
        (average,) = await results_of(v6_plain, central)
        # runs in flight, then an upgrade that changes the node's config (a new pod)
        slow = [
            await asyncio.to_thread(
                create, v6_plain, probe, {"sleep": 25, "output": json.dumps({"slow": i})}
            )
            for i in range(3)
        ]
        await running_pods(node, 3)
        upgraded = await node.upgrade({"logging": {"level": "DEBUG"}, "maxConcurrentRuns": 4})
        second = await node.ready_pod(timeout=240, not_uid=first["metadata"]["uid"])
        slow_results = [await results_of(v6_plain, task) for task in slow]
        runs = {
            task["id"]: await asyncio.to_thread(v6_plain.user.runs, task["id"])
            for task in (short, central, *slow)
        }
        node_runs = [r["id"] for rs in runs.values() for r in rs]
        jobs_before_uninstall = await node_objects(node, "jobs")
    follower.cancel()
    await asyncio.gather(follower, return_exceptions=True)
    manifest = await asyncio.to_thread(node.manifest)
    uninstalled = await node.uninstall()
    left = {p: await node_objects(node, p) for p in ("jobs", "pods", "secrets", "networkpolicies")}
    async with node.testbed.api_client() as api:
        core = client.CoreV1Api(api)
        claims = await core.list_namespaced_persistent_volume_claim(node.namespace)
        namespace = await core.read_namespace(node.namespace)
        secrets = await core.list_namespaced_secret(node.namespace)
        admission = client.AdmissionregistrationV1Api(api)
        policies = await admission.list_validating_admission_policy()
        pods = await core.list_namespaced_pod(node.namespace)

    assert "Warning" not in installed and "PodSecurity" not in installed, installed
    assert "Warning" not in upgraded, upgraded
    assert average["average"] == pytest.approx(40.0)
    assert slow_results == [[{"slow": i}] for i in range(3)]
    assert all(r["status"] == "completed" for rs in runs.values() for r in rs), runs
    # the upgrade replaced the node pod while the three runs went on: none ran twice
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    jobs, run_pods = record.counts()["Jobs"], record.counts()["pods"]
    assert all(jobs[run] == 1 for run in node_runs), jobs
    assert all(run_pods[run] == 1 for run in node_runs), run_pods
    reports = read_node_log(log_path).reports
    assert all(reports[run] <= 1 for run in node_runs), reports
    assert jobs_before_uninstall == []  # every finished run's Job removed by the node
    # uninstall: nothing of the node or of the release left but what the chart keeps
    assert left == {"jobs": [], "pods": [], "secrets": [], "networkpolicies": []}
    assert [p.metadata.name for p in pods.items] == []
    assert [s.metadata.name for s in secrets.items] == []
    assert [c.metadata.name for c in claims.items if not c.metadata.deletion_timestamp] == [
        f"{FULLNAME}-tasks"
    ]
    assert namespace.status.phase == "Active"
    assert f"[PersistentVolumeClaim] {FULLNAME}-tasks" in uninstalled  # helm says it kept it
    release_policies = [
        o["metadata"]["name"] for o in manifest if o["kind"] == "ValidatingAdmissionPolicy"
    ]
    assert release_policies  # the chart made some, and they are gone
    assert not {p.metadata.name for p in policies.items} & set(release_policies)
    assert not sorted(node.task_dir.glob("run-*"))
