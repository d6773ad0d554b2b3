"""The node's own share of a run's latency, against the real server and real podman.

For N runs (tasks sent to organization A one after another, each while the previous ones
are still in flight), from each run's trace:

* event → running: the server's ``new_task`` arriving at the node → the container started
  (the ``run`` span starts when the event arrives; the ``start`` span ends when podman has
  started the container);
* ended → PATCHed: the executor reporting the container's end → the result, log and
  status PATCHed to the server (``execute`` span end → ``upload`` span end).

No baseline here: absolute numbers only. (An earlier version compared with a random
sleep plus one GET labelled "1 s poll"; vantage6 4.x nodes do not poll for tasks. The real
vantage6-node 4.15.2 is measured beside fednode by ``benchmarks/v6node_compare.py``.)

    .venv/bin/python benchmarks/node_latency.py [--runs 50]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.stats import summary  # noqa: E402
from node.logging import configure_logging  # noqa: E402
from tests.conformance.podman_harness import build_behaviour_image  # noqa: E402
from tests.peers.podman import PodmanService  # noqa: E402
from tests.peers.stack import LocalFederation, local_federation  # noqa: E402


def node_latencies(fed: LocalFederation) -> tuple[list[float], list[float], list[float]]:
    spans = fed.nodes[0].spans
    by_parent: dict[int, dict[str, Any]] = {}
    roots = {s.context.span_id: s for s in spans if s.name == "run"}
    for span in spans:
        if span.parent is not None and span.parent.span_id in roots:
            by_parent.setdefault(span.parent.span_id, {})[span.name] = span
    started, uploaded, executor = [], [], []
    for root_id, root in roots.items():
        children = by_parent.get(root_id, {})
        if {"start", "execute", "upload"} <= children.keys():
            started.append((children["start"].end_time - root.start_time) / 1e6)
            uploaded.append((children["upload"].end_time - children["execute"].end_time) / 1e6)
            executor.append((children["start"].end_time - children["start"].start_time) / 1e6)
    return started, uploaded, executor


async def main(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="fednode-bench-") as tmp:
        workdir = Path(tmp)
        async with local_federation(workdir, max_concurrent_runs=16) as fed:
            image = build_behaviour_image(
                PodmanService(
                    socket_path=fed.podman_socket,
                    base_image="localhost/fednode/python-base:latest",
                    average_image="localhost/fednode/average:latest",
                    diagnostics_image="localhost/fednode/diagnostics:latest",
                    data_dir=REPO / "algorithms" / "data",
                )
            )
            # Node B takes no part: stop it, so that only node A's work is on the machine.
            fed.nodes[1].stop.set()
            await fed.nodes[1].task
            org_a = fed.collaboration.org_a.id
            print(f"sending {runs} tasks to organization A (behaviour image, 0.2 s each)...")
            tasks = []
            for i in range(runs):
                tasks.append(
                    await asyncio.to_thread(
                        fed.collaboration.create_task,
                        input_={"sleep": 0.2, "output": f'{{"i": {i}}}'},
                        image=image,
                        organizations=[org_a],
                        name=f"bench-{i}",
                    )
                )
            for task in tasks:
                await asyncio.to_thread(fed.user.wait_for_results, task["id"], timeout=300)
            started, uploaded, executor = node_latencies(fed)

    print("\nfednode node, real vantage6 4.15.2 server, real podman:")
    print(summary("server event -> container running", started))
    print(summary("  of which executor.start (podman)", executor))
    print(summary("container ended -> result PATCHed", uploaded))
    print(
        "  (the rest of event -> running is three server round trips: list the task's runs,\n"
        "   PATCH started_at and POST token/container (those two concurrently))"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--verbose", action="store_true", help="node logs as JSON lines")
    args = parser.parse_args()
    configure_logging(level="INFO" if "--verbose" in sys.argv else "WARNING", fmt="json")
    asyncio.run(main(args.runs))
