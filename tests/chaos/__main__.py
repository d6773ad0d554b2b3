"""``python -m tests.chaos``: run one chaos campaign, print the table, exit 1 on any fault.

The defaults are the full campaign (300 tasks, 100 node kills, 5 server and 5 podman
service restarts); ``--help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
from pathlib import Path

from tests.chaos.campaign import CampaignConfig, run_campaign


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--kills", type=int, default=100, help="node SIGKILLs")
    parser.add_argument("--server-restarts", type=int, default=5)
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
    config = CampaignConfig(
        workdir=workdir,
        seed=seed,
        tasks=args.tasks,
        node_kills=args.kills,
        server_restarts=args.server_restarts,
        podman_restarts=args.podman_restarts,
        settle_seconds=args.settle,
        kill_after=(args.kill_after[0], args.kill_after[1]),
        max_concurrent_runs=args.max_concurrent_runs,
    )
    verdict = asyncio.run(run_campaign(config, say=lambda line: print(line, flush=True)))
    print(verdict.table(), flush=True)
    print(f"chaos: seed {seed}: {'PASS' if verdict.ok else 'FAIL'}", flush=True)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
