"""What an operator and an orchestrator see of a running node: ``/readyz`` and ``fednode status``.

Real vantage6 4.15.2 server, real podman; the node is served in this process and asked
over HTTP (``/readyz``) and by the real ``fednode`` command in a child process.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.e2e.conftest import ROOT, RunningNode, StartNode, wait_until_connected
from tests.peers.v6server import V6Collaboration, V6Server

pytestmark = [pytest.mark.v6server, pytest.mark.podman, pytest.mark.slow]


async def readyz(node: RunningNode) -> tuple[int, dict[str, Any]]:
    health = node.node.settings.health
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{health.host}:{health.port}/readyz") as response,
    ):
        return response.status, await response.json()


async def answered(node: RunningNode, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    """The first answer of ``/readyz`` once the node's health endpoint is up."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await readyz(node)
        except aiohttp.ClientConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.fixture
def server_back_after(v6_server: V6Server) -> Any:
    """The server, started again after the test whatever the test did to it."""
    yield v6_server
    v6_server.start()


async def test_readyz_is_503_naming_what_is_missing_until_the_node_is_connected_then_200(
    v6_plain: V6Collaboration, start_node: StartNode, server_back_after: V6Server
) -> None:
    await asyncio.to_thread(server_back_after.stop)
    node = await start_node(v6_plain, v6_plain.org_a, connected=False)

    before = await answered(node)
    await asyncio.to_thread(server_back_after.start)
    await wait_until_connected(node, timeout=60)
    after = await readyz(node)

    assert before == (
        503,
        {"ready": False, "missing": ["server authentication", "executor", "server socket"]},
    )
    assert after == (200, {"ready": True, "missing": []})


def config_file(node: RunningNode, path: Path) -> Path:
    """The node's configuration as an operator's YAML file."""
    values = json.loads(json.dumps(node.settings_values, default=str))
    path.write_text(yaml.safe_dump(values))
    return path


async def test_fednode_status_prints_the_running_nodes_status(
    v6_plain: V6Collaboration, start_node: StartNode, tmp_path: Path
) -> None:
    node = await start_node(v6_plain, v6_plain.org_a)
    config = config_file(node, tmp_path / "node.yaml")

    status = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "node", "status", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )

    assert status.returncode == 0, status.stderr
    shown = dict(
        (key.strip(), value.strip())
        for key, value in (line.split(":", 1) for line in status.stdout.splitlines())
    )
    assert shown["ready"] == "True"
    assert shown["missing"] == "[]"
    assert shown["name"] == node.node.settings.name
    assert shown["executor"] == "podman"
    assert shown["node_id"] == str(v6_plain.org_a.node_id)
    assert shown["organization_id"] == str(v6_plain.org_a.id)
    assert shown["collaboration_id"] == str(v6_plain.id)
    assert shown["runs_in_flight"] == "0"
