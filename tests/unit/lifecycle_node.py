"""A run lifecycle wired to in-process stand-ins, for unit tests that take milliseconds.

:class:`LifecycleUnderTest` holds a real :class:`~node.lifecycle.RunLifecycle` over the
in-memory test executor (``tests/fakes/memory_executor.py``, conformance-tested), the
server stand-in (``tests/fakes/server_standin.py``) and a real proxy run table. Holds no
tests itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import trace

from executors.base import Executor
from executors.spec import ProxyEndpoint
from node.crypto import Cryptor, PlainCryptor
from node.lifecycle import LifecycleConfig, RunLifecycle
from node.metrics import NodeMetrics
from node.proxy_link import OrganizationKeys
from node.server.models import NodeIdentity
from node.telemetry import TaskOrigins
from node.token_seal import TokenSeal
from policies.admission import Admission, AdmissionPolicy
from proxy import RunTable
from tests.fakes.memory_executor import MemoryExecutor, MemoryRuntime
from tests.fakes.server_standin import NotifierStandIn, ServerStandIn

API_KEY = "unit-test-api-key"
IDENTITY = NodeIdentity(
    id=1, name="unit-node", organization_id=1, collaboration_id=1, encrypted=False
)


def lifecycle_config(task_dir: Path, **fields: Any) -> LifecycleConfig:
    """A node's lifecycle settings for unit tests (no proxy, 4 slots, 60 s deadline)."""
    values: dict[str, Any] = {
        "identity": IDENTITY,
        "databases": (),
        "proxy": None,
        "max_concurrent_runs": 4,
        "deadline_seconds": 60,
        "executor_kind": "memory",
        "task_dir": task_dir,
        **fields,
    }
    return LifecycleConfig(**values)


def behaviour(**fields: Any) -> bytes:
    """The input of a probe run (``exit_code``, ``sleep``, ``output``, ``log``)."""
    return json.dumps(fields).encode()


@dataclass
class LifecycleUnderTest:
    lifecycle: RunLifecycle
    runtime: MemoryRuntime
    executor: MemoryExecutor
    server: ServerStandIn
    notifier: NotifierStandIn
    proxy_runs: RunTable
    cryptor: Cryptor
    task_dir: Path
    _consumer: asyncio.Task[None] | None = field(default=None, repr=False)

    def add_run(self, run_id: int, input_: bytes = b"", **fields: Any) -> None:
        self.server.add_run(run_id, input_=self.cryptor.encrypt(input_, self.own_key()), **fields)

    def own_key(self) -> str | None:
        return getattr(self.cryptor, "public_key", None)

    async def until(self, condition: Callable[[], bool], *, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            if loop.time() > deadline:
                raise AssertionError(f"not true within {timeout} s: {condition}")
            await asyncio.sleep(0.002)

    async def finished(self, run_id: int) -> str:
        """The run's final status on the server, once it has one."""
        await self.until(lambda: self.server.finished(run_id))
        return self.server.status(run_id)

    def log_of(self, run_id: int) -> str:
        return str(self.server.runs[run_id].get("log", ""))


@contextlib.asynccontextmanager
async def lifecycle_under_test(
    tmp_path: Path,
    *,
    max_concurrent_runs: int = 4,
    cryptor: Cryptor | None = None,
    policy: AdmissionPolicy | None = None,
    runtime: MemoryRuntime | None = None,
    server: ServerStandIn | None = None,
    proxy_runs: RunTable | None = None,
    reconcile: bool = True,
    metrics: NodeMetrics | None = None,
    tracer: trace.Tracer | None = None,
    task_origins: TaskOrigins | None = None,
    executor: Executor | None = None,
    **config_fields: Any,
) -> AsyncIterator[LifecycleUnderTest]:
    """A started lifecycle (reconciled, following executor events); closed on exit.

    ``config_fields`` are more fields of its :class:`LifecycleConfig` (``share_config=False``,
    ``routes=``); ``executor``: instead of a memory executor over ``runtime`` (e.g. an
    ExecutorSet of several); ``runtime`` is then the one the test looks at.
    """
    task_dir = tmp_path / "tasks"
    owns_runtime = runtime is None
    runtime = runtime or MemoryRuntime(task_dir=task_dir)
    memory = MemoryExecutor(runtime)
    executor = executor or memory
    await executor.open()
    server = server or ServerStandIn(node_id=IDENTITY.id)
    notifier = NotifierStandIn()
    proxy_runs = RunTable() if proxy_runs is None else proxy_runs
    cryptor = cryptor or PlainCryptor()
    lifecycle = RunLifecycle(
        server=server,  # type: ignore[arg-type]  # the stand-in has ServerClient's calls
        notifier=notifier,
        executor=executor,
        admission=Admission(policy or AdmissionPolicy()),
        cryptor=cryptor,
        config=LifecycleConfig(
            identity=IDENTITY,
            databases=(),
            proxy=ProxyEndpoint(host="127.0.0.1", port=7654),
            max_concurrent_runs=max_concurrent_runs,
            deadline_seconds=60,
            executor_kind=executor.kind,
            task_dir=task_dir,
            **config_fields,
        ),
        tracer=tracer or trace.NoOpTracer(),
        keys=OrganizationKeys(server),  # type: ignore[arg-type]
        token_seal=TokenSeal(api_key=API_KEY),
        proxy_runs=proxy_runs,
        metrics=metrics,
        task_origins=task_origins,
        upload_backoff=0.001,
        runtime_patience=0.01,
    )
    under_test = LifecycleUnderTest(
        lifecycle, runtime, memory, server, notifier, proxy_runs, cryptor, task_dir
    )
    if reconcile:
        await lifecycle.reconcile()
    under_test._consumer = asyncio.create_task(lifecycle.consume_executor_events())
    try:
        yield under_test
    finally:
        await lifecycle.close(grace=0.5)
        await executor.close()
        under_test._consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await under_test._consumer
        if owns_runtime:
            await runtime.aclose()
