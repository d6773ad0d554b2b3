"""A node whose service dies exits non-zero, naming why, so that its supervisor restarts it.

``fednode start`` runs as a real child process against the real vantage6 4.15.2 server.
Its executor is a plugin installed the way a third party's is (an entry point in a
distribution on the path): a **named fake** runtime, ``DyingExecutor``, whose task that
follows the runtime loses it for good two seconds after ``open()`` — the one thing that
cannot be made to happen on demand with a real runtime, whose followers retry every
error they expect. What is real: the process, its connection to the server, the path
from the dead follower through the executor's event stream to the node's root task, the
log and the exit code.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import ROOT, free_port
from tests.peers.v6server import V6Collaboration, V6Server

pytestmark = [pytest.mark.v6server, pytest.mark.slow]

PLUGIN = textwrap.dedent(
    '''
    """A named fake runtime whose follower dies: for tests/e2e/test_node_root_tasks.py."""

    import asyncio
    from collections.abc import AsyncIterator
    from typing import ClassVar, Literal

    from pydantic import BaseModel, ConfigDict

    from executors.base import ExecutorContext, ProxyPlacement, TokenUnavailable
    from executors.events import RunEventStream
    from executors.spec import RunEvent, RunOutput, RunSpec, RunState


    class DyingSettings(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        kind: Literal["dying"] = "dying"
        follows_for_seconds: float = 2.0


    class DyingExecutor:
        kind: ClassVar[str] = "dying"
        settings_model: ClassVar[type[BaseModel]] = DyingSettings

        def __init__(self, settings: DyingSettings, *, context: ExecutorContext) -> None:
            self._settings = settings
            self._stream = RunEventStream()
            self._follower: asyncio.Task[None] | None = None

        async def open(self) -> None:
            self._follower = asyncio.create_task(self._follow(), name="dying-follower")
            self._stream.fed_by(self._follower)

        async def _follow(self) -> None:
            await asyncio.sleep(self._settings.follows_for_seconds)
            raise ConnectionResetError("the runtime went away for good")

        async def close(self) -> None:
            if self._follower is not None:
                self._follower.cancel()

        async def start(self, spec: RunSpec) -> None: ...

        async def kill(self, run_id: int) -> None: ...

        def events(self) -> AsyncIterator[RunEvent]:
            return aiter(self._stream)

        async def collect(self, run_id: int) -> RunOutput:
            return RunOutput(b"", "")

        async def cleanup(self, run_id: int) -> None: ...

        async def list_runs(self) -> list[RunState]:
            return []

        def proxy_placement(self, *, host: str, advertise_host: str | None) -> ProxyPlacement:
            return ProxyPlacement("127.0.0.1", advertise_host or "127.0.0.1")

        async def recover_token(self, state: RunState) -> str:
            raise TokenUnavailable("this runtime keeps no token")
    '''
)


def install_plugin(site: Path) -> None:
    """What ``pip install fednode-dying-executor`` would leave: a module and its dist-info."""
    site.mkdir()
    (site / "dying_executor.py").write_text(PLUGIN)
    info = site / "fednode_dying_executor-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fednode-dying-executor\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        "[fednode.executors]\ndying = dying_executor:DyingExecutor\n"
    )


def events_of(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


async def test_fednode_start_exits_3_naming_the_root_task_that_died(
    v6_plain: V6Collaboration, v6_server: V6Server, tmp_path: Path
) -> None:
    install_plugin(tmp_path / "site")
    config = tmp_path / "node.yaml"
    org = v6_plain.org_a
    config.write_text(
        yaml.safe_dump(
            {
                "name": f"fednode-root-tasks-{org.name}",
                "server_url": f"http://{v6_server.host}",
                "port": v6_server.port,
                "api_path": v6_server.api_path,
                "api_key": org.api_key,
                "task_dir": str(tmp_path / "tasks"),
                "executor": {"kind": "dying"},
                "health": {"port": free_port()},
                "proxy": {"port": free_port()},
                "logging": {"format": "json"},
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "node",
        "start",
        "-c",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=90)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    names = [event["event"] for event in events_of(out.decode())]
    died = next(e for e in events_of(out.decode()) if e["event"] == "node.root_task_died")
    assert process.returncode == 3, err.decode()[-2000:]
    assert err.decode().strip().splitlines()[-1] == (
        "fednode: stopped: root task 'executor-events' failed: ExecutorError(\"dying-follower, "
        "which follows the runtime, failed: ConnectionResetError('the runtime went away for "
        "good')\")"
    )
    assert died["task"] == "executor-events"
    assert names.index("node.started") < names.index("node.root_task_died")
    assert names.index("node.root_task_died") < names.index("node.stopped")
