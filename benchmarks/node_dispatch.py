"""Server event → Job created with hundreds of runs in flight: the node's own share.

One node (organization A of a fresh vantage6 4.15.2 server, in this process) with the
Kubernetes executor on the kwok testbed. Its runs never end on their own (kwok keeps their
pods Running), so they pile up:

1. burst: ``--in-flight`` tasks (default 200) are created as fast as the server takes them;
   each arrives while all earlier ones are still in flight;
2. steady: with those runs in flight, ``--runs`` more tasks one after another.

For every run, from the server's ``new_task`` reaching the node to the executor's ``POST``
of the Job returning (the ``run`` span's start; the Job request's end), the window is split
into the time the node waited for the vantage6 server (``GET run``, ``PATCH started_at``
beside ``POST token/container``; overlapping waits counted once), the time it waited for
the Kubernetes API (``POST jobs``), and the rest: **the node's own share** — its code, its
queueing, its event loop. The target is ≤ 50 ms p95 for the node's own share.

No baseline: absolute numbers only. (An earlier version printed a "1 s poll" drawn from
a random number generator as if measured; vantage6 4.x nodes do not poll for tasks, and
``benchmarks/v6node_compare.py`` measures the real vantage6-node 4.15.2 beside fednode.)

How waits are attributed: the benchmark wraps ``ServerClient.request`` and the Kubernetes
client's ``create`` (in this process, not in fednode) and records each call's interval
with the run it was made for (the ``run_id`` the lifecycle binds to its log context, which
the tasks it gathers inherit; the fetch of a task's runs carries ``task_id`` in its query).

    .venv/bin/python benchmarks/node_dispatch.py [--in-flight 200] [--runs 30]

Needs the Kubernetes testbed (``scripts/k8s-testbed up``, run here if needed) and the
vantage6 server venv (``scripts/v6server-setup``). It leaves the testbed running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from benchmarks.stats import cell, percentile  # noqa: E402
from executors.base import ExecutorContext  # noqa: E402
from executors.kubernetes.client import KubeClient  # noqa: E402
from executors.kubernetes.config import KubernetesSettings  # noqa: E402
from executors.kubernetes.executor import KubernetesExecutor  # noqa: E402
from executors.spec import RunSpec  # noqa: E402
from node.app import Node  # noqa: E402
from node.logging import configure_logging  # noqa: E402
from node.server.rest import ServerClient  # noqa: E402
from node.settings import load_settings  # noqa: E402
from tests.integration.k8s_executor_helpers import chart_network_policies  # noqa: E402
from tests.peers.kubernetes import DEFAULT_KUBECONFIG, POD_RUN_SECONDS, SCRIPT, K8sTestbed  # noqa: E402
from tests.peers.stack import free_port, running_node, server_with_collaboration  # noqa: E402

IMAGE = "localhost/fednode/bench-dispatch:1"  # kwok never pulls it


# ---- attributing waits ------------------------------------------------------------------


Interval = tuple[int, int]


def _intervals() -> defaultdict[int, list[Interval]]:
    return defaultdict(list)


@dataclass
class Waits:
    """Intervals (ns) spent waiting on each peer, by the asyncio task or task id."""

    server_by_run: defaultdict[int, list[Interval]] = field(default_factory=_intervals)
    server_by_task: defaultdict[int, list[Interval]] = field(default_factory=_intervals)
    job_created: dict[int, tuple[int, int]] = field(default_factory=dict)


def _run_of_current_task() -> int | None:
    """The run the node is working on here: its log context (``bind_run``) says so, and
    reaches the tasks it gathers (contextvars are copied into them)."""
    run_id = structlog.contextvars.get_contextvars().get("run_id")
    return int(run_id) if run_id is not None else None


def instrument(waits: Waits) -> Callable[[], None]:
    """Wrap the node's two clients to record their calls; returns the undo."""
    server_request = ServerClient.request
    kube_create = KubeClient.create

    async def timed_server(self: ServerClient, method: str, path: str, **kwargs: Any) -> Any:
        t0 = time.time_ns()
        try:
            return await server_request(self, method, path, **kwargs)
        finally:
            interval = (t0, time.time_ns())
            run_id = _run_of_current_task()
            params = kwargs.get("params") or {}
            if run_id is not None:
                waits.server_by_run[run_id].append(interval)
            elif "task_id" in params:
                waits.server_by_task[int(params["task_id"])].append(interval)

    async def timed_kube(self: KubeClient, path: str, body: Any, *, what: str) -> Any:
        t0 = time.time_ns()
        result = await kube_create(self, path, body, what=what)
        run_id = _run_of_current_task()
        if run_id is not None and what == "create jobs":
            waits.job_created[run_id] = (t0, time.time_ns())
        return result

    ServerClient.request = timed_server  # type: ignore[method-assign]
    KubeClient.create = timed_kube  # type: ignore[method-assign]

    def undo() -> None:
        ServerClient.request = server_request  # type: ignore[method-assign]
        KubeClient.create = kube_create  # type: ignore[method-assign]

    return undo


def covered(intervals: list[tuple[int, int]], start: int, end: int) -> int:
    """Nanoseconds of [start, end] covered by the union of ``intervals``."""
    total, reach = 0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total


class Forever(KubernetesExecutor):
    """The Kubernetes executor, its runs' pods told to stay Running on kwok (testbed only)."""

    async def start(self, spec: RunSpec) -> None:
        annotations = {**spec.annotations, POD_RUN_SECONDS: "forever"}
        await super().start(spec.model_copy(update={"annotations": annotations}))


# ---- the measurement --------------------------------------------------------------------


@dataclass
class Split:
    total: list[float] = field(default_factory=list)
    server: list[float] = field(default_factory=list)
    kube: list[float] = field(default_factory=list)
    node: list[float] = field(default_factory=list)


def split(spans: list[Any], waits: Waits, task_ids: set[int]) -> Split:
    out = Split()
    for root in (s for s in spans if s.name == "run"):
        task_id = int(root.attributes["fednode.task_id"])
        run_id = int(root.attributes["fednode.run_id"])
        if task_id not in task_ids or run_id not in waits.job_created:
            continue
        start, (job_t0, job_t1) = root.start_time, waits.job_created[run_id]
        server = covered(waits.server_by_task[task_id] + waits.server_by_run[run_id], start, job_t0)
        total, kube = job_t1 - start, job_t1 - job_t0
        out.total.append(total / 1e6)
        out.server.append(server / 1e6)
        out.kube.append(kube / 1e6)
        out.node.append((total - server - kube) / 1e6)
    return out


async def wait_until(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def measure(args: argparse.Namespace, workdir: Path) -> tuple[Split, Split, dict[str, float]]:
    testbed = K8sTestbed(kubeconfig=DEFAULT_KUBECONFIG, workdir=workdir)
    waits = Waits()
    async with contextlib.AsyncExitStack() as stack:
        peers = stack.enter_context(server_with_collaboration(workdir, prefix="dispatch"))
        server, collab = peers.server, peers.collaboration
        stack.callback(instrument(waits))
        org = collab.org_a
        namespace = await testbed.create_namespace("fednode-bench-dispatch")
        stack.push_async_callback(testbed.delete_namespace, namespace)
        node_name = f"fednode-dispatch-{int(time.time()) % 100000}"
        proxy_port = free_port()
        async with testbed.api_client() as admin:  # as the chart: the runs' policies
            rules = await chart_network_policies(admin, namespace, node_name, proxy_port=proxy_port)
        kubeconfig = await testbed.service_account_kubeconfig(namespace, rules=rules)
        task_dir = workdir / "tasks"
        task_dir.mkdir()
        executor_settings = {
            "kind": "kubernetes",
            "kubeconfig": kubeconfig,
            "namespace": namespace,
            "proxy_namespace": namespace,
            "proxy_port": proxy_port,
        }
        settings = load_settings(
            None,
            name=node_name,
            server_url=f"http://{server.host}",
            port=server.port,
            api_path=server.api_path,
            api_key=org.api_key,
            task_dir=task_dir,
            databases=[],
            executor=executor_settings,
            proxy={"port": proxy_port},
            health={"port": free_port()},
            max_concurrent_runs=args.in_flight + args.runs + 10,
            policies={"resources": {"default_cpu": 0.01, "default_memory_mb": 16}},
        )
        executor = Forever(
            KubernetesSettings.model_validate(executor_settings),
            context=ExecutorContext(node_name=node_name, task_dir=task_dir),
        )
        local = await stack.enter_async_context(running_node(settings, executor=executor))
        node, exporter = local.node, local.exporter

        def create(i: int) -> int:
            made = collab.create_task(
                input_={"i": i},
                image=IMAGE,
                organizations=[org.id],
                name=f"dispatch-{i}",
                databases=[],  # the node has none; a task naming one is refused
            )
            return int(made["id"])

        # Warm-up: one run (connections, caches), not counted.
        await asyncio.to_thread(create, -1)
        await wait_until(lambda: len(waits.job_created) >= 1, 60, "the warm-up Job")

        print(f"burst: {args.in_flight} tasks as fast as the server takes them ...", flush=True)
        burst_ids: set[int] = set()
        for i in range(args.in_flight):
            burst_ids.add(await asyncio.to_thread(create, i))
        await wait_until(
            lambda: len(waits.job_created) >= args.in_flight + 1, 300, f"{args.in_flight} Jobs"
        )
        print(
            f"steady: {args.runs} tasks one after another, {args.in_flight} in flight ...",
            flush=True,
        )
        steady_ids: set[int] = set()
        for i in range(args.runs):
            steady_ids.add(await asyncio.to_thread(create, args.in_flight + i))
            expected = args.in_flight + 2 + i
            await wait_until(lambda n=expected: len(waits.job_created) >= n, 60, "the Job")
            await asyncio.sleep(0.1)  # tasks arrive one by one, not back to back
        spans = list(exporter.get_finished_spans()) + _open_roots(node)
        requests = executor.requests
    in_flight_jobs = len(waits.job_created)
    info = {"jobs": float(in_flight_jobs), "api_requests": float(sum(requests.values()))}
    return split(spans, waits, burst_ids), split(spans, waits, steady_ids), info


def _open_roots(node: Node) -> list[Any]:
    """The runs are still going: their ``run`` spans are not finished; read them open."""
    lifecycle = node.state.lifecycle
    assert lifecycle is not None
    return [record.span for record in lifecycle._inflight.runs.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    configure_logging(level="WARNING", fmt="json")
    up = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, check=False)
    if up.returncode != 0:
        sys.exit(f"the testbed did not start:\n{up.stdout[-2000:]}\n{up.stderr[-3000:]}")
    subprocess.run([str(REPO / "scripts" / "v6server-setup")], check=True)
    with tempfile.TemporaryDirectory(prefix="fednode-dispatch-") as tmp:
        burst, steady, info = asyncio.run(measure(args, Path(tmp)))
    print(
        f"\nserver event -> Job created (POST returned), median / p95; "
        f"{int(info['jobs'])} Jobs in flight at the end"
    )
    print(
        f"{'':40}{'burst (' + str(args.in_flight) + ')':>24}{'steady (' + str(args.runs) + ')':>26}"
    )
    for title, key in (
        ("whole window", "total"),
        ("waiting for the vantage6 server", "server"),
        ("waiting for the Kubernetes API", "kube"),
        ("the node's own share", "node"),
    ):
        burst_cell, steady_cell = (
            cell(getattr(phase, key), width=7, digits=1, name=f"{title} ({label})")
            for phase, label in ((burst, f"burst {args.in_flight}"), (steady, "steady"))
        )
        print(f"  {title:<38}{burst_cell}  {steady_cell}")
    worst = max(percentile(burst.node, 0.95), percentile(steady.node, 0.95))
    print(
        f"\nnode's own share p95: {worst:.1f} ms (target <= 50 ms): "
        f"{'met' if worst <= 50 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
