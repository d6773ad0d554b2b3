"""A node whose runs go through real Kueue: a run Kueue cannot admit waits, visibly.

The node runs in this process against the real vantage6 server, with the Kubernetes
executor on the testbed (kwok nodes) and ``executor.kueue`` naming a LocalQueue whose
ClusterQueue (real Kueue, :mod:`tests.peers.kueue`) has less CPU than any run asks for.
What an operator sees is what is checked: ``/status`` (what ``fednode status`` prints)
and the run's trace; what the researcher sees is the server's run status after a kill.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from executors.kubernetes.rbac import role_rules
from node.app import Node
from node.settings import load_settings
from tests.e2e.conftest import DATA, SESSION, RunningNode, free_port, wait_until_connected
from tests.integration.k8s_executor_helpers import chart_network_policies, task_volume
from tests.peers.kubernetes import K8sTestbed
from tests.peers.kueue import KueueQuotas
from tests.peers.v6server import V6Collaboration, V6Server

pytestmark = [pytest.mark.kubernetes, pytest.mark.v6server, pytest.mark.slow]

CSV = DATA / "employees_a.csv"


def status_of(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as answer:
        body: dict[str, Any] = json.load(answer)
    return body


async def test_a_run_kueue_cannot_admit_shows_waiting_with_why_and_its_kill_reaches_the_server(
    v6_server: V6Server,
    v6_plain: V6Collaboration,
    k8s_testbed: K8sTestbed,
    kueue_namespace: str,
    kueue_quotas: KueueQuotas,
    tmp_path: Path,
) -> None:
    org = v6_plain.org_a
    name = f"fednode-{org.name}-kueue-{SESSION}"
    flavor = await kueue_quotas.gpu_flavor()
    small = await kueue_quotas.cluster_queue("small", flavor=flavor, gpus=0, cpu="500m")
    queue = await kueue_quotas.local_queue(kueue_namespace, "runs", cluster_queue=small)
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    health, proxy = free_port(), free_port()
    async with k8s_testbed.api_client() as admin, task_volume(admin, kueue_namespace):
        await chart_network_policies(admin, kueue_namespace, name, proxy_port=proxy)
        await client.CoreV1Api(admin).create_namespaced_config_map(
            kueue_namespace,
            client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="database-default"),
                data={CSV.name: CSV.read_text()},
            ),
        )
        kubeconfig = await k8s_testbed.service_account_kubeconfig(
            kueue_namespace, rules=role_rules(name, kueue=True)
        )
        values: dict[str, Any] = {
            "name": name,
            "server_url": f"http://{v6_server.host}",
            "port": v6_server.port,
            "api_path": v6_server.api_path,
            "api_key": org.api_key,
            "task_dir": task_dir,
            "databases": [{"label": "default", "type": "csv", "uri": str(CSV)}],
            "executor": {
                "kind": "kubernetes",
                "kubeconfig": kubeconfig,
                "namespace": kueue_namespace,
                "proxy_namespace": kueue_namespace,
                "proxy_port": proxy,
                "databases": {"default": {"config_map": "database-default"}},
                "kueue": {"queue_name": queue},
            },
            "health": {"port": health},
            "proxy": {"port": proxy},
            # every run asks for 1 CPU; the ClusterQueue has 0.5
            "policies": {"resources": {"default_cpu": 1.0}},
        }
        exporter = InMemorySpanExporter()
        node = Node(
            load_settings(None, **values),
            span_processors=(SimpleSpanProcessor(exporter),),
            shutdown_grace=5.0,
        )
        stop = asyncio.Event()
        running = RunningNode(
            node, org, exporter, stop, asyncio.create_task(node.run(stop), name="kueue-node")
        )
        try:
            await wait_until_connected(running, timeout=60)
            task = await asyncio.to_thread(
                v6_plain.create_task,
                input_={"method": "never_runs"},
                image="registry.example/fednode/waits:1",
                organizations=[org.id],
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            status = await asyncio.to_thread(status_of, health)
            while "maximum capacity" not in " ".join(status["waiting"].values()):
                assert loop.time() < deadline, f"no run shown waiting for Kueue: {status}"
                await asyncio.sleep(0.5)
                status = await asyncio.to_thread(status_of, health)

            await asyncio.to_thread(v6_plain.user.kill_task, task["id"])
            (run,) = await asyncio.to_thread(v6_plain.user.runs, task["id"])
            while run["status"] != "killed by user" or status["runs_waiting"]:
                assert loop.time() < deadline + 60, (run["status"], status)
                await asyncio.sleep(0.5)
                (run,) = await asyncio.to_thread(v6_plain.user.runs, task["id"])
                status = await asyncio.to_thread(status_of, health)
        finally:
            await running.shutdown()

    assert status["runs_waiting"] == 0 and status["ready"]
    (span,) = [
        s
        for s in running.spans
        if s.name == "run" and (s.attributes or {})["fednode.run_id"] == run["id"]
    ]
    waits = [dict(e.attributes or {}) for e in span.events if e.name == "waiting"]
    assert waits and "maximum capacity" in str(waits[-1]["fednode.reason"]), span.events
    assert "maximum capacity" in str((span.attributes or {})["fednode.waiting"])
    assert [e.name for e in span.events][-1] == "waiting.ended"
    assert (span.attributes or {})["fednode.status"] == "killed by user"
