"""A node started from a vantage6 4 ``node.yaml``: real vantage6 4.15.2 server, real podman.

The keys the 4.x node honours reach the runs as they did there: a database's ``env`` as
``<LABEL>_DB_PARAM_*`` (only in the runs that asked for that database), ``algorithm_env``
in every run, and ``share_algorithm_logs: false`` keeps the algorithm's output out of what
the server (and so the researcher) gets.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from node.lifecycle.finish import LOG_WITHHELD
from tests.e2e.conftest import DATA, StartNode
from tests.peers.v6server import V6Collaboration

pytestmark = [pytest.mark.v6server, pytest.mark.podman, pytest.mark.slow]

ASKED = ["DEFAULT_DB_PARAM_USER", "DEFAULT_DB_PARAM_PASSWORD", "STUDY", "HOST"]
SECRET_LINE = "behave: row 17 has age 43"


def v4_keys(csv: str) -> dict[str, Any]:
    """What a vantage6 4.15 node.yaml adds to the node's settings (shaped like its docs)."""
    return {
        "databases": [
            {
                "label": "default",
                "type": "csv",
                "uri": csv,
                "mount_mode": "ro",
                "env": {"user": "reader", "password": "pw-for-default"},
            }
        ],
        "algorithm_env": {"STUDY": "carried-over"},
        "share_algorithm_logs": False,
        "share_config": True,
        "logging": {
            "level": "INFO",
            "use_console": True,
            "backup_count": 5,
            "max_size": 1024,
            "format": "%(asctime)s - %(name)-14s - %(levelname)-8s - %(message)s",
            "datefmt": "%Y-%m-%d %H:%M:%S",
        },
        "whitelist": {"domains": ["github.com"], "ips": [], "ports": [443]},
        "vpn_subnet": "10.76.0.0/16",
    }


async def finished_runs(collab: V6Collaboration, task_id: int) -> list[dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + 120
    while True:
        runs = await asyncio.to_thread(collab.user.runs, task_id)
        if runs and all(run["finished_at"] for run in runs):
            return runs
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"runs of task {task_id} did not finish: {runs}")
        await asyncio.sleep(0.5)


async def test_a_v4_node_yaml_gives_runs_their_env_and_keeps_their_logs_home(
    v6_plain: V6Collaboration, start_node: StartNode, behaviour_image: str
) -> None:

    node = await start_node(
        v6_plain, v6_plain.org_a, from_file=True, **v4_keys(str(DATA / "employees_a.csv"))
    )
    notes = [key for note in node.node.settings.carried_over for key in note.keys]
    assert "vpn_subnet" in notes and "whitelist" in notes and "logging.use_console" in notes

    async def run(databases: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        task = await asyncio.to_thread(
            v6_plain.create_task,
            input_={"env": ASKED, "log": SECRET_LINE},
            image=behaviour_image,
            organizations=[v6_plain.org_a.id],
            databases=databases,
        )
        (record,) = await finished_runs(v6_plain, task["id"])
        assert record["status"] == "completed", record
        (seen,) = await asyncio.to_thread(v6_plain.user.result_values, task["id"])
        return seen, str(record["log"])

    seen, log = await run([{"label": "default"}])
    assert seen["DEFAULT_DB_PARAM_USER"] == "reader"
    assert seen["DEFAULT_DB_PARAM_PASSWORD"] == "pw-for-default"
    assert seen["STUDY"] == "carried-over"
    assert seen["HOST"].startswith("http://")  # the contract's own, untouched
    assert log == LOG_WITHHELD
    assert "row 17" not in log

    seen, _ = await run([])  # a run that did not ask for the database
    assert seen["DEFAULT_DB_PARAM_USER"] is None and seen["DEFAULT_DB_PARAM_PASSWORD"] is None
    assert seen["STUDY"] == "carried-over"
