"""Reconciling after a restart: adopted runs, their tokens, resumed starts, ended runs, strays.

A "restart" closes one lifecycle and opens another over the same in-memory runtime (runs
keep going, as containers do) and the same server stand-in
(``tests/unit/lifecycle_node.py``); each test takes milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from executors.runfiles import RunFiles
from executors.spec import RunSpec
from node.server.models import RunStatus
from node.token_seal import TokenSeal
from proxy import RunTable
from tests.fakes.memory_executor import MemoryRuntime
from tests.fakes.server_standin import ServerStandIn
from tests.unit.lifecycle_node import API_KEY, behaviour, lifecycle_under_test


async def test_a_run_still_going_after_a_restart_is_followed_not_started_again(
    tmp_path: Path,
) -> None:
    runtime = MemoryRuntime(task_dir=tmp_path / "tasks")
    server = ServerStandIn()
    async with lifecycle_under_test(tmp_path, runtime=runtime, server=server) as before:
        before.add_run(1, behaviour(sleep=0.3, output="kept going"))
        await before.lifecycle.sync()
        await before.until(lambda: before.notifier.statuses(1) == ["active"])

    proxy_runs = RunTable()
    async with lifecycle_under_test(
        tmp_path, runtime=runtime, server=server, proxy_runs=proxy_runs
    ) as after:
        info = proxy_runs.lookup("container-token-1")  # the stand-in's first token
        assert info is not None and info.run_id == 1 and info.active
        await after.lifecycle.sync()  # the server lists it open and started: adopted

        assert await after.finished(1) == RunStatus.COMPLETED.value
        assert after.cryptor.decrypt(server.runs[1]["result"]) == b"kept going"
        assert runtime.started == [1]
    await runtime.aclose()


async def test_the_sealed_token_is_recovered_before_the_token_file(tmp_path: Path) -> None:
    runtime = _running(tmp_path, file_token="file-token", sealed=("sealed-token", API_KEY))
    proxy_runs = RunTable()
    async with lifecycle_under_test(
        tmp_path, runtime=runtime, server=_started_run(), proxy_runs=proxy_runs
    ):
        assert proxy_runs.lookup("sealed-token") is not None
        assert proxy_runs.lookup("file-token") is None
    await runtime.aclose()


async def test_the_token_file_is_used_when_the_sealed_token_does_not_open(
    tmp_path: Path,
) -> None:
    runtime = _running(tmp_path, file_token="file-token", sealed=("sealed-token", "old-key"))
    proxy_runs = RunTable()
    async with lifecycle_under_test(
        tmp_path, runtime=runtime, server=_started_run(), proxy_runs=proxy_runs
    ):
        assert proxy_runs.lookup("file-token") is not None
        assert len(proxy_runs) == 1
    await runtime.aclose()


async def test_a_run_the_server_says_started_but_that_never_got_a_container_is_started_once(
    tmp_path: Path,
) -> None:
    # The node died between telling the server started_at and creating the container.
    server = ServerStandIn()
    async with lifecycle_under_test(tmp_path, server=server) as node:
        node.add_run(1, behaviour(output="ran once"), started=True)
        await asyncio.gather(node.lifecycle.sync(), node.lifecycle.sync())

        assert await node.finished(1) == RunStatus.COMPLETED.value
        assert node.cryptor.decrypt(server.runs[1]["result"]) == b"ran once"
        assert node.runtime.started == [1]
        assert ("PATCH", "run/1") in server.calls
        assert not [body for _, body in server.patches if "started_at" in body]


async def test_a_result_already_at_the_server_is_not_uploaded_again_and_is_cleaned_up_once(
    tmp_path: Path,
) -> None:
    # The node died after the result's PATCH, before removing the container.
    runtime = _running(tmp_path, file_token="t", sealed=("t", API_KEY), sleep=0)
    server = _started_run()
    await _until(lambda: runtime.runs[1].phase.is_terminal)
    server.runs[1].update(
        status=RunStatus.COMPLETED.value, finished_at="2026-01-01T00:01:00+00:00", result="r"
    )
    async with lifecycle_under_test(tmp_path, runtime=runtime, server=server) as node:
        await node.until(lambda: 1 not in runtime.runs)
        await node.lifecycle.sync()

        assert server.patches == []
        assert server.runs[1]["result"] == "r"
        assert not RunFiles(node.task_dir, 1).directory.exists()
        assert node.lifecycle.in_flight == 0
    await runtime.aclose()


async def test_a_run_killed_by_its_user_while_the_node_was_down_is_killed_not_uploaded(
    tmp_path: Path,
) -> None:
    runtime = _running(tmp_path, file_token="t", sealed=("t", API_KEY))
    server = _started_run()
    server.runs[1].update(status=RunStatus.KILLED.value, finished_at="2026-01-01T00:01:00+00:00")
    async with lifecycle_under_test(tmp_path, runtime=runtime, server=server) as node:
        await node.until(lambda: 1 not in runtime.runs)

        assert server.patches == []
        assert server.status(1) == RunStatus.KILLED.value
    await runtime.aclose()


async def test_a_run_its_user_killed_while_the_socket_was_away_is_killed_at_the_next_sync(
    tmp_path: Path,
) -> None:
    # Found by the chaos campaign: the kill_containers event went out while the node's
    # socket was reconnecting; the run's container slept on after the campaign ended.
    async with lifecycle_under_test(tmp_path, max_concurrent_runs=1) as node:
        node.add_run(1, behaviour(sleep=30))
        node.add_run(2, behaviour())  # waits for run 1's slot
        await node.lifecycle.sync()
        await node.until(lambda: node.notifier.statuses(1) == ["active"])
        for run_id in (1, 2):  # the user's kill, as the server records it; no event
            node.server.runs[run_id].update(
                status=RunStatus.KILLED.value, finished_at="2026-01-01T00:01:00+00:00"
            )

        await node.lifecycle.sync()  # the socket is back

        await node.until(lambda: node.lifecycle.in_flight == 0 and 1 not in node.runtime.runs)
        assert node.runtime.started == [1]  # run 2 never started
        assert not RunFiles(node.task_dir, 1).directory.exists()
        assert [body for _, body in node.server.patches if "finished_at" in body] == []
        assert node.server.status(1) == node.server.status(2) == RunStatus.KILLED.value


async def test_a_sync_leaves_followed_runs_the_server_still_has_open_alone(
    tmp_path: Path,
) -> None:
    async with lifecycle_under_test(tmp_path) as node:
        node.add_run(1, behaviour(sleep=0.3, output="kept"))
        await node.lifecycle.sync()
        await node.until(lambda: node.runtime.started == [1])
        listed = node.server.list_pages

        async def missing_it(path: str, **kwargs: Any) -> list[Any]:
            return [r for r in await listed(path, **kwargs) if r["id"] != 1]

        node.server.list_pages = missing_it  # type: ignore[method-assign]
        await node.lifecycle.sync()  # a listing without it (e.g. a page boundary that moved)
        node.server.list_pages = listed  # type: ignore[method-assign]

        assert await node.finished(1) == RunStatus.COMPLETED.value


async def test_run_directories_nothing_backs_are_swept_at_start_up(tmp_path: Path) -> None:
    runtime = _running(tmp_path, file_token="t", sealed=("t", API_KEY))
    task_dir = tmp_path / "tasks"
    stray = RunFiles(task_dir, 5)
    stray.directory.mkdir(mode=0o700)
    stray.input.write_bytes(b"decrypted input left by a failed start")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("not the node's")
    (task_dir / "run-6").symlink_to(elsewhere)
    (task_dir / ".apptainer-images").mkdir()

    async with lifecycle_under_test(tmp_path, runtime=runtime, server=_started_run()):
        assert not stray.directory.exists()
        assert RunFiles(task_dir, 1).input.exists()  # backed by a run: kept
        assert (elsewhere / "keep").exists()  # a link is never followed
        assert (task_dir / ".apptainer-images").is_dir()
    await runtime.aclose()


def _running(
    tmp_path: Path, *, file_token: str, sealed: tuple[str, str], sleep: float = 30
) -> MemoryRuntime:
    """A runtime with run 1 going: its token file and the sealed token kept with it."""
    token, key = sealed
    runtime = MemoryRuntime(task_dir=tmp_path / "tasks")
    spec = RunSpec(
        run_id=1,
        task_id=1001,
        organization_id=1,
        collaboration_id=1,
        image="localhost/fednode/behaviour:in-memory",
        input=behaviour(sleep=sleep),
        token=SecretStr(file_token),
        sealed_token=TokenSeal(api_key=key).seal(token, run_id=1, task_id=1001),
    )
    RunFiles(runtime.task_dir, 1).prepare(spec)
    runtime.launch(spec)
    return runtime


async def _until(condition: Callable[[], bool], *, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"not true within {timeout} s"
        await asyncio.sleep(0.002)


def _started_run() -> ServerStandIn:
    server = ServerStandIn()
    server.add_run(1, started=True)
    return server
