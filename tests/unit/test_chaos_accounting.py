"""The chaos verdict tells a central run crashed by a proxy outage from a lost one."""

from __future__ import annotations

from collections import Counter
from typing import Any

from tests.chaos.accounting import Faults, NodeLog, judge
from tests.chaos.workload import PlannedTask

PODMAN_REFUSED = (
    "requests.exceptions.ConnectionError: HTTPConnectionPool(host='10.216.3.1', port=7654): "
    "Max retries exceeded with url: /blobstream/status (Caused by NewConnectionError("
    "'Failed to establish a new connection: [Errno 111] Connection refused'))"
)
#: Seen on the real worker while the node pod was gone (seed 2026 campaign, run 26).
K8S_TIMED_OUT = (
    "requests.exceptions.ConnectTimeout: HTTPConnectionPool(host='10.96.87.118', port=7654): "
    "Max retries exceeded with url: /blobstream/status (Caused by ConnectTimeoutError("
    "<HTTPConnection(host='10.96.87.118', port=7654)>, 'Connection to 10.96.87.118 timed "
    "out. (connect timeout=None)'))"
)


def verdict_for(log: str) -> Any:
    task = PlannedTask(0, "central", {}, "average", "completed", task_id=1)
    run = {"id": 1, "task": {"id": 1}, "status": "crashed", "finished_at": "now", "log": log}
    return judge(
        faults=Faults(runtime="kubernetes"),
        planned=[task],
        tasks=[{"id": 1, "parent": None}],
        runs=[run],
        creates={"Jobs": Counter({1: 1})},
        node_log=NodeLog(),
        objects_left=[],
        run_dirs_left=[],
    )


def test_a_connect_timeout_to_the_proxy_service_is_a_proxy_outage_not_a_lost_run() -> None:
    for log in (PODMAN_REFUSED, K8S_TIMED_OUT):
        verdict = verdict_for(log)
        assert (len(verdict.proxy_outage), verdict.lost) == (1, []), log
        assert verdict.ok


def test_a_central_run_crashed_otherwise_is_lost() -> None:
    verdict = verdict_for("KeyError: 'average'")
    assert len(verdict.lost) == 1 and not verdict.proxy_outage
    assert not verdict.ok
