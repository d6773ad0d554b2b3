"""The CI-sized Kubernetes chaos campaign: 15 tasks while the Helm-deployed node's pod is
force-deleted 5 times.

Same harness as ``scripts/chaos --kubernetes`` (:mod:`tests.chaos.kubernetes`), smaller
numbers: the chart installed by a real helm, the node pod and the runs' pods on the real
kubelet worker, the real vantage6 4.15.2 server; no server restart (the podman campaign
covers that). The seed is random unless ``FEDNODE_CHAOS_SEED`` fixes it; it is printed
(and in the failure message) either way.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.chaos.campaign import CampaignConfig
from tests.chaos.kubernetes import run_kubernetes_campaign
from tests.peers.kubernetes import K8sRealWorker, K8sTestbed

pytestmark = [
    pytest.mark.kubernetes,
    pytest.mark.helm,
    pytest.mark.v6server,
    pytest.mark.podman,
    pytest.mark.slow,
]


async def test_node_pod_force_deleted_5_times_under_15_tasks_loses_none_runs_none_twice(
    tmp_path: Path, k8s_testbed: K8sTestbed, k8s_real_worker: K8sRealWorker
) -> None:
    seed = int(os.environ.get("FEDNODE_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    config = CampaignConfig(
        workdir=tmp_path,
        seed=seed,
        tasks=15,
        node_kills=5,
        server_restarts=0,
        podman_restarts=0,
        settle_seconds=240,
    )

    verdict = await run_kubernetes_campaign(
        config, testbed=k8s_testbed, worker=k8s_real_worker, say=print
    )

    print(verdict.table())
    assert verdict.faults.node_pod_deletions >= 5
    assert verdict.ok, f"seed {seed} (FEDNODE_CHAOS_SEED={seed} replays it):\n{verdict.table()}"
