"""Kubernetes executor: 500 runs on kwok, absolute numbers (no baseline measured here).

One command (from the repository root; starts the testbed if it is not up, and stops it
again afterwards if it started it; ``FEDNODE_TEST_KUBECONFIG`` names another cluster)::

    .venv/bin/python benchmarks/k8s_executor.py [--runs 500] [--concurrency 32]

Two processes, so that the node's memory and CPU are its own:

* **node** — a :class:`~executors.kubernetes.executor.KubernetesExecutor`, as a node uses
  it, acting as a ServiceAccount bound only to the executor's Role: ``start()`` for every
  run (at most ``--concurrency`` at a time, as the node's ``max_concurrent_runs`` would),
  the event stream consumed (the consumer plays the container by writing the output file
  when the run is ``running``; kwok pods run no code), then ``collect()`` and
  ``cleanup()`` of every run, once every run has ended.
* **this process** — the referee: its own watch on the namespace's Jobs and Pods records
  when each Job appears and each Pod is ``Running``/``Succeeded`` (the earliest any
  client can know), with ``time.monotonic()`` (one clock for both processes).

Measured per run: ``start()`` call → Job created (the referee sees it), ``start()`` call →
return; Pod ``Running`` → ``running`` event; Pod ``Succeeded`` → terminal event; API requests
per run (every request the node process made, start to cleanup, by verb); bytes received;
the node process's RSS and CPU.

No baseline: an earlier version listed Jobs every second and read their conditions as a
"vantage6 5 design", but vantage6 5's node reads ``status.succeeded``/``failed`` and is
not this loop; a model of another node is not a measurement of it. The vantage6 5 node
itself (5.0.0a26) is measured beside fednode's whole node in ``v5node_compare.py``.

Targets: completion seen ≤ 20 ms p95; ≤ 6 API requests per run. kwok moves about 20
pods/s through their stages on this testbed, so 500 runs take about half a minute:
latency is measured under that load, and throughput is kwok's, not the executor's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import structlog  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from benchmarks.stats import percentile, summary  # noqa: E402
from executors.base import LABEL_RUN, ExecutorContext  # noqa: E402
from executors.kubernetes.client import JOBS, PODS, KubeClient, Resource, connect  # noqa: E402
from executors.kubernetes.config import KubernetesSettings  # noqa: E402
from executors.kubernetes.executor import KubernetesExecutor  # noqa: E402
from executors.kubernetes.manifests import label_selector, node_selector_labels  # noqa: E402
from executors.spec import Phase, Resources, RunSpec  # noqa: E402

NODE = "fednode-bench"
SCRIPT = REPO / "scripts" / "k8s-testbed"
PREFIX = "@@ "


# -- small helpers --------------------------------------------------------------------------


def rss_kib() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def quiet_logs() -> None:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def say(kind: str, payload: dict[str, Any] | None = None) -> None:
    print(f"{PREFIX}{kind} {json.dumps(payload or {})}", flush=True)


async def hear() -> str:
    line: str = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line.strip()


def spec_for(run_id: int) -> RunSpec:
    return RunSpec(
        run_id=run_id,
        task_id=100_000 + run_id,
        organization_id=1,
        collaboration_id=1,
        image="registry.example/fednode/average:1",
        input=b'{"method": "average"}',
        token=SecretStr("container-token"),
        environment={"INPUT_FILE": "/mnt/task/input"},
        resources=Resources(cpu=0.1, memory_mb=64),
        deadline_seconds=600,
        trace_context={"traceparent": f"00-{run_id:032x}-{run_id:016x}-01"},
    )


# -- the node process ---------------------------------------------------------------------


async def node_main(args: argparse.Namespace) -> None:
    quiet_logs()
    task_dir = Path(args.task_dir)
    settings = KubernetesSettings(
        kubeconfig=Path(args.kubeconfig), namespace=args.namespace, proxy_namespace=args.namespace
    )
    executor = KubernetesExecutor(
        settings, context=ExecutorContext(node_name=NODE, task_dir=task_dir)
    )
    await executor.open()
    referee_api = await connect(kubeconfig=Path(args.kubeconfig), context=None, max_connections=4)
    referee = Referee(KubeClient(referee_api, request_timeout=30), args.namespace)
    watching = []
    for resource_ in (JOBS, PODS):
        ready = asyncio.Event()
        watching.append(asyncio.create_task(referee.watch(resource_, ready)))
        await ready.wait()
    say("READY", {"rss_kib": rss_kib()[0], "open_requests": executor.requests})
    await hear()  # GO

    run_ids = list(range(1, args.runs + 1))
    called: dict[int, float] = {}
    returned: dict[int, float] = {}
    seen: dict[str, float] = {}
    ended: set[int] = set()
    all_ended = asyncio.Event()
    requests_before = Counter(executor.requests)
    cpu_before = cpu_seconds()

    async def consume() -> None:
        async for event in executor.events():
            seen[f"{event.run_id}:{event.phase.value}"] = time.monotonic()
            if event.phase is Phase.RUNNING:  # the container's part: write the result
                (task_dir / f"run-{event.run_id}" / "output").write_bytes(b"42")
            if event.phase.is_terminal:
                ended.add(event.run_id)
                if len(ended) == len(run_ids):
                    all_ended.set()

    limit = asyncio.Semaphore(args.concurrency)

    async def start(run_id: int) -> None:
        async with limit:
            called[run_id] = time.monotonic()
            await executor.start(spec_for(run_id))
            returned[run_id] = time.monotonic()

    consumer = asyncio.create_task(consume())
    await asyncio.gather(*(start(r) for r in run_ids))
    await all_ended.wait()
    cpu_runs = cpu_seconds() - cpu_before
    say(
        "DONE",
        {
            "called": called,
            "returned": returned,
            "seen": seen,
            "job_added": referee.job_added,
            "pod_running": referee.pod_running,
            "pod_succeeded": referee.pod_succeeded,
        },
    )

    await hear()  # CLEANUP
    outputs = 0

    async def finish(run_id: int) -> None:
        nonlocal outputs
        async with limit:
            output = await executor.collect(run_id)
            outputs += output.output == b"42"
            await executor.cleanup(run_id)

    await asyncio.gather(*(finish(r) for r in run_ids))
    used = Counter(executor.requests)
    used.subtract(requests_before)
    used = +used  # drop the verbs not used while measuring
    for task in watching:
        task.cancel()
    await asyncio.gather(*watching, return_exceptions=True)
    await referee_api.close()
    say(
        "RESULT",
        {
            "cpu_runs": cpu_runs,
            "cpu_all": cpu_seconds() - cpu_before,
            "cpu_referee": referee.cpu,
            "rss_kib": rss_kib(),
            "requests": dict(used),
            "outputs": outputs,
            "watch_bytes": sum(i.received_bytes for i in executor.informers),
            "resumes": sum(i.resumes for i in executor.informers),
            "relists": sum(i.relists for i in executor.informers),
        },
    )
    consumer.cancel()
    await executor.close()


# -- the referee ----------------------------------------------------------------------------


class Child:
    """A child process speaking the ``@@ KIND {json}`` protocol on stdout."""

    def __init__(self, process: asyncio.subprocess.Process, name: str) -> None:
        self.process, self.name = process, name

    @classmethod
    async def spawn(cls, role: str, *argv: str) -> Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--role",
            role,
            *argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            limit=2**26,
        )
        return cls(process, role)

    async def expect(self, kind: str, *, within: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        async with asyncio.timeout(within):
            while True:
                line = (await self.process.stdout.readline()).decode()
                if not line:
                    raise SystemExit(
                        f"the {self.name} process ended before {kind} "
                        f"(exit {await self.process.wait()})"
                    )
                if line.startswith(PREFIX + kind + " "):
                    payload: dict[str, Any] = json.loads(line[len(PREFIX) + len(kind) + 1 :])
                    return payload

    def tell(self, word: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{word}\n".encode())

    async def finish(self) -> None:
        """Close its stdin (a reader still waiting gets EOF) and wait for it to exit."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        await self.process.wait()


class Referee:
    """A watch of its own on the node's Jobs and Pods, in the node process: when each Job
    appeared and each Pod was ``Running``/``Succeeded`` — the earliest any client can
    know. Store-less (times only), and its CPU is counted apart so that it can be taken
    out of the node's."""

    def __init__(self, client: KubeClient, namespace: str) -> None:
        self._client, self._namespace = client, namespace
        self.job_added: dict[int, float] = {}
        self.pod_running: dict[int, float] = {}
        self.pod_succeeded: dict[int, float] = {}
        self.cpu = 0.0

    async def watch(self, resource: Resource, ready: asyncio.Event) -> None:
        selector = label_selector(node_selector_labels(NODE))
        path = resource.path(self._namespace)
        listed = await self._client.get(
            path, query=(("labelSelector", selector),), what=f"list {resource.plural}"
        )
        query = (
            ("watch", "true"),
            ("labelSelector", selector),
            ("resourceVersion", listed["metadata"]["resourceVersion"]),
            ("timeoutSeconds", 3600),
        )
        async with self._client.stream(
            path, query=query, read_timeout=3600, what=f"watch {resource.plural}"
        ) as lines:
            ready.set()
            async for line in lines:
                now, began = time.monotonic(), time.process_time()
                event = json.loads(line)
                obj = event.get("object") or {}
                run_id = _run(obj)
                if run_id is not None and event.get("type") in ("ADDED", "MODIFIED"):
                    if resource is JOBS:
                        self.job_added.setdefault(run_id, now)
                    else:
                        phase = obj.get("status", {}).get("phase")
                        if phase in ("Running", "Succeeded"):
                            self.pod_running.setdefault(run_id, now)
                        if phase == "Succeeded":
                            self.pod_succeeded.setdefault(run_id, now)
                self.cpu += time.process_time() - began


def _run(obj: dict[str, Any]) -> int | None:
    value = (obj.get("metadata", {}).get("labels") or {}).get(LABEL_RUN)
    return int(value) if value else None


def referee_main(args: argparse.Namespace) -> None:
    """Start the testbed if needed (and stop it again), then measure. With
    ``FEDNODE_TEST_KUBECONFIG`` (as for the tests) that cluster is used and nothing is
    started or stopped."""
    external = os.environ.get("FEDNODE_TEST_KUBECONFIG")
    started_here = (
        not external
        and subprocess.run([str(SCRIPT), "status"], capture_output=True, check=False).returncode
        != 0
    )
    if started_here:
        print("starting the Kubernetes testbed (scripts/k8s-testbed up) ...", flush=True)
        subprocess.run([str(SCRIPT), "up"], check=True, capture_output=True)
    try:
        asyncio.run(referee(args))
    finally:
        if started_here:
            subprocess.run([str(SCRIPT), "down"], check=False, capture_output=True)


async def referee(args: argparse.Namespace) -> None:
    from tests.integration.k8s_executor_helpers import chart_network_policies, task_volume
    from tests.peers.kubernetes import DEFAULT_KUBECONFIG, K8sTestbed

    quiet_logs()
    scratch = tempfile.mkdtemp(prefix="fednode-k8s-bench-")
    try:
        admin = Path(os.environ.get("FEDNODE_TEST_KUBECONFIG") or DEFAULT_KUBECONFIG)
        testbed = K8sTestbed(kubeconfig=admin, workdir=Path(scratch))
        namespace = await testbed.create_namespace("fednode-bench")
        try:
            async with testbed.api_client() as admin, task_volume(admin, namespace):
                rules = await chart_network_policies(admin, namespace, NODE)
                kubeconfig = await testbed.service_account_kubeconfig(namespace, rules=rules)
                task_dir = Path(scratch) / "tasks"
                task_dir.mkdir()
                await measure(args, namespace, kubeconfig, task_dir)
        finally:
            await testbed.delete_namespace(namespace)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def measure(
    args: argparse.Namespace, namespace: str, kubeconfig: Path, task_dir: Path
) -> None:
    common = [
        "--namespace",
        namespace,
        "--kubeconfig",
        str(kubeconfig),
        "--runs",
        str(args.runs),
        "--concurrency",
        str(args.concurrency),
    ]
    node = await Child.spawn("node", *common, "--task-dir", str(task_dir))
    node_ready = await node.expect("READY", within=60)
    print(
        f"{args.runs} runs, at most {args.concurrency} start() calls at a time; "
        f"kwok runs each pod 1 s",
        flush=True,
    )
    began = time.monotonic()
    node.tell("GO")
    done = await node.expect("DONE", within=60 + args.runs)
    ended = time.monotonic()
    node.tell("CLEANUP")
    result = await node.expect("RESULT", within=120 + args.runs)
    await node.finish()
    report(args, node_ready, done, result, ended - began)


def report(
    args: argparse.Namespace,
    node_ready: dict[str, Any],
    done: dict[str, Any],
    result: dict[str, Any],
    wall: float,
) -> None:
    runs = args.runs
    called = {int(k): v for k, v in done["called"].items()}
    returned = {int(k): v for k, v in done["returned"].items()}
    seen = {k: v for k, v in done["seen"].items()}
    job_added, pod_running, pod_succeeded = (
        {int(k): v for k, v in done[key].items()}
        for key in ("job_added", "pod_running", "pod_succeeded")
    )

    def event(run_id: int, phase: str) -> float | None:
        value: float | None = seen.get(f"{run_id}:{phase}")
        return value

    def series(pairs: list[tuple[float | None, float | None]]) -> list[float]:
        return [b - a for a, b in pairs if a is not None and b is not None]

    ids = sorted(called)
    start_return = series([(called[r], returned.get(r)) for r in ids])
    start_job = series([(called[r], job_added.get(r)) for r in ids])
    running = series([(pod_running.get(r), event(r, "running")) for r in ids])
    watched = series([(pod_succeeded.get(r), event(r, "succeeded")) for r in ids])
    succeeded = sum(1 for r in ids if event(r, "succeeded") is not None)
    unseen = [r for r in ids if r not in pod_succeeded]
    if unseen:
        print(
            f"  (the referee's watch missed Pod Succeeded of runs {unseen[:10]}; "
            f"their Jobs: {[job_added.get(r) is not None for r in unseen[:10]]})"
        )

    def line(name: str, values: list[float]) -> str:
        return summary(name, [v * 1000 for v in values], width=46)

    requests = Counter(result["requests"])
    per_run = sum(requests.values()) / runs
    node_rss_open = node_ready["rss_kib"] / 1024
    node_rss_now, node_rss_peak = (v / 1024 for v in result["rss_kib"])
    print(
        f"\n== latency ({succeeded}/{runs} runs succeeded; all ended after {wall:.1f} s, "
        f"{runs / wall:.1f} runs/s: kwok's pace) =="
    )
    print(line("start() called -> Job created (seen by watch)", start_job))
    print(line("start() called -> start() returned", start_return))
    print(line("Pod Running -> `running` event", running))
    print(line("Pod Succeeded -> terminal event (watch)", watched))
    print("\n== API requests (node process, start to cleanup) ==")
    print(
        f"  per run: {per_run:.2f}   ("
        + ", ".join(f"{k} {v}" for k, v in sorted(requests.items()))
        + ")"
    )
    print(
        f"  opening the executor: {sum(node_ready['open_requests'].values())} requests "
        f"(namespace check, 2 NetworkPolicies read, 2 lists, 2 watches), once per start-up"
    )
    print(
        f"  watch resumed {result['resumes']}x, relisted {result['relists']}x; "
        f"{result['watch_bytes'] / runs / 1024:.1f} KiB of watch events per run"
    )
    print("\n== node process ==")
    print(
        f"  RSS after open {node_rss_open:.1f} MiB, peak {node_rss_peak:.1f} MiB "
        f"({(node_rss_peak - node_rss_open) * 1024 / runs:.1f} KiB per run in flight), "
        f"at the end {node_rss_now:.1f} MiB"
    )
    referee_cpu = result["cpu_referee"]
    print(
        f"  CPU {(result['cpu_runs'] - referee_cpu) * 1000 / runs:.2f} ms per run until all "
        f"ended, {(result['cpu_all'] - referee_cpu) * 1000 / runs:.2f} ms per run with "
        f"collect + cleanup (the referee's parsing, {referee_cpu * 1000 / runs:.2f} ms per "
        "run, taken out; its socket reads are not)"
    )
    print(f"  outputs collected {result['outputs']}/{runs}")
    print("\n== targets ==")
    p95 = percentile(watched, 0.95) * 1000 if watched else float("inf")
    print(
        f"  completion seen p95 {p95:.1f} ms (target <= 20 ms): {'met' if p95 <= 20 else 'NOT met'}"
    )
    print(
        f"  API requests per run {per_run:.2f} (target <= 6): "
        f"{'met' if per_run <= 6 else 'NOT met'}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="start() calls in flight at most (the node's max_concurrent_runs)",
    )
    parser.add_argument(
        "--role", choices=("referee", "node"), default="referee", help=argparse.SUPPRESS
    )
    parser.add_argument("--namespace", help=argparse.SUPPRESS)
    parser.add_argument("--kubeconfig", help=argparse.SUPPRESS)
    parser.add_argument("--task-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "node":
        asyncio.run(node_main(args))
    else:
        referee_main(args)


if __name__ == "__main__":
    main()
