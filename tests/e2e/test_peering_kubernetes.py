"""Algorithm-to-algorithm streams between podman and Kubernetes organizations, on real peers.

Three organizations of one encrypted collaboration on the real vantage6 4.15.2 server:
A and C run fednode on podman (in this process), B is the Helm chart's node on the
testbed's real worker (kubelet, containerd, Cilium enforcing the chart's NetworkPolicies).
They meet at a relay deployed with its own chart (helm/fednode-relay) on the same worker,
which checks node identities with the server. The ``secretsum`` algorithm's runs find each
other with the unchanged vantage6 4 API and exchange shares over TCP:

* A's and C's runs reach B's run through their node's forwarder → relay → B's node pod →
  B's run pod (the runs' ``-peers`` NetworkPolicy admits the node pod only);
* B's run reaches A's and C's through the forwarders on B's node pod (the same policy opens
  egress to those ports on the node pod, nothing else).

Isolation on the same cluster: a pod in B's namespace carrying B's run labels reaches
neither a run's port nor, with another job, anything: the proof is Cilium refusing a
connection from a pod that is not the node to B's run, while the node's streams work.
Nothing here is a fake.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from tests.chaos.kubernetes import images_on_worker
from tests.e2e.conftest import (
    DATA,
    StartNode,
    assert_carried_streams,
    central_sum,
    start_peered_nodes,
)
from tests.peers.helm_node import (
    NODE_POD_LABELS,
    HelmNode,
    RelayRelease,
    ServerRoute,
    helm_node,
    relay_release,
    server_route,
)
from tests.peers.kubernetes import K8sRealWorker, K8sTestbed
from tests.peers.podman import PodmanService
from tests.peers.v6server import V6Collaboration, V6Server

pytestmark = [
    pytest.mark.kubernetes,
    pytest.mark.helm,
    pytest.mark.v6server,
    pytest.mark.podman,
    pytest.mark.slow,
]


@pytest.fixture
async def cluster_side(
    tmp_path: Path,
    k8s_testbed: K8sTestbed,
    k8s_real_worker: K8sRealWorker,
    v6_server: V6Server,
    v6_encrypted_three: V6Collaboration,
    podman_service: PodmanService,
) -> AsyncIterator[tuple[RelayRelease, HelmNode]]:
    """The relay (its chart) and organization B's node (the node chart) on the real worker,
    both installed and Ready."""
    collab = v6_encrypted_three
    _, node_image = await asyncio.to_thread(images_on_worker, tmp_path, k8s_real_worker)
    secretsum = podman_service.secretsum_image
    await asyncio.to_thread(k8s_real_worker.import_images, secretsum)
    assert collab.org_b.private_key is not None
    async with (
        server_route(
            k8s_testbed, k8s_real_worker, host=v6_server.host, port=v6_server.port
        ) as route,
        relay_release(
            k8s_testbed,
            k8s_real_worker,
            tmp_path / "relay",
            route=route,
            api_path=v6_server.api_path,
            image=node_image,
        ) as relay,
        helm_node(
            k8s_testbed,
            k8s_real_worker,
            tmp_path / "site-b",
            route=route,
            api_path=v6_server.api_path,
            api_key=collab.org_b.api_key,
            csv=DATA / "employees_b.csv",
            image=node_image,
            extra_values=peering_values(route, relay, collab.org_b.private_key, secretsum),
        ) as node,
    ):
        await node.install()
        await node.ready_pod(timeout=240)
        log_path = tmp_path / "site-b.log"
        follower = asyncio.create_task(node.follow_logs(log_path))
        try:
            yield relay, node
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            if log_path.exists():  # B's node log, for the failures' sake (pytest shows it)
                lines = log_path.read_text().splitlines()
                print("\n".join(line for line in lines if "stream_ended" not in line)[-30000:])


def peering_values(
    route: ServerRoute, relay: RelayRelease, private_key: Path, secretsum: str
) -> dict[str, Any]:
    repository = secretsum.rpartition(":")[0].replace(".", "\\.")
    return {
        "encryption": {"enabled": True, "privateKey": private_key.read_text()},
        "peering": {
            "relayUrl": relay.url,
            "firstPort": 7700,
            "ports": 8,
            # kubelet pulls the image; the node is told its port as EXPOSE + LABEL say
            "imagePorts": [
                {"image": f"{repository}(:.*)?", "ports": [{"port": 8888, "label": "shares"}]}
            ],
        },
        "networkPolicy": {"relay": {"to": relay.egress_to}},
    }


async def run_pods(node: HelmNode) -> list[Any]:
    async with node.testbed.api_client() as api:
        pods = await client.CoreV1Api(api).list_namespaced_pod(
            node.namespace, label_selector=f"fednode.io/node={node.node_name}"
        )
    return list(pods.items)


async def test_podman_and_kubernetes_organizations_sum_shares_through_a_helm_deployed_relay(
    cluster_side: tuple[RelayRelease, HelmNode],
    v6_encrypted_three: V6Collaboration,
    start_node: StartNode,
    podman_service: PodmanService,
    k8s_real_worker: K8sRealWorker,
    tmp_path: Path,
) -> None:
    relay, site_b = cluster_side
    collab = v6_encrypted_three
    nodes = await start_peered_nodes(start_node, collab, (collab.org_a, collab.more[0]), relay.url)
    await central_sum(collab, podman_service.secretsum_image, "central_secret_sum")
    for node in nodes:
        assert_carried_streams(node, closed_at_least=2)
    # B's runs were pods of the Job: each had its pod IP, and they are gone.
    assert all(p.status.phase in ("Succeeded", "Failed") for p in await run_pods(site_b))


async def test_only_the_node_pod_reaches_a_runs_port_on_kubernetes(
    cluster_side: tuple[RelayRelease, HelmNode],
    k8s_testbed: K8sTestbed,
    k8s_real_worker: K8sRealWorker,
) -> None:
    """The chart's ``-peers`` policy, enforced by Cilium: a pod carrying B's run labels (as
    any run of B's, of another job or not) listens on 8888; another "run", a pod of another
    namespace with no policy of its own, cannot connect; a pod with the node pod's labels
    (what the node's streams come from) can."""
    _, site_b = cluster_side
    worker = k8s_real_worker
    ns = site_b.namespace
    run_labels = {"app.kubernetes.io/managed-by": "fednode", "fednode.io/node": site_b.node_name}
    listener = await worker.listener_pod(ns, "a-run", port=8888, labels=run_labels)
    target = f"{listener}:8888"
    elsewhere = await k8s_testbed.create_namespace("fednode-elsewhere")
    try:
        other_run = await worker.connect_probe(ns, "other-run", [target], labels=run_labels)
        outsider = await worker.connect_probe(elsewhere, "outsider", [target], labels={"app": "x"})
        node_like = await worker.connect_probe(
            ns, "node-like", [target], labels=dict(NODE_POD_LABELS)
        )
    finally:
        await k8s_testbed.delete_namespace(elsewhere)
    assert other_run == {target: False}
    assert outsider == {target: False}
    assert node_like == {target: True}  # the positive control: the policy, not a dead port
