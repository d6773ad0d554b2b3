"""The operator's CLI against a running node: real vantage6 4.15.2 server, real podman.

``fednode runs``, ``logs`` and ``kill`` run as real processes (``python -m node``) and
reach the node only through its admin socket, as an operator's shell would.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import StartNode
from tests.e2e.test_node_lifecycle import create, wait_for_run
from tests.peers.v6server import V6Collaboration

pytestmark = [pytest.mark.v6server, pytest.mark.podman, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


async def fednode(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "node", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=60,
    )


async def test_an_operator_lists_reads_and_kills_a_run_through_the_admin_socket(
    v6_plain: V6Collaboration, start_node: StartNode, behaviour_image: str, tmp_path: Path
) -> None:
    node = await start_node(v6_plain, v6_plain.org_a)
    # What the CLI needs of the node's configuration: where its task directory is.
    config = tmp_path / "node.yaml"
    task_dir = node.settings_values["task_dir"]
    config.write_text(f"server_url: http://server\napi_key: k\ntask_dir: {task_dir}\n")
    task = await create(v6_plain, behaviour_image, sleep=120, log="behave: counting sheep")
    run = await wait_for_run(v6_plain, task["id"], status="active")

    listed = await fednode(config, "runs")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while "counting sheep" not in (shown := await fednode(config, "logs", str(run["id"]))).stdout:
        assert loop.time() < deadline, shown
        await asyncio.sleep(0.5)
    killed = await fednode(config, "kill", str(run["id"]))
    ended = await wait_for_run(v6_plain, task["id"])
    after = await fednode(config, "runs")
    unknown = await fednode(config, "kill", "999999")

    assert listed.returncode == 0, listed.stderr
    (line,) = [x.split() for x in listed.stdout.splitlines()[1:] if x.split()[0] == str(run["id"])]
    assert line[1:3] == [str(task["id"]), "running"]
    assert line[4] == behaviour_image
    assert killed.returncode == 0, killed.stderr
    assert ended["status"] == "killed by user"
    (line_text,) = [x for x in after.stdout.splitlines()[1:] if x.split()[0] == str(run["id"])]
    assert "killed by user" in line_text  # the status the server got
    assert unknown.returncode == 1
    assert "not in flight" in unknown.stderr
