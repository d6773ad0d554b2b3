"""The README's demo command works: the real server, two nodes, the central average."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers.podman import PodmanService

pytestmark = [pytest.mark.v6server, pytest.mark.podman, pytest.mark.slow]

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"


async def test_the_demo_prints_the_federated_mean_and_the_traces(
    podman_service: PodmanService,  # the images and the podman set-up the demo needs
) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(DEMO)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "mean age: 41.875" in done.stdout
    assert "proxy POST /task" in done.stdout  # the central run's subtask, through the proxy
    assert done.stdout.count("status=completed") == 3  # central + two partials
    # Quiet where nothing is wrong: no warnings (facts about the host are info, said once).
    output = done.stdout + done.stderr
    assert "warning" not in output.lower(), output[-3000:]
