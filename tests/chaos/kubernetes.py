"""The chaos campaign on Kubernetes: the Helm-deployed node's pod force-deleted under a task stream.

The same task stream and the same accounting as the podman campaign
(:mod:`tests.chaos.campaign`), with the node deployed the way an operator deploys it
(:mod:`tests.peers.helm_node`): the chart installed by a real helm, the node image from
these sources in the real worker's containerd, the node pod and every run's Job pod
running on the real kubelet under Pod Security ``restricted`` and the chart's
NetworkPolicies. The vantage6 4.15.2 server is private to the campaign and listens on the
pod bridge's address (pods reach it through a relay pod, as the node's NetworkPolicy
allows).

The fault: ``deletions`` times (and on until the last task is created), wait a random
moment after the node pod is Ready (or, for a share of them, after its container started:
during start-up and reconcile), then delete the pod with grace period 0. The API object
goes at once; the Deployment's ReplicaSet creates the next pod while kubelet kills the old
container. At random points the server is restarted too.

Records the node does not write: the server's runs, results and tasks; a watch on the
namespace's Jobs and pods (started before the first task) that notes every UID per run, so
a run that got two Jobs (or whose Job made two pods) shows; after ``helm uninstall``, the
Jobs, pods, Secrets and NetworkPolicies of the node still in the namespace, and the
``run-*`` directories in the task volume. The node's log (every pod's, followed while it
lived) is read only for how often it reported a run finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from executors.base import LABEL_NODE, LABEL_RUN
from tests.chaos.accounting import Faults, Verdict, judge, read_node_log
from tests.chaos.campaign import (
    CampaignConfig,
    Researcher,
    Say,
    every,
    feed,
    restart_server,
    server_records,
)
from tests.chaos.processes import PodmanServiceProcess
from tests.chaos.userapi import UserApi
from tests.chaos.workload import plan
from tests.peers import podman as podman_peer
from tests.peers.helm_node import (
    HelmNode,
    build_node_image,
    helm_node,
    patiently,
    server_route,
)
from tests.peers.kubernetes import K8sRealWorker, K8sTestbed
from tests.peers.stack import CSV_OF, server_with_collaboration


@dataclass
class RuntimeRecord:
    """Every Job and pod UID the API server showed for each run of one node."""

    jobs: dict[int, set[str]] = field(default_factory=dict)
    pods: dict[int, set[str]] = field(default_factory=dict)

    def counts(self) -> dict[str, Counter[int]]:
        return {
            "Jobs": Counter({run: len(uids) for run, uids in self.jobs.items()}),
            "pods": Counter({run: len(uids) for run, uids in self.pods.items()}),
        }


@contextlib.asynccontextmanager
async def recording(testbed: K8sTestbed, namespace: str, node_name: str) -> Any:
    """Watch the node's Jobs and pods in ``namespace`` while the block runs."""
    record = RuntimeRecord()
    tasks = [
        asyncio.create_task(_watch(testbed, namespace, node_name, kind, into))
        for kind, into in (("jobs", record.jobs), ("pods", record.pods))
    ]
    try:
        yield record
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _watch(
    testbed: K8sTestbed, namespace: str, node_name: str, kind: str, into: dict[int, set[str]]
) -> None:
    """List, then watch from the list's resourceVersion; resume after a break, list again
    after ``410 Gone`` (what was created and deleted in between would be missed: logged)."""
    from kubernetes_asyncio import client, watch
    from kubernetes_asyncio.client.exceptions import ApiException

    selector = f"{LABEL_NODE}={node_name}"

    def note(obj: dict[str, Any]) -> None:
        run = (obj["metadata"].get("labels") or {}).get(LABEL_RUN)
        if run is not None:
            into.setdefault(int(run), set()).add(obj["metadata"]["uid"])

    async with testbed.api_client() as api:
        lister: Any = (
            client.BatchV1Api(api).list_namespaced_job
            if kind == "jobs"
            else client.CoreV1Api(api).list_namespaced_pod
        )
        version: str | None = None
        while True:
            try:
                if version is None:
                    response = await lister(
                        namespace, label_selector=selector, _preload_content=False
                    )
                    listed = await response.json()
                    for item in listed["items"]:
                        note(item)
                    version = listed["metadata"]["resourceVersion"]
                async with watch.Watch() as stream:
                    async for event in stream.stream(
                        lister,
                        namespace,
                        label_selector=selector,
                        resource_version=version,
                        allow_watch_bookmarks=True,
                        timeout_seconds=120,
                        _preload_content=False,
                    ):
                        obj = event["raw_object"]
                        if event["type"] == "ERROR":
                            if obj.get("code") == 410:
                                print(f"chaos: {kind} watch expired (410); listing again")
                                version = None
                            break
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            note(obj)
            except ApiException as error:
                if error.status == 410:
                    version = None
                await asyncio.sleep(1)
            except (TimeoutError, OSError):
                await asyncio.sleep(1)


async def run_kubernetes_campaign(
    config: CampaignConfig,
    *,
    testbed: K8sTestbed,
    worker: K8sRealWorker,
    say: Say = print,
) -> Verdict:
    rng = random.Random(config.seed)
    say(
        f"chaos: seed {config.seed}: {config.tasks} tasks, {config.node_kills} node pod "
        f"force-deletions, {config.server_restarts} server restarts (Kubernetes, Helm chart)"
    )
    config.workdir.mkdir(parents=True, exist_ok=True)
    probe_image, node_image = await asyncio.to_thread(images_on_worker, config.workdir, worker)
    say(f"chaos: node image {node_image}, probe {probe_image}")
    with server_with_collaboration(config.workdir, prefix="chaos", host=worker.node_ip) as fed:
        server, collab = fed.server, fed.collaboration
        async with (
            server_route(testbed, worker, host=server.host, port=server.port) as route,
            helm_node(
                testbed,
                worker,
                config.workdir / "site",
                route=route,
                api_path=server.api_path,
                api_key=collab.org_a.api_key,
                csv=CSV_OF["a"],
                image=node_image,
                extra_values={"maxConcurrentRuns": config.max_concurrent_runs},
            ) as node,
        ):
            api = UserApi(
                api_url=server.api_url,
                username=server.root_username,
                password=server.root_password,
            )
            researcher = Researcher(server, collab, api)
            return await _campaign(config, rng, node, researcher, probe_image, say)


def images_on_worker(workdir: Path, worker: K8sRealWorker) -> tuple[str, str]:
    """The probe algorithm and the node image, built and in the worker's containerd."""
    from tests.conformance.podman_harness import build_behaviour_image

    podman = PodmanServiceProcess(workdir / f"podman-{uuid.uuid4().hex[:6]}.sock")
    podman.start()
    try:
        service = podman_peer.PodmanService(
            socket_path=podman.socket_path,
            base_image=podman_peer.BASE_IMAGE,
            average_image=podman_peer.AVERAGE_IMAGE,
            diagnostics_image=podman_peer.DIAGNOSTICS_IMAGE,
            data_dir=podman_peer.REPO / "algorithms" / "data",
        )
        probe = build_behaviour_image(service)
    finally:
        podman.stop()
    node = build_node_image()
    worker.import_images(probe, node, podman_peer.AVERAGE_IMAGE)
    return probe, node


async def _campaign(
    config: CampaignConfig,
    rng: random.Random,
    node: HelmNode,
    researcher: Researcher,
    probe_image: str,
    say: Say,
) -> Verdict:
    log_path = config.workdir / "node.log"
    began = time.monotonic()
    installed = await node.install()
    say("chaos: " + " ".join(installed.splitlines()[:5]))  # helm's NAME ... STATUS lines
    await node.ready_pod(timeout=180)
    say(f"chaos: node pod Ready {time.monotonic() - began:.1f} s after helm install")
    planned = plan(
        rng,
        tasks=config.tasks,
        probe_image=probe_image,
        average_image=podman_peer.AVERAGE_IMAGE,
        org_id=researcher.collab.org_a.id,
    )
    say("chaos: task mix " + json.dumps(Counter(t.kind for t in planned)))
    faults = Faults(runtime="kubernetes")
    follower = asyncio.create_task(node.follow_logs(log_path))
    async with recording(node.testbed, node.namespace, node.node_name) as record:
        mean_cycle = sum(config.kill_after) / 2 + sum(config.down_for) / 2 + 10  # + start-up
        pace = mean_cycle * config.node_kills / max(config.tasks, 1)
        fault_rng = random.Random(rng.random())
        fed = asyncio.Event()
        await asyncio.gather(
            feed(researcher, planned, rng, pace=pace, say=say, done=fed),
            _faults(node, researcher, config, fault_rng, faults, say=say, feeding=fed),
        )
        say(
            f"chaos: faults done ({faults.node_pod_deletions} pod deletions, "
            f"{faults.server_restarts} server restarts); settling for up to "
            f"{config.settle_seconds:.0f} s"
        )
        await node.ready_pod(timeout=180)
        await _settle(node, researcher, timeout=config.settle_seconds, say=say)
    follower.cancel()
    await asyncio.gather(follower, return_exceptions=True)
    say("chaos: helm uninstall: " + " ".join((await node.uninstall()).split()))
    objects_left = await _left_in_namespace(node)
    runs, tasks = await server_records(researcher)
    return judge(
        faults=faults,
        planned=planned,
        tasks=tasks,
        runs=runs,
        creates=record.counts(),
        node_log=read_node_log(log_path),
        objects_left=objects_left,
        run_dirs_left=sorted(node.task_dir.glob("run-*")),
    )


async def _faults(
    node: HelmNode,
    researcher: Researcher,
    config: CampaignConfig,
    rng: random.Random,
    faults: Faults,
    *,
    say: Say,
    feeding: asyncio.Event,
) -> None:
    """At least ``config.node_kills`` pod deletions, and more until the last task is created."""
    deletions = config.node_kills
    server_at = set(rng.sample(range(deletions), min(config.server_restarts, deletions)))
    i = -1
    previous: str | None = None
    while (i := i + 1) < deletions or not feeding.is_set():
        if rng.random() < config.startup_kills:
            pod = await _started_pod(node, not_uid=previous, timeout=180)
            await asyncio.sleep(rng.uniform(0, 4))  # while it starts up and reconciles
        else:
            pod = await node.ready_pod(timeout=180, not_uid=previous)
            await asyncio.sleep(rng.uniform(*config.kill_after))
        await node.force_delete(pod)
        previous = pod["metadata"]["uid"]
        faults.node_pod_deletions += 1
        if i in server_at:
            await restart_server(researcher, rng, faults, say=say)
        if (i + 1) % 5 == 0:
            say(f"chaos: {i + 1} node pod deletions (at least {deletions})")


async def _started_pod(node: HelmNode, *, not_uid: str | None, timeout: float) -> dict[str, Any]:
    """The next node pod once its container has started (Running, maybe not yet Ready)."""
    deadline = time.monotonic() + timeout
    while True:
        for pod in await node.node_pods():
            statuses = pod.get("status", {}).get("containerStatuses") or []
            if pod["metadata"]["uid"] != not_uid and any("running" in s["state"] for s in statuses):
                return pod
        if time.monotonic() > deadline:
            raise RuntimeError(f"no node pod started within {timeout} s")
        await asyncio.sleep(0.3)


async def _settle(node: HelmNode, researcher: Researcher, *, timeout: float, say: Say) -> None:
    """Until no run is open at the server and the node has removed every Job (or
    ``timeout``)."""
    from tests.chaos.accounting import is_finished

    deadline = time.monotonic() + timeout
    while True:
        runs = await every(researcher, "run")
        open_runs = [r for r in runs if not is_finished(r["status"])]
        jobs = await node_objects(node, "jobs") if not open_runs else ["?"]
        if not open_runs and not jobs:
            return
        if time.monotonic() > deadline:
            say(f"chaos: {len(open_runs)} runs open, {len(jobs)} Jobs after {timeout:.0f} s")
            return
        await asyncio.sleep(3)


async def node_objects(node: HelmNode, plural: str) -> list[str]:
    """Names of the node's objects (by its label) of one kind in its namespace."""
    from kubernetes_asyncio import client

    selector = f"{LABEL_NODE}={node.node_name}"

    async def listed() -> Any:
        async with node.testbed.api_client() as api:
            core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
            networking = client.NetworkingV1Api(api)
            lister: Any = {
                "jobs": batch.list_namespaced_job,
                "pods": core.list_namespaced_pod,
                "secrets": core.list_namespaced_secret,
                "networkpolicies": networking.list_namespaced_network_policy,
            }[plural]
            response = await lister(node.namespace, label_selector=selector, _preload_content=False)
            return await response.json()

    return [item["metadata"]["name"] for item in (await patiently(listed))["items"]]


async def _left_in_namespace(node: HelmNode) -> list[str]:
    """The node's runtime objects still there after ``helm uninstall``."""
    left: list[str] = []
    for plural in ("jobs", "pods", "secrets", "networkpolicies"):
        left += [f"{plural[:-1]} {name}" for name in await node_objects(node, plural)]
    return left
