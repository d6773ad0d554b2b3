"""The operator's admin socket and the CLI commands on it: ``fednode runs``/``logs``/
``kill`` against a real :class:`node.admin.AdminServer` on a real unix socket, and
``fednode keys create``. The run lifecycle behind the socket is a stand-in here
(``ListedRuns``); ``tests/e2e/test_node_admin.py`` drives a real node on real podman.

The attacks are real: another uid tries the socket (the file's mode stops it), and again
through a socket made world-writable on purpose (the peer-credential check stops it).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from executors.base import UnknownRun
from node.admin import AdminServer
from node.admin_client import AdminUnavailable, call
from node.cli import app
from node.crypto import RSACryptor
from node.keys import create_private_key

runner = CliRunner()
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"


class ListedRuns:
    """A stand-in run lifecycle: two runs in flight, one ended; run 1 has a log."""

    def __init__(self) -> None:
        self.killed: list[int] = []

    def overview(self) -> list[dict[str, Any]]:
        return [
            {"run_id": 1, "task_id": 10, "image": "a:1", "status": "running",
             "age_seconds": 75.0, "in_flight": True},
            {"run_id": 2, "task_id": 11, "image": "b:1", "status": "received",
             "age_seconds": 4000.0, "in_flight": True},
            {"run_id": 3, "task_id": 12, "image": "c:1", "status": "completed",
             "age_seconds": 200000.0, "in_flight": False},
        ]  # fmt: skip

    async def kill_run(self, run_id: int) -> bool:
        if run_id not in (1, 2):
            return False
        self.killed.append(run_id)
        return True

    async def log_of(self, run_id: int) -> str:
        if run_id != 1:
            raise UnknownRun(run_id)
        return "line one\nline two\n"


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[tuple[AdminServer, ListedRuns, Path]]:
    runs = ListedRuns()
    task_dir = tmp_path / "tasks"
    config = tmp_path / "node.yaml"
    config.write_text(f"server_url: http://server\napi_key: k\ntask_dir: {task_dir}\n")
    server = AdminServer(task_dir / "admin.sock", target=lambda: runs)
    await server.start()
    yield server, runs, config
    await server.stop()


def cli(*args: str) -> Any:
    """The CLI in a thread: the admin server answers on this test's event loop."""
    return asyncio.to_thread(runner.invoke, app, list(args))


async def test_runs_lists_each_run_with_its_status_and_age(admin: Any) -> None:
    _, _, config = admin
    result = await cli("runs", "-c", str(config))

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["RUN", "TASK", "STATUS", "AGE", "IMAGE"]
    assert [line.split() for line in lines[1:]] == [
        ["1", "10", "running", "75s", "a:1"],
        ["2", "11", "received", "66m", "b:1"],
        ["3", "12", "completed", "2d", "c:1"],
    ]


async def test_logs_prints_the_runs_log_and_an_unknown_run_exits_1(admin: Any) -> None:
    _, _, config = admin
    shown = await cli("logs", "1", "-c", str(config))
    unknown = await cli("logs", "9", "-c", str(config))

    assert shown.exit_code == 0, shown.output
    assert shown.stdout == "line one\nline two\n"
    assert unknown.exit_code == 1
    assert "run 9 is not in flight on this node (HTTP 404)" in unknown.stderr


async def test_kill_asks_the_node_to_kill_exactly_that_run(admin: Any) -> None:
    _, runs, config = admin
    killed = await cli("kill", "2", "-c", str(config))
    unknown = await cli("kill", "7", "-c", str(config))

    assert killed.exit_code == 0, killed.output
    assert runs.killed == [2]
    assert unknown.exit_code == 1
    assert "HTTP 404" in unknown.stderr


async def test_without_a_running_node_the_commands_say_so_and_exit_1(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(f"server_url: http://server\napi_key: k\ntask_dir: {tmp_path}\n")

    result = await cli("runs", "-c", str(config))

    assert result.exit_code == 1
    assert "no node is running with admin socket" in result.stderr


async def test_the_socket_is_the_node_users_alone(admin: Any) -> None:
    server, _, _ = admin
    mode = stat.S_IMODE(server.path.stat().st_mode)

    assert stat.S_ISSOCK(server.path.stat().st_mode)
    assert mode == 0o600
    assert (await asyncio.to_thread(call, server.path, "GET", "/runs"))[0] == 200


def as_other_user(path: Path) -> subprocess.CompletedProcess[str]:
    """``GET /runs`` on the socket from a process running as uid/gid 65534 (nobody): the
    system's python3 with the standard library only (the test's venv may be unreadable)."""
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "except OSError as exc:\n"
        "    print('refused:', exc.strerror); sys.exit()\n"
        "s.sendall(b'GET /runs HTTP/1.0\\r\\n\\r\\n')\n"
        "print(s.recv(100).split()[1].decode())\n"
    )
    return subprocess.run(
        [SYSTEM_PYTHON, "-c", probe, str(path)],
        capture_output=True,
        text=True,
        check=False,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        cwd="/",
    )


def passable_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="fednode-admin-"))
    folder.chmod(0o755)
    return folder


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path(SYSTEM_PYTHON).exists(),
    reason="switching to another uid needs root (and a python3 that uid can run)",
)
async def test_another_user_cannot_use_the_socket_even_when_its_mode_is_opened() -> None:
    runs = ListedRuns()
    # A folder every user may pass through, so only the socket's own guards are tested.
    folder = passable_folder()
    server = AdminServer(folder / "admin.sock", target=lambda: runs)
    await server.start()
    try:
        refused_by_mode = await asyncio.to_thread(as_other_user, server.path)
        server.path.chmod(0o666)  # the operator's mistake, or an attacker's wish
        refused_by_credentials = await asyncio.to_thread(as_other_user, server.path)
    finally:
        await server.stop()
        shutil.rmtree(folder)

    assert refused_by_mode.stdout.strip() == "refused: Permission denied", refused_by_mode
    assert refused_by_credentials.stdout.strip() == "403", refused_by_credentials
    assert runs.killed == []


def test_keys_create_writes_a_0600_private_key_and_prints_its_public_key(tmp_path: Path) -> None:
    out = tmp_path / "org.pem"
    previous = os.umask(0)  # the file's mode must not depend on the caller's umask
    try:
        result = runner.invoke(app, ["keys", "create", "--out", str(out)])
    finally:
        os.umask(previous)

    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    cryptor = RSACryptor.from_file(out)
    assert result.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    assert cryptor.public_key  # the node can use it as encryption.private_key


def test_keys_create_never_overwrites_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "org.pem"
    first = create_private_key(out, bits=2048)

    again = runner.invoke(app, ["keys", "create", "--out", str(out)])
    replaced = create_private_key(out, overwrite=True, bits=2048)

    assert again.exit_code == 2
    assert "exists" in again.stderr
    assert replaced != first
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["org.pem"]


def test_admin_unavailable_is_an_error_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(AdminUnavailable, match="no node is running"):
        call(tmp_path / "none.sock", "GET", "/runs")


async def test_a_node_started_while_the_last_one_stops_keeps_its_socket(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    older, newer = ListedRuns(), ListedRuns()
    first = AdminServer(path, target=lambda: older)
    second = AdminServer(path, target=lambda: newer)
    await first.start()
    await second.start()  # a restart overlapping the first one's shutdown
    await first.stop()
    try:
        status, _ = await asyncio.to_thread(call, path, "POST", "/runs/1/kill")
    finally:
        await second.stop()

    assert status == 202
    assert (older.killed, newer.killed) == ([], [1])
    assert not path.exists()


async def test_a_socket_path_too_long_for_the_kernel_is_refused_naming_the_fix(
    tmp_path: Path,
) -> None:
    server = AdminServer(tmp_path / ("x" * 120) / "admin.sock", target=lambda: None)

    with pytest.raises(OSError, match="longer than 107 bytes; give a shorter path"):
        await server.start()
