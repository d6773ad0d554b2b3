"""The node on Kubernetes with pods that really run: real server, real worker, real policy.

Each organization's node runs in this test process and uses the Kubernetes executor on
the testbed's real worker (containerd + kubelet, Cilium enforcing NetworkPolicy, CoreDNS).
A *site* is what the Helm chart would set up for one node: a runs namespace enforcing Pod
Security ``restricted``, the task-directory claim (here a hostPath volume over the node's
``task_dir``), the CSV database as a ConfigMap, and the proxy where the node pod would be.

How a run pod reaches the node's proxy: the node listens on the pod bridge's address on
the host (``REAL_NODE_IP``); a relay pod carrying the chart's node-pod labels forwards its
port to it, and the Service ``fednode-proxy`` in front of the relay is the chart's proxy
Service: the node reads its ClusterIP (``executor.proxy_service``, with the Role's one
Service right) and gives runs that address. So the runs' NetworkPolicy (egress only to
pods with those labels, on that port; no DNS) is exactly what it is in a cluster, and
Cilium enforces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from executors.kubernetes.rbac import ROLE_RULES, proxy_service_rule
from node.app import Node
from node.settings import load_settings
from tests.conformance.podman_harness import build_behaviour_image
from tests.e2e.conftest import DATA, SESSION, RunningNode, free_port, wait_until_connected
from tests.integration.k8s_executor_helpers import chart_network_policies
from tests.peers.helm import REQUIRED_VALUES, merged, one, render
from tests.peers.kubernetes import APISERVER_PORT, K8sRealWorker, K8sTestbed
from tests.peers.podman import PodmanService
from tests.peers.postgres import PATIENTS, PostgresDatabase
from tests.peers.v6server import V6Collaboration, V6Org, V6Server

pytestmark = [pytest.mark.kubernetes, pytest.mark.v6server, pytest.mark.podman, pytest.mark.slow]

AVERAGE = "localhost/fednode/average:latest"
DIAGNOSTICS = "localhost/fednode/diagnostics:latest"
SQLPROBE = "localhost/fednode/sqlprobe:latest"
#: The chart's node pod labels (the executor's default ``proxy_pod_selector``).
NODE_POD_LABELS = {"app.kubernetes.io/name": "fednode", "app.kubernetes.io/component": "node"}
RUN_UID = 10001  # the executor's default run_as_user
PROXY_SERVICE = "fednode-proxy"  # the relay's Service (K8sRealWorker.proxy_relay)


@dataclass
class Site:
    """What the chart sets up for one node, on the real worker."""

    org: V6Org
    namespace: str
    task_dir: Path
    csv: Path  # the node's database (also in the ConfigMap the runs mount)
    kubeconfig: Path
    proxy_port: int  # the node's proxy on the host, the relay pod's port, the Service's
    proxy_host: str  # the Service's ClusterIP, which runs are told to call
    network_policies: bool
    #: Network databases' egress (executor ``database_egress``), as the chart's values give it.
    database_egress: dict[str, dict[str, Any]] = field(default_factory=dict)


MakeSite = Callable[..., Awaitable[Site]]
StartRealNode = Callable[..., Awaitable[RunningNode]]


@pytest.fixture(scope="session")
def real_images(podman_service: PodmanService, k8s_real_worker: K8sRealWorker) -> str:
    """The algorithm images in the worker's containerd; returns the probe's reference."""
    behaviour = build_behaviour_image(podman_service)
    k8s_real_worker.import_images(AVERAGE, DIAGNOSTICS, behaviour)
    return behaviour


@pytest.fixture
async def make_site(
    k8s_testbed: K8sTestbed,
    k8s_real_worker: K8sRealWorker,
    tmp_path: Path,
    real_images: str,
) -> AsyncIterator[MakeSite]:
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            collab: V6Collaboration,
            org: V6Org,
            *,
            network_policies: bool = True,
            database_egress: dict[str, dict[str, Any]] | None = None,
        ) -> Site:
            namespace = await k8s_testbed.create_namespace(f"fednode-{org.name[:10]}")
            stack.push_async_callback(k8s_testbed.delete_namespace, namespace)
            task_dir = tmp_path / f"tasks-{namespace}"
            task_dir.mkdir()
            await stack.enter_async_context(k8s_real_worker.task_volume(namespace, task_dir))
            csv = DATA / ("employees_a.csv" if org is collab.org_a else "employees_b.csv")
            async with k8s_testbed.api_client() as api:
                await client.CoreV1Api(api).create_namespaced_config_map(
                    namespace,
                    {"metadata": {"name": "database-default"}, "data": {csv.name: csv.read_text()}},
                )
            proxy_port = free_port()
            # network_policies off: none to read; the proxy Service, by name, either way
            rules = [*ROLE_RULES, proxy_service_rule(PROXY_SERVICE)]
            if network_policies:  # as the chart: they are made for the node, which reads them
                async with k8s_testbed.api_client() as api:
                    rules = await chart_network_policies(
                        api,
                        namespace,
                        f"fednode-{org.name}-{SESSION}",
                        proxy_port=proxy_port,
                        proxy_service=PROXY_SERVICE,
                        database_egress=database_egress or {},
                    )
            kubeconfig = await k8s_testbed.service_account_kubeconfig(namespace, rules=rules)
            proxy_host = await k8s_real_worker.proxy_relay(
                namespace,
                labels=NODE_POD_LABELS,
                pod_port=proxy_port,
                node_port=proxy_port,
                name=PROXY_SERVICE,
            )
            return Site(
                org,
                namespace,
                task_dir,
                csv,
                kubeconfig,
                proxy_port,
                proxy_host,
                network_policies,
                database_egress or {},
            )

        yield make


@pytest.fixture
async def start_real_node(
    v6_server: V6Server, k8s_real_worker: K8sRealWorker
) -> AsyncIterator[StartRealNode]:
    started: list[RunningNode] = []

    async def start(
        site: Site, *, databases: list[dict[str, Any]] | None = None, **overrides: Any
    ) -> RunningNode:
        org = site.org
        values: dict[str, Any] = {
            "name": f"fednode-{org.name}-{SESSION}",
            "server_url": f"http://{v6_server.host}",
            "port": v6_server.port,
            "api_path": v6_server.api_path,
            "api_key": org.api_key,
            "task_dir": site.task_dir,
            "databases": [
                {"label": "default", "type": "csv", "uri": str(site.csv)},
                *(databases or []),
            ],
            "executor": {
                "kind": "kubernetes",
                "kubeconfig": site.kubeconfig,
                "namespace": site.namespace,
                "proxy_namespace": site.namespace,
                "proxy_port": site.proxy_port,  # the relay's pod port, as the chart's
                "proxy_service": PROXY_SERVICE,  # runs get its ClusterIP
                "node_selector": k8s_real_worker.node_selector,
                "tolerations": [k8s_real_worker.toleration],
                "network_policies": site.network_policies,
                "databases": {"default": {"config_map": "database-default"}},
                "database_egress": site.database_egress,
            },
            "proxy": {"host": k8s_real_worker.node_ip, "port": site.proxy_port},
            "health": {"port": free_port()},
            "max_concurrent_runs": 8,
            # The worker has 2 cores; a run's default (1 CPU) would let two runs at most.
            "policies": {"resources": {"default_cpu": 0.2, "default_memory_mb": 256}},
        }
        if org.private_key is not None:
            values["encryption"] = {"enabled": True, "private_key": org.private_key}
        values.update(overrides)
        exporter = InMemorySpanExporter()
        node = Node(
            load_settings(None, **values),
            span_processors=(SimpleSpanProcessor(exporter),),
            shutdown_grace=5.0,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(node.run(stop), name=f"node-{org.name}")
        running = RunningNode(node, org, exporter, stop, task, overrides)
        started.append(running)
        await wait_until_connected(running, timeout=60)
        return running

    yield start
    for running in started:
        if not running.task.done():
            with contextlib.suppress(Exception):
                await running.shutdown()


# -- helpers ---------------------------------------------------------------------------------


async def result_of(
    collab: V6Collaboration, task: dict[str, Any], timeout: float = 180
) -> list[Any]:
    await asyncio.to_thread(collab.user.wait_for_results, task["id"], timeout=timeout)
    return list(await asyncio.to_thread(collab.user.result_values, task["id"]))


async def wait_until(condition: Callable[[], bool], *, what: str, timeout: float = 120) -> None:
    """Until ``condition()`` holds (e.g. about the spans a node has recorded so far)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.3)


def uploads(node: RunningNode) -> Counter[int]:
    """How many results each run had uploaded (one ``upload`` span under its ``run``)."""
    roots = {
        s.context.span_id: (s.attributes or {})["fednode.run_id"]
        for s in node.spans
        if s.name == "run"
    }
    return Counter(
        int(roots[s.parent.span_id])
        for s in node.spans
        if s.name == "upload" and s.parent is not None and s.parent.span_id in roots
    )


@contextlib.asynccontextmanager
async def host_listener(host: str) -> AsyncIterator[int]:
    """A TCP listener on the host at ``host`` (the pod bridge's address); yields its port."""

    async def close(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close, host, 0, family=socket.AF_INET)
    async with server:
        yield int(server.sockets[0].getsockname()[1])


async def diagnose(collab: V6Collaboration, org: V6Org, **kwargs: Any) -> dict[str, Any]:
    task = await asyncio.to_thread(
        collab.create_task,
        input_={"method": "diagnose", "kwargs": kwargs},
        image=DIAGNOSTICS,
        organizations=[org.id],
    )
    (report,) = await result_of(collab, task)
    return dict(report)


@contextlib.asynccontextmanager
async def probe_targets(
    k8s_testbed: K8sTestbed, k8s_real_worker: K8sRealWorker, host_port: int
) -> AsyncIterator[dict[str, str]]:
    """Things a run must not reach, each really listening: name -> host:port. The cluster
    DNS among them: CoreDNS forwards what it does not know upstream, a way around the
    proxy. The listener's namespace goes at the end: its pod holds CPU on the one real
    worker, and a session's tests left together filled it (the next pods went unscheduled)."""
    other = await k8s_testbed.create_namespace("fednode-other")
    try:
        pod_ip = await k8s_real_worker.listener_pod(other)
        yield {
            "host": f"{k8s_real_worker.node_ip}:{host_port}",
            "pod": f"{pod_ip}:8080",
            "apiserver-service": "10.96.0.1:443",
            "apiserver": f"{k8s_real_worker.node_ip}:{APISERVER_PORT}",
            **await k8s_real_worker.cluster_dns(),
        }
    finally:
        await k8s_testbed.delete_namespace(other)


def service_name(site: Site) -> str:
    """The proxy Service's DNS name, which a run must not be able to resolve."""
    return f"{PROXY_SERVICE}.{site.namespace}.svc.cluster.local"


# -- tests -----------------------------------------------------------------------------------


async def test_central_average_runs_in_real_pods_and_reaches_the_server_only_via_the_proxy(
    v6_plain: V6Collaboration,
    make_site: MakeSite,
    start_real_node: StartRealNode,
) -> None:
    site_a = await make_site(v6_plain, v6_plain.org_a)
    site_b = await make_site(v6_plain, v6_plain.org_b)
    node_a = await start_real_node(site_a)
    await start_real_node(site_b)
    orgs = [v6_plain.org_a.id, v6_plain.org_b.id]
    task = await asyncio.to_thread(
        v6_plain.create_task,
        input_={
            "method": "central_average",
            "kwargs": {"column_name": "age", "organizations": orgs},
        },
        image=AVERAGE,
        organizations=[v6_plain.org_a.id],
    )

    (result,) = await result_of(v6_plain, task)

    # Computed by the algorithm in its pods (central on A, partials on A and B), the
    # subtasks created and their results fetched through A's proxy, behind NetworkPolicy.
    assert result["average"] == pytest.approx(41.875)
    assert (result["sum"], result["count"]) == (670, 16)
    runs = await asyncio.to_thread(v6_plain.user.runs, task["id"])
    assert [r["status"] for r in runs] == ["completed"]
    assert sum(uploads(node_a).values()) == 2  # the central run and A's partial


async def test_a_real_pod_reaches_the_proxy_by_its_cluster_ip_and_nothing_else_not_even_dns(
    v6_plain: V6Collaboration,
    make_site: MakeSite,
    start_real_node: StartRealNode,
    k8s_testbed: K8sTestbed,
    k8s_real_worker: K8sRealWorker,
) -> None:
    site = await make_site(v6_plain, v6_plain.org_a)
    await start_real_node(site)
    async with (
        host_listener(k8s_real_worker.node_ip) as host_port,
        probe_targets(k8s_testbed, k8s_real_worker, host_port) as targets,
    ):
        report = await diagnose(
            v6_plain,
            v6_plain.org_a,
            targets=list(targets.values()),
            dns_name=service_name(site),
            timeout=3,
        )

    attempts = {a["target"]: a for a in report["internet"]["attempts"]}
    for name, target in targets.items():
        assert attempts[target]["reachable"] is False, (name, attempts[target])
    # the proxy, by the address the node read from its Service (no name to resolve)
    assert report["env"]["HOST"] == f"http://{site.proxy_host}", report["env"]
    assert report["proxy"]["reachable"] is True, report["proxy"]
    assert report["proxy"]["healthz"]["status"] is not None, report["proxy"]
    # no DNS: not even the cluster's own names resolve (the query never reaches CoreDNS)
    assert report["dns"]["resolves"] is False, report["dns"]
    # Pod Security restricted, as the container itself sees it.
    identity = report["identity"]
    assert (identity["uid"], identity["root"]) == (RUN_UID, False)
    assert identity["no_new_privs"] is True
    assert int(identity["cap_eff"], 16) == 0
    assert identity["seccomp"] == "2"  # filter mode: RuntimeDefault
    assert report["root_fs"]["read_only"] is True
    assert report["root_fs"]["writable"] is False
    assert report["scratch"]["writable"] is True


async def test_without_the_network_policies_the_same_probe_gets_through(
    v6_plain: V6Collaboration,
    make_site: MakeSite,
    start_real_node: StartRealNode,
    k8s_testbed: K8sTestbed,
    k8s_real_worker: K8sRealWorker,
) -> None:
    site = await make_site(v6_plain, v6_plain.org_a, network_policies=False)
    await start_real_node(site)
    async with k8s_testbed.api_client() as api:
        policies = await client.NetworkingV1Api(api).list_namespaced_network_policy(site.namespace)
    assert policies.items == []
    async with (
        host_listener(k8s_real_worker.node_ip) as host_port,
        probe_targets(k8s_testbed, k8s_real_worker, host_port) as targets,
    ):
        report = await diagnose(
            v6_plain,
            v6_plain.org_a,
            targets=list(targets.values()),
            dns_name=service_name(site),
            timeout=3,
        )

    attempts = {a["target"]: a for a in report["internet"]["attempts"]}
    for name, target in targets.items():
        assert attempts[target]["reachable"] is True, (name, attempts[target])
    assert report["proxy"]["reachable"] is True
    assert report["dns"]["resolves"] is True  # the hole the policy closes


async def test_a_pod_that_is_no_run_has_no_network_under_the_namespace_default_deny(
    v6_plain: V6Collaboration,
    make_site: MakeSite,
    k8s_testbed: K8sTestbed,
    k8s_real_worker: K8sRealWorker,
    tmp_path: Path,
) -> None:
    site = await make_site(v6_plain, v6_plain.org_a)
    # the chart's namespace-wide default deny, as helm renders it for this namespace
    values = merged(REQUIRED_VALUES, {"namespace": {"create": False, "name": site.namespace}})
    deny = one(render(values, tmp_path), "NetworkPolicy", "fn-fednode-default-deny")
    stranger = {"app": "not-a-run"}
    async with (
        host_listener(k8s_real_worker.node_ip) as host_port,
        contextlib.AsyncExitStack() as cleanup,
    ):
        other = await k8s_testbed.create_namespace("fednode-other")
        cleanup.push_async_callback(k8s_testbed.delete_namespace, other)
        outside = await k8s_real_worker.listener_pod(other)
        inside = await k8s_real_worker.listener_pod(site.namespace, "inside")
        targets = [
            f"{k8s_real_worker.node_ip}:{host_port}",
            f"{outside}:8080",
            *(await k8s_real_worker.cluster_dns()).values(),
        ]
        probe = k8s_real_worker.connect_probe
        out_before = await probe(site.namespace, "out-before", targets, labels=stranger)
        in_before = await probe(other, "in-before", [f"{inside}:8080"], labels=stranger)
        async with k8s_testbed.api_client() as api:
            await client.NetworkingV1Api(api).create_namespaced_network_policy(site.namespace, deny)
        # Cilium enforces a new policy a moment after the API server stores it: probe again
        # (a fresh pod each time) until it is in force, within a bound.
        for attempt in range(4):
            out_after = await probe(
                site.namespace, f"out-after-{attempt}", targets, labels=stranger
            )
            in_after = await probe(
                other, f"in-after-{attempt}", [f"{inside}:8080"], labels=stranger
            )
            if not any(out_after.values()) and not any(in_after.values()):
                break
            await asyncio.sleep(5)

    # without it, a pod someone else starts in the node's namespace reaches everything
    assert out_before == dict.fromkeys(targets, True)
    assert in_before == {f"{inside}:8080": True}
    # with it, nothing in or out
    assert out_after == dict.fromkeys(targets, False)
    assert in_after == {f"{inside}:8080": False}


async def test_node_restart_mid_run_adopts_the_running_pod_and_its_proxy_calls_go_through(
    v6_plain: V6Collaboration,
    make_site: MakeSite,
    start_real_node: StartRealNode,
) -> None:
    site_a = await make_site(v6_plain, v6_plain.org_a)
    site_b = await make_site(v6_plain, v6_plain.org_b)
    first = await start_real_node(site_a)
    orgs = [v6_plain.org_a.id, v6_plain.org_b.id]
    task = await asyncio.to_thread(
        v6_plain.create_task,
        input_={
            "method": "central_average",
            "kwargs": {"column_name": "age", "organizations": orgs},
        },
        image=AVERAGE,
        organizations=[v6_plain.org_a.id],
    )
    # The central run has made its subtasks through A's proxy and A's partial is done; B's
    # waits for B's node, so the central run is still polling the proxy for the results.
    await wait_until(lambda: sum(uploads(first).values()) == 1, what="A's partial uploaded")
    await first.shutdown()  # kubelet keeps the central pod running; its calls now fail
    await asyncio.sleep(2)

    second = await start_real_node(site_a)  # may not read the token Secret (ROLE_RULES)
    await start_real_node(site_b)
    results = await result_of(v6_plain, task)

    # The central run got the partial results through the second node's proxy: the node
    # admitted the adopted run's token again (from its sealed copy on the Job), no 401.
    (run,) = await asyncio.to_thread(v6_plain.user.runs, task["id"])
    assert run["status"] == "completed", run["log"]
    (result,) = results
    assert result["average"] == pytest.approx(41.875)
    assert uploads(second)[run["id"]] == 1
    assert not [s for s in second.spans if s.name == "start"]
    # (the proxy records a span only for a call whose token a run holds)
    proxied = {
        str(s.name): (s.attributes or {})["http.response.status_code"]
        for s in second.spans
        if s.name.startswith("proxy ") and (s.attributes or {})["fednode.run_id"] == run["id"]
    }
    assert proxied, "no call of the adopted run went through the restarted node's proxy"
    assert all(status == 200 for status in proxied.values()), proxied
    # Still one trace: the second node's spans of the adopted run join the first node's.
    (began,) = [
        s
        for s in first.spans
        if s.name == "run" and (s.attributes or {})["fednode.run_id"] == run["id"]
    ]
    adopted = [
        s
        for s in second.spans
        if s.name == "run" and (s.attributes or {})["fednode.run_id"] == run["id"]
    ]
    assert began.context is not None and adopted
    assert {(s.parent.trace_id, s.parent.span_id) if s.parent else None for s in adopted} == {
        (began.context.trace_id, began.context.span_id)
    }


async def test_only_a_pod_that_asked_for_a_network_database_reads_it_behind_its_egress_policy(
    v6_plain: V6Collaboration,
    make_site: MakeSite,
    start_real_node: StartRealNode,
    k8s_testbed: K8sTestbed,
    k8s_real_worker: K8sRealWorker,
    podman_service: PodmanService,
    postgres_elsewhere: PostgresDatabase,
) -> None:
    """Cilium enforcing the chart's database egress policy: the run whose task asked for
    the database reads its table through the URI the node hands it; a run that did not ask
    cannot connect; neither reaches anything else (the host, another pod, the API server,
    the cluster DNS)."""
    k8s_real_worker.import_images(SQLPROBE)
    db = postgres_elsewhere
    site = await make_site(
        v6_plain,
        v6_plain.org_a,
        database_egress={"clinic": {"cidr": f"{db.host}/32", "port": db.port}},
    )
    await start_real_node(site, databases=[{"label": "clinic", "type": "sql", "uri": db.uri}])
    query = "select id, age, department from patients order by id"
    async with (
        host_listener(k8s_real_worker.node_ip) as host_port,
        probe_targets(k8s_testbed, k8s_real_worker, host_port) as targets,
    ):
        task_input = {"label": "clinic", "query": query, "targets": list(targets.values())}
        reports = []
        for databases in ([{"label": "clinic"}], []):
            task = await asyncio.to_thread(
                v6_plain.create_task,
                input_=task_input,
                image=SQLPROBE,
                organizations=[v6_plain.org_a.id],
                databases=databases,
            )
            (report,) = await result_of(v6_plain, task)
            reports.append(report)
    asked, not_asked = reports

    assert (asked["uri_host"], asked["uri_port"]) == (db.host, db.port)  # the URI as given
    assert asked.get("error") is None, asked
    assert [tuple(row) for row in asked["rows"]] == list(PATIENTS)
    assert "rows" not in not_asked
    assert not_asked["error"], not_asked
    for report in (asked, not_asked):
        reached = {a["target"]: a["reachable"] for a in report["attempts"]}
        assert not any(reached.values()), reached
