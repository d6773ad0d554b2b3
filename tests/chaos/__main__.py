"""``python -m tests.chaos``: run one chaos campaign, print the table, exit 1 on any fault.

The defaults are the full campaign (300 tasks, 100 node kills, 5 server and 5 podman
service restarts); ``--kubernetes`` runs it on the real worker instead, with the node
deployed by the Helm chart and its pod force-deleted (defaults there: 60 tasks, 20
deletions, 1 server restart). ``--help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from tests.chaos.accounting import Verdict
from tests.chaos.campaign import CampaignConfig, run_campaign


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__)
    parser.add_argument(
        "--kubernetes",
        action="store_true",
        help="the node deployed by the Helm chart on the testbed's real worker; its pod "
        "is force-deleted (grace period 0) instead of SIGKILLed",
    )
    parser.add_argument("--tasks", type=int, default=None, help="300; Kubernetes: 60")
    parser.add_argument(
        "--kills",
        type=int,
        default=None,
        help="node SIGKILLs (100), or node pod force-deletions with --kubernetes (20)",
    )
    parser.add_argument("--server-restarts", type=int, default=None, help="5; Kubernetes: 1")
    parser.add_argument("--podman-restarts", type=int, default=5)
    parser.add_argument(
        "--kill-after",
        type=float,
        nargs=2,
        default=(1.0, 6.0),
        metavar=("MIN", "MAX"),
        help="seconds from the node's readiness to its SIGKILL, drawn uniformly",
    )
    parser.add_argument("--seed", type=int, default=None, help="fault and task schedule")
    parser.add_argument("--settle", type=float, default=600.0, help="seconds to end all runs")
    parser.add_argument("--max-concurrent-runs", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None, help="kept; default: a temp dir")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fednode-chaos-"))
    print(f"chaos: workdir {workdir} (node log: {workdir / 'node.log'})", flush=True)
    k8s = args.kubernetes
    config = CampaignConfig(
        workdir=workdir,
        seed=seed,
        tasks=args.tasks if args.tasks is not None else (60 if k8s else 300),
        node_kills=args.kills if args.kills is not None else (20 if k8s else 100),
        server_restarts=(
            args.server_restarts if args.server_restarts is not None else (1 if k8s else 5)
        ),
        podman_restarts=0 if k8s else args.podman_restarts,
        settle_seconds=args.settle,
        kill_after=(args.kill_after[0], args.kill_after[1]),
        max_concurrent_runs=args.max_concurrent_runs,
    )
    say = lambda line: print(line, flush=True)  # noqa: E731
    verdict = asyncio.run(_kubernetes(config, say) if k8s else run_campaign(config, say=say))
    print(verdict.table(), flush=True)
    print(f"chaos: seed {seed}: {'PASS' if verdict.ok else 'FAIL'}", flush=True)
    return 0 if verdict.ok else 1


async def _kubernetes(config: CampaignConfig, say: Callable[[str], None]) -> Verdict:
    """The testbed with its real worker (started if it is not up), as the tests use it."""
    from tests.chaos.kubernetes import run_kubernetes_campaign
    from tests.peers.kubernetes import DEFAULT_KUBECONFIG, K8sRealWorker, K8sTestbed, _testbed

    result = await asyncio.to_thread(_testbed, "up", "--real-worker", timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"scripts/k8s-testbed up --real-worker failed:\n{result.stderr[-3000:]}")
    testbed = K8sTestbed(kubeconfig=DEFAULT_KUBECONFIG, workdir=config.workdir)
    worker = K8sRealWorker(testbed=testbed)
    return await run_kubernetes_campaign(config, testbed=testbed, worker=worker, say=say)


if __name__ == "__main__":
    sys.exit(main())
