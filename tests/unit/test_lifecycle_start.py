"""Starting runs: admission, slots, kills before a slot, tokens, failed starts, the spec.

The lifecycle is real (``node/lifecycle``); the runtime is the in-memory test executor and
the server a stand-in (``tests/unit/lifecycle_node.py``), so each test takes milliseconds.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from structlog.testing import capture_logs

from executors.runfiles import RunFiles
from executors.spec import RunSpec
from node.lifecycle import build_spec
from node.lifecycle.spec import LifecycleConfig
from node.server.models import KillContainers, NewTask, Run, RunStatus
from node.server.socket import Received
from policies.admission import AdmissionPolicy, Admitted, Granted
from proxy import RunTable
from tests.fakes.memory_executor import MemoryExecutor
from tests.unit.lifecycle_node import IDENTITY, behaviour, lifecycle_under_test


async def test_an_open_run_is_started_and_its_result_uploaded(tmp_path: Path) -> None:
    async with lifecycle_under_test(tmp_path) as node:
        node.add_run(1, behaviour(output="forty-two", log="hello"))

        await node.lifecycle.sync()

        assert await node.finished(1) == RunStatus.COMPLETED.value
        run = node.server.runs[1]
        assert node.cryptor.decrypt(run["result"]) == b"forty-two"
        assert "hello" in run["log"]
        assert run["started_at"] and run["finished_at"]
        assert node.notifier.statuses(1) == ["active", "completed"]
        await node.until(lambda: not RunFiles(node.task_dir, 1).directory.exists())


async def test_a_run_the_policy_refuses_ends_not_allowed_without_a_container(
    tmp_path: Path,
) -> None:
    policy = AdmissionPolicy(allowed_algorithms=(r"harbor\.example/.*",))
    async with lifecycle_under_test(tmp_path, policy=policy) as node:
        node.add_run(1, behaviour())

        await node.lifecycle.sync()

        assert await node.finished(1) == RunStatus.NOT_ALLOWED.value
        assert "matches none of policies.allowed_algorithms" in node.log_of(1)
        assert node.runtime.started == []


async def test_a_run_killed_while_it_waits_for_a_slot_never_starts(tmp_path: Path) -> None:
    async with lifecycle_under_test(tmp_path, max_concurrent_runs=1) as node:
        node.add_run(1, behaviour(sleep=0.3))
        node.add_run(2, behaviour())
        await node.lifecycle.sync()
        await node.until(lambda: node.runtime.started == [1])

        target = {"task_id": 1002, "run_id": 2, "organization_id": 1}
        await node.lifecycle.kill(
            KillContainers.model_validate({"collaboration_id": 1, "kill_list": [target]})
        )

        assert await node.finished(2) == RunStatus.KILLED.value
        assert "killed before start" in node.log_of(2)
        assert await node.finished(1) == RunStatus.COMPLETED.value
        assert node.runtime.started == [1]


async def test_a_run_whose_token_the_away_server_could_not_give_is_started_at_the_next_sync(
    tmp_path: Path,
) -> None:
    # Found by the chaos campaign: a server restart during a start failed the run as
    # "could not obtain an algorithm container token"; only a refusal may end it.
    async with lifecycle_under_test(tmp_path) as node:
        node.add_run(1, behaviour(output="done"))
        node.server.token_unreachable = 1

        await node.lifecycle.sync()
        await node.until(lambda: node.server.token_unreachable == 0)
        await node.until(lambda: node.lifecycle.in_flight == 0)  # let go of, not failed
        assert node.runtime.started == []
        assert not node.server.finished(1)

        await node.lifecycle.sync()  # the server is back: the socket's sync
        assert await node.finished(1) == RunStatus.COMPLETED.value
        assert node.runtime.started == [1]


async def test_a_run_whose_active_status_the_away_server_missed_stays_in_flight(
    tmp_path: Path,
) -> None:
    # Found by the chaos campaign: the start let go of a run whose container was already
    # running, so the next sync adopted it a second time and its end was reported twice.
    async with lifecycle_under_test(tmp_path) as node:
        node.add_run(1, behaviour(output="done", sleep=0.3))
        node.server.active_unreachable = 1

        await node.lifecycle.sync()
        await node.until(lambda: node.runtime.started == [1])
        await node.lifecycle.sync()  # the server is back: this run is still in flight here

        assert await node.finished(1) == RunStatus.COMPLETED.value
        assert node.runtime.started == [1]
        assert [body["status"] for _, body in node.server.patches if "status" in body] == [
            RunStatus.COMPLETED.value
        ]


async def test_a_subtask_starts_while_central_runs_hold_every_slot(tmp_path: Path) -> None:
    # A central run waits for its subtasks in its slot; they must not wait for that slot.
    async with lifecycle_under_test(tmp_path, max_concurrent_runs=1) as node:
        node.add_run(1, behaviour(sleep=30))
        node.add_run(2, behaviour(output="partial"))
        node.server.runs[2]["task"]["parent"] = {"id": 1001}
        await node.lifecycle.sync()

        assert await node.finished(2) == RunStatus.COMPLETED.value
        assert node.server.status(1) == RunStatus.ACTIVE.value
        assert node.runtime.started == [1, 2]


async def test_the_token_is_known_to_the_proxy_before_the_container_starts(
    tmp_path: Path,
) -> None:
    proxy_runs = RunTable()
    seen_at_start: list[object] = []
    start = MemoryExecutor.start

    async def start_and_look(self: MemoryExecutor, spec: RunSpec) -> None:
        assert spec.token is not None
        seen_at_start.append(proxy_runs.lookup(spec.token.get_secret_value()))
        await start(self, spec)

    MemoryExecutor.start = start_and_look  # type: ignore[method-assign]
    try:
        async with lifecycle_under_test(tmp_path, proxy_runs=proxy_runs) as node:
            node.add_run(1, behaviour())
            await node.lifecycle.sync()
            await node.finished(1)
    finally:
        MemoryExecutor.start = start  # type: ignore[method-assign]

    (info,) = seen_at_start
    assert info is not None and info.run_id == 1 and info.active  # type: ignore[attr-defined]


async def test_a_start_the_runtime_refuses_ends_start_failed_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    async with lifecycle_under_test(tmp_path, max_concurrent_runs=1) as node:
        node.runtime.refuse_starts = "no such network"
        node.add_run(1, behaviour())

        await node.lifecycle.sync()

        assert await node.finished(1) == RunStatus.START_FAILED.value
        assert "no such network" in node.log_of(1)
        # The decrypted input the executor wrote before it failed is removed, and the
        # proxy no longer knows the token.
        await node.until(lambda: not RunFiles(node.task_dir, 1).directory.exists())
        assert len(node.proxy_runs) == 0
        # The slot is free again.
        node.runtime.refuse_starts = None
        node.add_run(2, behaviour())
        await node.lifecycle.sync()
        assert await node.finished(2) == RunStatus.COMPLETED.value


def test_build_spec_is_what_the_run_and_the_node_say(tmp_path: Path) -> None:
    run = Run.model_validate(
        {
            "id": 7,
            "task": {
                "id": 70,
                "image": "harbor.example/avg:1",
                "parent": {"id": 69},
                "databases": [{"label": "default"}],
            },
        }
    )
    config = LifecycleConfig(
        identity=IDENTITY,
        databases=(),
        proxy=None,
        max_concurrent_runs=1,
        deadline_seconds=120,
        executor_kind="memory",
        task_dir=tmp_path,
    )

    spec = build_spec(
        run,
        config=config,
        admitted=Admitted(Granted(cpu=2.0, memory_mb=512, gpus=0)),
        input_bytes=b"in",
        token="tok",
        sealed_token="sealed",
        trace_context={"traceparent": "00-x"},
    )

    assert (spec.run_id, spec.task_id, spec.parent_task_id) == (7, 70, 69)
    assert (spec.organization_id, spec.collaboration_id) == (1, 1)
    assert spec.image == "harbor.example/avg:1" and spec.input == b"in"
    assert spec.token is not None and spec.token.get_secret_value() == "tok"
    assert spec.sealed_token == "sealed"
    assert (spec.resources.cpu, spec.resources.memory_mb) == (2.0, 512)
    assert spec.deadline_seconds == 120 and spec.proxy is None
    assert spec.trace_context == {"traceparent": "00-x"}


async def test_a_new_task_heard_while_the_node_stops_is_left_to_the_next_start(
    tmp_path: Path,
) -> None:
    """Seen on the real worker: a node pod being deleted (or replaced by `helm upgrade`)
    still hears `new_task`; the consumer used to spawn it into the closed lifecycle, which
    refused, and the node logged an error with a traceback at every such stop."""
    events: asyncio.Queue[Received] = asyncio.Queue()
    async with lifecycle_under_test(tmp_path) as node:
        node.add_run(7, behaviour(output="{}"))
        consumer = asyncio.create_task(node.lifecycle.consume_server_events(events))
        await node.lifecycle.close(grace=0.1)  # SIGTERM: the node stops
        with capture_logs() as logs:
            events.put_nowait(Received(NewTask(id=7), time.time_ns()))
            await asyncio.wait_for(consumer, 5)

    assert consumer.exception() is None  # it ended, quietly
    assert [e["event"] for e in logs] == ["server.events_left_to_next_start"]
    assert node.runtime.started == []  # the next start's sync starts it
