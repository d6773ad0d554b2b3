"""What every executor does, whatever the runtime (run once per kind in ``conftest.KINDS``).

Each test starts real runs through the executor under test, consumes its event stream, and
asserts what the node would observe: phases in order and each exactly once, reasons and
exit codes, output and log, the runtime's own objects.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from pydantic import SecretStr

from executors.base import TokenUnavailable
from executors.spec import Phase, Reason, Resources
from tests.conformance.harness import AVERAGE_EXPECTED, Behaviour, ExecutorUnderTest

pytestmark = [pytest.mark.slow]


def require(under_test: ExecutorUnderTest, capability: str) -> None:
    if capability not in under_test.harness.supports:
        harness = under_test.harness
        pytest.skip(
            f"the {harness.kind} harness cannot show {capability!r}: {harness.unsupported_because}"
        )


async def test_average_algorithm_returns_the_partial_sum_and_count_of_the_sample_csv(
    executor_under_test: ExecutorUnderTest,
) -> None:
    require(executor_under_test, "algorithms")
    executor, events = executor_under_test.executor, executor_under_test.events
    slack = executor_under_test.harness.slack

    await executor.start(executor_under_test.harness.average_spec(1))
    end = await events.terminal(1, timeout=slack)

    assert (end.phase, end.reason, end.exit_code) == (Phase.SUCCEEDED, Reason.COMPLETED, 0)
    assert events.phases(1) == [Phase.STARTING, Phase.RUNNING, Phase.SUCCEEDED]
    output = await executor.collect(1)
    assert json.loads(output.output) == AVERAGE_EXPECTED
    assert "partial_average over 10 values of 'age'" in output.log


async def test_twenty_runs_started_at_once_all_finish_and_each_is_reported_exactly_once(
    executor_under_test: ExecutorUnderTest,
) -> None:
    executor, events = executor_under_test.executor, executor_under_test.events
    harness = executor_under_test.harness
    run_ids = range(1, 21)

    began = time.monotonic()
    await asyncio.gather(
        *(executor.start(harness.spec(i, Behaviour(sleep=1, output=f"run {i}"))) for i in run_ids)
    )
    ends = [await events.terminal(i, timeout=harness.slack * 2) for i in run_ids]
    elapsed = time.monotonic() - began
    await events.settle()

    assert all(end.phase is Phase.SUCCEEDED for end in ends)
    for i in run_ids:
        assert events.phases(i) == [Phase.STARTING, Phase.RUNNING, Phase.SUCCEEDED], i
        assert (await executor.collect(i)).output == f"run {i}".encode()
    # Started concurrently: far less than 20 one-second runs back to back.
    assert elapsed < 15, elapsed


async def test_a_run_that_exits_non_zero_crashed_with_its_exit_code_and_its_log_is_collected(
    executor_under_test: ExecutorUnderTest,
) -> None:
    executor, events = executor_under_test.executor, executor_under_test.events

    await executor.start(executor_under_test.harness.spec(1, Behaviour(exit_code=3, log="bye")))
    end = await events.terminal(1, timeout=executor_under_test.harness.slack)

    assert (end.phase, end.reason, end.exit_code) == (Phase.FAILED, Reason.CRASHED, 3)
    log = (await executor.collect(1)).log
    assert "bye" in log
    assert "behave: on stderr" in log


async def test_kill_ends_a_running_run_as_killed(executor_under_test: ExecutorUnderTest) -> None:
    executor, events = executor_under_test.executor, executor_under_test.events
    slack = executor_under_test.harness.slack
    await executor.start(executor_under_test.harness.spec(1, Behaviour(sleep=60)))
    await events.wait_for(1, Phase.RUNNING, timeout=slack)

    began = time.monotonic()
    await executor.kill(1)
    end = await events.terminal(1, timeout=slack)

    assert (end.phase, end.reason) == (Phase.KILLED, Reason.KILLED)
    assert time.monotonic() - began < 10
    assert [s.phase for s in await executor.list_runs() if s.run_id == 1] == [Phase.KILLED]


async def test_a_kill_that_races_the_start_still_ends_the_run_as_killed(
    executor_under_test: ExecutorUnderTest,
) -> None:
    executor, events = executor_under_test.executor, executor_under_test.events
    spec = executor_under_test.harness.spec(1, Behaviour(sleep=60))

    await asyncio.gather(executor.start(spec), executor.kill(1))
    end = await events.terminal(1, timeout=executor_under_test.harness.slack)
    await events.settle()

    assert (end.phase, end.reason) == (Phase.KILLED, Reason.KILLED)
    assert events.phases(1)[-1] is Phase.KILLED
    assert [s.phase for s in await executor.list_runs()] == [Phase.KILLED]


async def test_kill_of_an_unknown_run_is_ignored(executor_under_test: ExecutorUnderTest) -> None:
    await executor_under_test.executor.kill(999)

    assert await executor_under_test.executor.list_runs() == []


async def test_a_run_past_its_deadline_is_killed_with_reason_deadline_exceeded(
    executor_under_test: ExecutorUnderTest,
) -> None:
    executor, events = executor_under_test.executor, executor_under_test.events
    spec = executor_under_test.harness.spec(1, Behaviour(sleep=60), deadline_seconds=2)

    began = time.monotonic()
    await executor.start(spec)
    end = await events.terminal(1, timeout=executor_under_test.harness.slack)

    assert (end.phase, end.reason) == (Phase.FAILED, Reason.DEADLINE_EXCEEDED)
    assert 1.5 < time.monotonic() - began < 15


async def test_a_run_over_its_memory_limit_is_oom_killed(
    executor_under_test: ExecutorUnderTest,
) -> None:
    require(executor_under_test, "oom")
    executor, events = executor_under_test.executor, executor_under_test.events
    spec = executor_under_test.harness.spec(
        1, Behaviour(allocate_mb=400, sleep=5), resources=Resources(memory_mb=64)
    )

    await executor.start(spec)
    end = await events.terminal(1, timeout=executor_under_test.harness.slack)

    assert (end.phase, end.reason) == (Phase.FAILED, Reason.OOM_KILLED)


async def test_a_missing_image_fails_quickly_with_image_not_found(
    executor_under_test: ExecutorUnderTest,
) -> None:
    executor, events = executor_under_test.executor, executor_under_test.events

    began = time.monotonic()
    await executor.start(executor_under_test.harness.missing_image_spec(1))
    end = await events.terminal(1, timeout=30)

    assert (end.phase, end.reason) == (Phase.FAILED, Reason.IMAGE_NOT_FOUND)
    assert "no-such-image" in end.message
    assert time.monotonic() - began < 30


async def test_under_no_network_a_run_has_no_route_to_the_internet_and_runs_isolated(
    executor_under_test: ExecutorUnderTest,
) -> None:
    require(executor_under_test, "network")
    executor, events = executor_under_test.executor, executor_under_test.events

    await executor.start(executor_under_test.harness.diagnostics_spec(1, proxy=None))
    end = await events.terminal(1, timeout=executor_under_test.harness.slack)
    assert end.phase is Phase.SUCCEEDED, (await executor.collect(1)).log
    report = json.loads((await executor.collect(1)).output)

    assert report["internet"]["reachable"] is False
    assert report["dns"]["resolves"] is False
    assert report["network_interfaces"] == ["lo"]
    assert report["root_fs"]["read_only"] is True
    assert report["root_fs"]["writable"] is False
    assert report["scratch"]["writable"] is True
    assert report["identity"]["root"] is False
    assert report["identity"]["no_new_privs"] is True
    assert int(report["identity"]["cap_eff"], 16) == 0


async def test_start_is_idempotent(executor_under_test: ExecutorUnderTest) -> None:
    executor, events = executor_under_test.executor, executor_under_test.events
    spec = executor_under_test.harness.spec(1, Behaviour(sleep=1))

    await asyncio.gather(executor.start(spec), executor.start(spec))
    await executor.start(spec)
    await events.terminal(1, timeout=executor_under_test.harness.slack)
    await executor.start(spec)  # after the end: still no second container
    await events.settle()

    assert events.phases(1) == [Phase.STARTING, Phase.RUNNING, Phase.SUCCEEDED]
    assert [s.run_id for s in await executor.list_runs()] == [1]


async def test_after_a_restart_runs_are_reconciled_running_ones_followed_finished_ones_once(
    executor_under_test: ExecutorUnderTest,
) -> None:
    require(executor_under_test, "restart")
    harness = executor_under_test.harness
    executor, events = executor_under_test.executor, executor_under_test.events
    await asyncio.gather(
        executor.start(harness.spec(1, Behaviour(output="before"))),  # ends before the restart
        executor.start(harness.spec(2, Behaviour(sleep=2, exit_code=4))),  # ends while down
        executor.start(harness.spec(3, Behaviour(sleep=6, output="after"))),  # ends after
    )
    await events.terminal(1, timeout=harness.slack)
    await events.wait_for(2, Phase.RUNNING, timeout=harness.slack)
    await events.wait_for(3, Phase.RUNNING, timeout=harness.slack)

    await executor_under_test.restart(down_for=3)  # run 2 ends while nobody watches
    executor, events = executor_under_test.executor, executor_under_test.events
    listed = {s.run_id: s for s in await executor.list_runs()}
    end_3 = await events.terminal(3, timeout=harness.slack)
    await events.settle()

    assert {i: (s.phase, s.exit_code) for i, s in listed.items()} == {
        1: (Phase.SUCCEEDED, 0),
        2: (Phase.FAILED, 4),
        3: (Phase.RUNNING, None),
    }
    assert listed[1].task_id == 1001
    assert events.phases(1) == [Phase.SUCCEEDED]
    assert [(e.phase, e.reason, e.exit_code) for e in events.by_run[2]] == [
        (Phase.FAILED, Reason.CRASHED, 4)
    ]
    assert events.phases(3) == [Phase.RUNNING, Phase.SUCCEEDED]
    assert (end_3.phase, (await executor.collect(3)).output) == (Phase.SUCCEEDED, b"after")


async def test_cleanup_removes_the_runtime_object_and_the_run_files(
    executor_under_test: ExecutorUnderTest,
) -> None:
    executor, events = executor_under_test.executor, executor_under_test.events
    harness = executor_under_test.harness
    await executor.start(harness.spec(1, Behaviour(output="x")))
    await events.terminal(1, timeout=harness.slack)
    assert await harness.object_exists(1)
    assert harness.files(1).input.exists()

    await executor.cleanup(1)

    assert not await harness.object_exists(1)
    assert not harness.files(1).directory.exists()
    assert await executor.list_runs() == []
    await executor.cleanup(1)  # a second cleanup is harmless


async def test_a_running_runs_token_comes_back_to_a_restarted_node_sealed_or_read_back(
    executor_under_test: ExecutorUnderTest,
) -> None:
    """What a restarted node needs to admit an adopted run to the proxy again: the sealed
    copy the spec carried (``RunState.sealed_token``), or the token itself from
    ``recover_token`` — at least one of them, and nothing else."""
    require(executor_under_test, "restart")
    harness = executor_under_test.harness
    spec = harness.spec(1, Behaviour(sleep=30)).model_copy(
        update={"token": SecretStr("container-token-1"), "sealed_token": "sealed-copy-1"}
    )
    await executor_under_test.executor.start(spec)
    await executor_under_test.events.wait_for(1, Phase.RUNNING, timeout=harness.slack)

    await executor_under_test.restart(down_for=0)
    executor = executor_under_test.executor
    [state] = await executor.list_runs()
    try:
        read_back: str | None = await executor.recover_token(state)
    except TokenUnavailable as exc:
        read_back, why = None, str(exc)
    await executor.kill(1)

    assert state.sealed_token == "sealed-copy-1" or read_back == "container-token-1"
    assert read_back in (None, "container-token-1")
    if read_back is None:
        assert why  # the executor says why it keeps no readable copy
