"""Shared by the Kubernetes executor tests (no tests here): settings, specs, an event log.

kwok pods run no code, so the tests play the container's part: :class:`EventLog` writes
the run's output file into its folder (``task_dir/run-<id>/output``) when the run is
reported ``running``, as an algorithm would before exiting. Everything the executor does
goes through a ServiceAccount bound only to :data:`executors.kubernetes.rbac.ROLE_RULES`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client
from pydantic import SecretStr

from executors.kubernetes.config import KubernetesSettings
from executors.kubernetes.executor import KubernetesExecutor, run_network_policy_manifests
from executors.kubernetes.rbac import role_rules
from executors.spec import Phase, Resources, RunEvent, RunSpec
from tests.peers.kubernetes import GPU_NODE_SELECTOR, GPU_TOLERATION, POD_RUN_SECONDS, bound_claim


def settings_for(namespace: str, kubeconfig: Path, **overrides: object) -> KubernetesSettings:
    """Executor settings for a test namespace of the testbed."""
    values: dict[str, object] = {
        "kubeconfig": kubeconfig,
        "namespace": namespace,
        "gpu_node_selector": GPU_NODE_SELECTOR,
        "gpu_tolerations": [GPU_TOLERATION],
        "proxy_namespace": namespace,
        **overrides,
    }
    return KubernetesSettings.model_validate(values)


async def chart_network_policies(
    admin: Any, namespace: str, node_name: str, **overrides: object
) -> list[dict[str, Any]]:
    """What the chart does for a node: create its runs' NetworkPolicies (as admin, for
    :func:`settings_for` with ``overrides``). Returns the rules of the node's Role, which
    may only read those two policies (and, with ``proxy_service`` among ``overrides``, that
    Service)."""
    settings = settings_for(namespace, Path("unused"), **overrides)
    api = client.NetworkingV1Api(admin)
    for policy in run_network_policy_manifests(settings, node_name=node_name):
        await api.create_namespaced_network_policy(namespace, policy)
    return role_rules(
        node_name, proxy_service=settings.proxy_service, databases=list(settings.database_egress)
    )


@contextlib.asynccontextmanager
async def task_volume(
    admin: Any, namespace: str, *, claim: str = "fednode-tasks"
) -> AsyncIterator[str]:
    """A bound ReadWriteMany claim for the task directory, as the chart would provide.

    kwok never mounts anything, so the volume's source does not matter.
    """
    async with bound_claim(
        admin, namespace, claim=claim, host_path={"path": f"/tmp/{namespace}-{claim}"}
    ):
        yield claim


def make_spec(
    run_id: int,
    *,
    annotations: dict[str, str] | None = None,
    image: str = "registry.example/fednode/average:1",
    gpus: int = 0,
    deadline_seconds: int = 3600,
    token: str | None = "container-token",
) -> RunSpec:
    return RunSpec(
        run_id=run_id,
        task_id=1000 + run_id,
        organization_id=7,
        collaboration_id=3,
        image=image,
        input=f"input of {run_id}".encode(),
        token=SecretStr(token) if token is not None else None,
        environment={"INPUT_FILE": "/mnt/task/input", "OUTPUT_FILE": "/mnt/task/output"},
        resources=Resources(cpu=0.5, memory_mb=256, gpus=gpus),
        deadline_seconds=deadline_seconds,
        annotations={POD_RUN_SECONDS: "0.5", **(annotations or {})},
        trace_context={"traceparent": f"00-{run_id:032x}-{run_id:016x}-01"},
        sealed_token=f"v1.sealed-token-of-run-{run_id}",  # opaque to the executor
    )


def output_of(run_id: int) -> bytes:
    return f"output of run {run_id}".encode()


class EventLog:
    """Collects an executor's events; plays the container by writing output when running."""

    def __init__(self, executor: KubernetesExecutor, task_dir: Path) -> None:
        self.executor = executor
        self.task_dir = task_dir
        self.events: list[RunEvent] = []
        self.by_run: dict[int, list[RunEvent]] = defaultdict(list)
        self.seen_at: dict[tuple[int, Phase], float] = {}
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> EventLog:
        self._task = asyncio.create_task(self._consume(), name="event-log")
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _consume(self) -> None:
        async for event in self.executor.events():
            self.seen_at[(event.run_id, event.phase)] = time.monotonic()
            if event.phase is Phase.RUNNING:
                run_dir = self.task_dir / f"run-{event.run_id}"
                if run_dir.is_dir():  # the container's part: write the result
                    (run_dir / "output").write_bytes(output_of(event.run_id))
            self.events.append(event)
            self.by_run[event.run_id].append(event)
            async with self._changed:
                self._changed.notify_all()

    def phases(self, run_id: int) -> list[Phase]:
        return [e.phase for e in self.by_run.get(run_id, [])]

    def terminal(self, run_id: int) -> RunEvent | None:
        return next((e for e in self.by_run.get(run_id, []) if e.phase.is_terminal), None)

    async def wait(self, condition: Callable[[], bool], *, timeout: float, what: str) -> None:
        async def until() -> None:
            async with self._changed:
                await self._changed.wait_for(condition)

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; last events: {self.events[-10:]}"
            ) from None

    async def wait_terminal(self, run_ids: list[int] | int, *, timeout: float = 60) -> None:
        ids = [run_ids] if isinstance(run_ids, int) else run_ids
        await self.wait(
            lambda: all(self.terminal(r) is not None for r in ids),
            timeout=timeout,
            what=f"terminal events of {len(ids)} run(s)",
        )

    async def wait_phase(self, run_id: int, phase: Phase, *, timeout: float = 30) -> None:
        await self.wait(
            lambda: phase in self.phases(run_id),
            timeout=timeout,
            what=f"run {run_id} {phase.value}",
        )
