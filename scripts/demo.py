"""The demo: one vantage6 server, two fednode nodes, one federated average, two traces.

Runs everything on this machine and stops it all at the end:
1. starts the real vantage6-server 4.15.2 (its own venv) on loopback with a fresh database;
2. as the researcher (the real vantage6 ``UserClient``), creates organizations A and B, a
   collaboration and a node for each;
3. starts two fednode nodes in this process, each with its own CSV, running containers on
   podman;
4. sends ``central_average`` to organization A: its container, on A's node, creates
   ``partial_average`` subtasks for A and B through A's proxy (the only door it has),
   waits for their results through it and returns the mean; the demo prints the result
   and each node's traces (the central run's proxied calls are spans in its trace).

The peers are the same ones the tests use (``tests/peers``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from opentelemetry.sdk.trace import ReadableSpan  # noqa: E402

from node.logging import configure_logging  # noqa: E402
from tests.peers import podman as podman_peer  # noqa: E402
from tests.peers.stack import local_federation  # noqa: E402

AVERAGE_IMAGE = podman_peer.AVERAGE_IMAGE


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def print_trace(name: str, spans: list[ReadableSpan]) -> None:
    by_parent: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        by_parent.setdefault(span.parent.span_id if span.parent else None, []).append(span)

    def show(span: ReadableSpan, depth: int) -> None:
        took = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        attrs = span.attributes or {}
        extra = ""
        if span.name == "run":
            extra = (
                f"  run={attrs.get('fednode.run_id')} task={attrs.get('fednode.task_id')} "
                f"status={attrs.get('fednode.status')}"
            )
        print(f"    {'  ' * depth}{span.name:<30} {took:8.1f} ms{extra}")
        for child in sorted(
            by_parent.get(span.context.span_id, []), key=lambda s: s.start_time or 0
        ):
            show(child, depth + 1)

    if not spans:
        print(f"  {name}: no spans")
    for root in sorted(by_parent.get(None, []), key=lambda s: s.start_time or 0):
        print(f"  {name}: trace {root.context.trace_id:032x}")
        show(root, 0)


async def demo(workdir: Path) -> int:
    step("starting the vantage6 server 4.15.2, podman, and two fednode nodes")
    began = time.monotonic()
    # Each node runs the demo's algorithm and nothing else: a node that ran any image would
    # rightly warn so at start, and the demo's output should hold only what goes wrong.
    allowed = {"allowed_algorithms": [re.escape(AVERAGE_IMAGE)]}
    async with local_federation(workdir, policies=allowed) as fed:
        print(f"  server {fed.server.api_url}; up in {time.monotonic() - began:.1f} s")
        for local in fed.nodes:
            print(f"  {local.node.settings.name}: organization {local.org and local.org.id}")

        step("sending central_average(age) to organization A")
        began = time.monotonic()
        orgs = [local.org.id for local in fed.nodes if local.org is not None]
        task: dict[str, Any] = await asyncio.to_thread(
            fed.collaboration.create_task,
            input_={
                "method": "central_average",
                "kwargs": {"column_name": "age", "organizations": orgs},
            },
            image=AVERAGE_IMAGE,
            organizations=orgs[:1],
        )
        await asyncio.to_thread(fed.user.wait_for_results, task["id"], timeout=180)
        (result,) = await asyncio.to_thread(fed.user.result_values, task["id"])
        took = time.monotonic() - began
        print(f"  the central run asked both organizations through A's proxy: {result}")
        print(f"  mean age: {result['average']:.3f}  (task {task['id']}, {took:.1f} s)")

        step("each run's trace")
        for local in fed.nodes:
            print_trace(local.node.settings.name, local.spans)
        step("stopping everything")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the nodes' logs")
    args = parser.parse_args()
    configure_logging(level="INFO" if args.verbose else "WARNING", fmt="console")
    with tempfile.TemporaryDirectory(prefix="fednode-demo-") as tmp:
        return asyncio.run(demo(Path(tmp)))


if __name__ == "__main__":
    raise SystemExit(main())
