"""Finishing runs: upload retries, a result that cannot be encrypted, a broken collect,
and the bounded memory of finished runs.

The lifecycle is real (``node/lifecycle``); the runtime is the in-memory test executor and
the server a stand-in (``tests/unit/lifecycle_node.py``), so each test takes milliseconds.
The same crypto failure against the real vantage6 server is in
``tests/e2e/test_node_lifecycle.py``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa
from opentelemetry import trace

from executors.runfiles import RunFiles
from executors.spec import Phase, Reason, RunSpec
from node.crypto import RSACryptor
from node.lifecycle.finish import LOG_WITHHELD
from node.lifecycle.inflight import InFlight
from node.lifecycle.spec import LifecycleConfig
from node.server.models import Run, RunStatus
from proxy import RunTable
from tests.fakes.memory_executor import MemoryRun
from tests.unit.lifecycle_node import (
    IDENTITY,
    LifecycleUnderTest,
    behaviour,
    lifecycle_under_test,
)


def _ended_run(node: LifecycleUnderTest) -> MemoryRun:
    """Run 1 as the runtime had it when it ended (it was cleaned up since)."""
    spec = RunSpec(run_id=1, task_id=1001, organization_id=1, collaboration_id=1, image="i")
    return MemoryRun(spec, phase=Phase.SUCCEEDED, reason=Reason.COMPLETED, exit_code=0)


async def test_an_upload_that_cannot_reach_the_server_is_retried_until_it_can(
    tmp_path: Path,
) -> None:
    async with lifecycle_under_test(tmp_path) as node:
        node.add_run(1, behaviour(sleep=0.05, output="late"))
        await node.lifecycle.sync()
        await node.until(lambda: node.notifier.statuses(1) == ["active"])
        node.server.unreachable = 4  # the server goes away just before the upload

        assert await node.finished(1) == RunStatus.COMPLETED.value  # no sync in between

        assert node.cryptor.decrypt(node.server.runs[1]["result"]) == b"late"
        patches = [body for run_id, body in node.server.patches if run_id == 1]
        assert [body.get("status") for body in patches] == [None, "active", "completed"]


async def test_a_result_that_cannot_be_encrypted_fails_the_run_and_frees_its_slot(
    tmp_path: Path,
) -> None:
    cryptor = RSACryptor(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    async with lifecycle_under_test(tmp_path, max_concurrent_runs=1, cryptor=cryptor) as node:
        node.server.public_keys[1] = cryptor.public_key  # this node's own organization
        node.add_run(1, behaviour(output="secret"), init_org_id=2)  # org 2 has no key
        node.add_run(2, behaviour(output="next one!"), init_org_id=1)

        await node.lifecycle.sync()

        assert await node.finished(1) == RunStatus.FAILED.value
        assert "cannot be encrypted for the initiating organization 2" in node.log_of(1)
        assert "result" not in node.server.runs[1]
        assert await node.finished(2) == RunStatus.COMPLETED.value
        assert cryptor.decrypt(node.server.runs[2]["result"]) == b"next one!"
        await node.until(lambda: not RunFiles(node.task_dir, 1).directory.exists())


async def test_any_error_while_finishing_ends_the_run_failed_and_cleans_up(
    tmp_path: Path,
) -> None:
    async with lifecycle_under_test(tmp_path, max_concurrent_runs=1) as node:
        node.runtime.broken_collect = RuntimeError("disk on fire")
        node.add_run(1, behaviour(output="x"))

        await node.lifecycle.sync()

        assert await node.finished(1) == RunStatus.FAILED.value
        assert "node error: RuntimeError: disk on fire" in node.log_of(1)
        assert node.notifier.statuses(1) == ["active", "failed"]
        await node.until(lambda: 1 not in node.runtime.runs)
        node.runtime.broken_collect = None
        node.add_run(2, behaviour())
        await node.lifecycle.sync()
        assert await node.finished(2) == RunStatus.COMPLETED.value


async def test_a_repeated_terminal_event_is_not_uploaded_twice(tmp_path: Path) -> None:
    async with lifecycle_under_test(tmp_path) as node:
        node.add_run(1, behaviour())
        await node.lifecycle.sync()
        await node.finished(1)
        uploads = len(node.server.patches)

        # The executor replays the end (a relist after a reconnect), the server lists it.
        node.runtime.publish(node.runtime.runs.get(1) or _ended_run(node))
        node.server.runs[1]["status"] = RunStatus.ACTIVE.value
        await node.lifecycle.sync()
        await asyncio.sleep(0.05)

        assert len(node.server.patches) == uploads


async def test_finished_ids_are_evicted_oldest_first_and_the_proxy_forgets_their_tokens(
    tmp_path: Path,
) -> None:
    proxy_runs = RunTable()
    config = LifecycleConfig(
        identity=IDENTITY,
        databases=(),
        proxy=None,
        max_concurrent_runs=4,
        deadline_seconds=60,
        executor_kind="memory",
        task_dir=tmp_path,
    )
    inflight = InFlight(
        config=config, tracer=trace.NoOpTracer(), proxy_runs=proxy_runs, finished_memory=2
    )
    for run_id in (1, 2, 3):
        run = Run.model_validate({"id": run_id, "task": {"id": 10 + run_id, "image": "i"}})
        record = inflight.remember(run)
        inflight.admit_to_proxy(record, f"token-{run_id}", {})
        inflight.finished(record, status=RunStatus.COMPLETED.value)

    assert [inflight.known(run_id) for run_id in (1, 2, 3)] == [False, True, True]
    assert proxy_runs.lookup("token-1") is None  # forgotten: 401
    finished_2 = proxy_runs.lookup("token-2")
    assert finished_2 is not None and not finished_2.active  # remembered, refused: 403


async def test_an_upload_that_ends_while_the_node_stops_is_not_reported_failed(
    tmp_path: Path,
) -> None:
    async with lifecycle_under_test(tmp_path) as node:
        node.add_run(1, behaviour(sleep=0.05, output="just in time"))
        await node.lifecycle.sync()
        await node.until(lambda: node.notifier.statuses(1) == ["active"])
        node.server.unreachable = 10  # the upload is still being retried when the node stops
        await node.until(lambda: node.runtime.runs[1].phase.is_terminal)

        await node.lifecycle.close(grace=5)

        assert node.server.status(1) == RunStatus.COMPLETED.value
        assert node.notifier.statuses(1)[-1] == "completed"
        assert 1 in node.runtime.runs  # removed by the next start's reconcile instead


async def test_with_share_algorithm_logs_false_the_server_gets_why_but_not_the_output(
    tmp_path: Path,
) -> None:
    async with lifecycle_under_test(tmp_path, share_algorithm_logs=False) as node:
        node.add_run(1, behaviour(log="patient 17 is 43 years old", exit_code=3))
        node.add_run(2, behaviour(log="behave: fine"))
        await node.lifecycle.sync()

        assert await node.finished(1) == RunStatus.CRASHED.value
        assert await node.finished(2) == RunStatus.COMPLETED.value

    crashed, completed = node.log_of(1), node.log_of(2)
    assert "patient 17" not in crashed and "behave" not in crashed
    assert crashed.startswith(LOG_WITHHELD)
    assert "exited with a non-zero exit code (exit code 3)" in crashed  # the node's own words
    assert completed == LOG_WITHHELD


async def test_by_default_the_algorithm_log_is_uploaded(tmp_path: Path) -> None:
    async with lifecycle_under_test(tmp_path) as node:
        node.add_run(1, behaviour(log="shared line"))
        await node.lifecycle.sync()
        await node.finished(1)

    assert "shared line" in node.log_of(1)


async def test_an_upload_the_server_already_holds_says_so_and_stores_nothing(
    tmp_path: Path,
) -> None:
    async with lifecycle_under_test(tmp_path) as node:
        node.add_run(1, behaviour())
        node.server.runs[1]["status"] = RunStatus.COMPLETED.value

        stored = await node.lifecycle._server.upload(1, {"status": "failed", "log": "late"})

        assert stored is False
        assert node.server.patches == []
