"""The CI-sized chaos campaign: 60 tasks while the node process is SIGKILLed 20 times.

Same harness as the full campaign (``scripts/chaos``), smaller numbers: the node is a real
``fednode start`` process on the real vantage6 server and podman; one server restart and
one podman service restart are among the faults. The seed is random unless
``FEDNODE_CHAOS_SEED`` fixes it; it is printed (and in the failure message) either way.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.chaos.campaign import CampaignConfig, run_campaign

pytestmark = [pytest.mark.v6server, pytest.mark.podman, pytest.mark.slow]


async def test_node_killed_20_times_under_60_tasks_loses_none_runs_none_twice(
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("FEDNODE_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    config = CampaignConfig(
        workdir=tmp_path,
        seed=seed,
        tasks=60,
        node_kills=20,
        server_restarts=1,
        podman_restarts=1,
        settle_seconds=480,
    )

    verdict = await run_campaign(config)

    print(verdict.table())
    assert verdict.faults.node_kills >= 20  # and on until the last task was created
    assert verdict.ok, f"seed {seed} (FEDNODE_CHAOS_SEED={seed} replays it):\n{verdict.table()}"
