"""A run on the real worker, beside the same run on kwok: where the time goes.

One node (organization A of a fresh vantage6 4.15.2 server, in this process) with the
Kubernetes executor sends N tasks one after another (each waits for the previous result),
first with runs pinned to the testbed's real worker (containerd + kubelet + Cilium, the
``behaviour`` probe really running), then to kwok nodes (no container: kwok moves the pod
through its phases, a run "takes" 1 s). Per run, from the node's trace and a referee's
own watch on the runs' pods (one wall clock, one process):

* event → Job created: the server's ``new_task`` reaching the node → the executor's
  ``start`` done (the node's share before anything runs);
* Job created → pod Running: scheduler + kubelet + containerd + CNI (real) or kwok;
* pod finished → result uploaded: the referee seeing the pod ``Succeeded`` → the result,
  log and status PATCHed (the node's share after the run);
* task created → result uploaded: what the researcher waits (kwok: includes its 1 s run).

The two node columns should match: the node's own share does not depend on what runs.

    .venv/bin/python benchmarks/real_worker.py [--runs 15]

Needs the testbed with the real worker (``scripts/k8s-testbed build --real-worker``; the
benchmark runs ``up --real-worker``, which is a no-op when it is up) and the podman images
(``scripts/podman-setup``). It leaves the testbed running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from benchmarks.stats import cell  # noqa: E402
from executors.base import LABEL_NODE, LABEL_RUN  # noqa: E402
from node.logging import configure_logging  # noqa: E402
from node.settings import load_settings  # noqa: E402
from tests.conformance.podman_harness import build_behaviour_image  # noqa: E402
from tests.integration.k8s_executor_helpers import chart_network_policies  # noqa: E402
from tests.peers import v6server as v6_peer  # noqa: E402
from tests.peers.kubernetes import DEFAULT_KUBECONFIG, SCRIPT, K8sRealWorker, K8sTestbed  # noqa: E402
from tests.peers.podman import PodmanService, _start_service, _stop_service  # noqa: E402
from tests.peers.stack import free_port, running_node, server_with_collaboration  # noqa: E402
from tests.peers.v6client import V6UserClient  # noqa: E402

NODE_POD_LABELS = {"app.kubernetes.io/name": "fednode", "app.kubernetes.io/component": "node"}


class Referee:
    """Watches the runs' pods; records (wall clock, ns) when each is first Running/done."""

    def __init__(self, testbed: K8sTestbed, namespace: str, node_name: str) -> None:
        self.running: dict[int, int] = {}
        self.finished: dict[int, int] = {}
        self._testbed, self._namespace, self._node = testbed, namespace, node_name
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        from kubernetes_asyncio import client, watch

        async with self._testbed.api_client() as api:
            core = client.CoreV1Api(api)
            async with watch.Watch() as w:
                async for event in w.stream(
                    core.list_namespaced_pod,
                    self._namespace,
                    label_selector=f"{LABEL_NODE}={self._node}",
                    timeout_seconds=3600,
                ):
                    pod = event["object"]
                    now = time.time_ns()
                    run_id = int(pod.metadata.labels.get(LABEL_RUN, "0"))
                    phase = pod.status.phase
                    if phase in ("Running", "Succeeded", "Failed"):
                        self.running.setdefault(run_id, now)
                    if phase in ("Succeeded", "Failed"):
                        self.finished.setdefault(run_id, now)

    def close(self) -> None:
        self._task.cancel()


async def measure(
    *,
    label: str,
    testbed: K8sTestbed,
    worker: K8sRealWorker,
    server: v6_peer.V6Server,
    user: V6UserClient,
    collab: Any,
    image: str,
    runs: int,
    workdir: Path,
    real: bool,
) -> dict[str, list[float]]:
    org = collab.org_a
    namespace = await testbed.create_namespace(f"fednode-bench-{label}")
    task_dir = workdir / f"tasks-{label}"
    task_dir.mkdir()
    node_name = f"fednode-bench-{label}-{int(time.time()) % 100000}"
    proxy_port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(testbed.delete_namespace, namespace)
        await stack.enter_async_context(worker.task_volume(namespace, task_dir))
        async with testbed.api_client() as admin:  # as the chart: the runs' policies
            rules = await chart_network_policies(admin, namespace, node_name, proxy_port=proxy_port)
        kubeconfig = await testbed.service_account_kubeconfig(namespace, rules=rules)
        executor: dict[str, Any] = {
            "kind": "kubernetes",
            "kubeconfig": kubeconfig,
            "namespace": namespace,
            "proxy_namespace": namespace,
            "proxy_port": proxy_port,
        }
        proxy: dict[str, Any] = {"port": proxy_port}
        if real:
            executor |= {"node_selector": worker.node_selector, "tolerations": [worker.toleration]}
            proxy |= {
                "host": worker.node_ip,
                "advertise_host": await worker.proxy_relay(
                    namespace, labels=NODE_POD_LABELS, pod_port=proxy_port, node_port=proxy_port
                ),
            }
        settings = load_settings(
            None,
            name=node_name,
            server_url=f"http://{server.host}",
            port=server.port,
            api_path=server.api_path,
            api_key=org.api_key,
            task_dir=task_dir,
            databases=[],  # the probe reads none
            executor=executor,
            proxy=proxy,
            health={"port": free_port()},
            policies={"resources": {"default_cpu": 0.2, "default_memory_mb": 256}},
        )
        exporter = (await stack.enter_async_context(running_node(settings, org=org))).exporter
        referee = Referee(testbed, namespace, node_name)
        stack.callback(referee.close)
        created: dict[int, int] = {}
        for i in range(runs + 1):  # the first run warms caches; it is not counted
            t0 = time.time_ns()
            made = await asyncio.to_thread(
                collab.create_task,
                input_={"output": f'{{"i": {i}}}'},
                image=image,
                organizations=[org.id],
                name=f"bench-{label}-{i}",
            )
            await asyncio.to_thread(user.wait_for_results, made["id"], timeout=120)
            if i:
                created[made["id"]] = t0
        spans = exporter.get_finished_spans()

    roots = {s.context.span_id: s for s in spans if s.name == "run"}
    children: dict[int, dict[str, Any]] = {}
    for span in spans:
        if span.parent is not None and span.parent.span_id in roots:
            children.setdefault(span.parent.span_id, {})[span.name] = span
    out: dict[str, list[float]] = {k: [] for k in ("event", "pod", "upload", "total")}
    for root_id, root in roots.items():
        task_id = int(root.attributes["fednode.task_id"])  # type: ignore[arg-type]
        run_id = int(root.attributes["fednode.run_id"])  # type: ignore[arg-type]
        parts = children.get(root_id, {})
        if task_id not in created or not {"start", "upload"} <= parts.keys():
            continue
        start_end, upload_end = parts["start"].end_time, parts["upload"].end_time
        out["event"].append((start_end - root.start_time) / 1e6)
        if run_id in referee.running:
            out["pod"].append((referee.running[run_id] - start_end) / 1e6)
        if run_id in referee.finished:
            out["upload"].append((upload_end - referee.finished[run_id]) / 1e6)
        out["total"].append((upload_end - created[task_id]) / 1e6)
    return out


async def main(runs: int) -> None:
    up = await asyncio.to_thread(
        subprocess.run,
        [str(SCRIPT), "up", "--real-worker"],
        capture_output=True,
        text=True,
        check=False,
    )
    if up.returncode != 0:
        sys.exit(f"the real worker did not start:\n{up.stdout[-2000:]}\n{up.stderr[-3000:]}")
    with tempfile.TemporaryDirectory(prefix="fednode-bench-") as tmp:
        workdir = Path(tmp)
        testbed = K8sTestbed(kubeconfig=DEFAULT_KUBECONFIG, workdir=workdir)
        worker = K8sRealWorker(testbed=testbed)
        podman = _start_service(workdir / "podman.sock")
        try:
            image = build_behaviour_image(
                PodmanService(
                    socket_path=workdir / "podman.sock",
                    base_image="localhost/fednode/python-base:latest",
                    average_image="localhost/fednode/average:latest",
                    diagnostics_image="localhost/fednode/diagnostics:latest",
                    data_dir=REPO / "algorithms" / "data",
                )
            )
        finally:
            _stop_service(podman)
        worker.import_images(image)
        with server_with_collaboration(workdir, prefix="bench") as peers:
            server, user, collab = peers.server, peers.user, peers.collaboration
            results = {}
            for label, real in (("real", True), ("kwok", False)):
                print(f"{label}: {runs} tasks, one after another ...", flush=True)
                results[label] = await measure(
                    label=label,
                    testbed=testbed,
                    worker=worker,
                    server=server,
                    user=user,
                    collab=collab,
                    image=image,
                    runs=runs,
                    workdir=workdir,
                    real=real,
                )

    print(f"\nmedian / p95 over {runs} runs each (the first run of each side not counted)")
    print(f"{'':38}{'real worker':>22}{'kwok':>24}")
    rows = (
        ("server event -> Job created (node)", "event"),
        ("Job created -> pod Running", "pod"),
        ("pod finished -> result uploaded (node)", "upload"),
        ("task created -> result uploaded", "total"),
    )
    for title, key in rows:
        real = cell(results["real"][key], name=f"{title} (real worker)")
        kwok = cell(results["kwok"][key], name=f"{title} (kwok)")
        print(f"  {title:<38}{real}  {kwok}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    configure_logging(level="WARNING", fmt="json")
    asyncio.run(main(args.runs))
