"""The demo: one vantage6 server, two fednode nodes, one federated average, two traces.

Runs everything on this machine and stops it all at the end:
1. starts the real vantage6-server 4.15.2 (its own venv) on loopback with a fresh database;
2. as the researcher (the real vantage6 ``UserClient``), creates organizations A and B, a
   collaboration and a node for each;
3. starts two fednode nodes in this process, each with its own CSV, running containers on
   podman;
4. sends ``partial_average`` to both organizations, combines the partial sums into the
   mean, and prints each node's trace of its run.

The peers are the same ones the tests use (``tests/peers``).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from opentelemetry.sdk.trace import ReadableSpan  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

from node.app import Node  # noqa: E402
from node.logging import configure_logging  # noqa: E402
from node.settings import load_settings  # noqa: E402
from tests.peers import podman as podman_peer  # noqa: E402
from tests.peers import v6server as v6_peer  # noqa: E402
from tests.peers.v6client import V6UserClient  # noqa: E402

AVERAGE_IMAGE = podman_peer.AVERAGE_IMAGE
DATA = REPO / "algorithms" / "data"


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def print_trace(name: str, spans: list[ReadableSpan]) -> None:
    by_parent: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        by_parent.setdefault(span.parent.span_id if span.parent else None, []).append(span)

    def show(span: ReadableSpan, depth: int) -> None:
        took = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        attrs = span.attributes or {}
        extra = ""
        if span.name == "run":
            extra = f"  run={attrs.get('fednode.run_id')} status={attrs.get('fednode.status')}"
        print(f"    {'  ' * depth}{span.name:<10} {took:8.1f} ms{extra}")
        for child in sorted(
            by_parent.get(span.context.span_id, []), key=lambda s: s.start_time or 0
        ):
            show(child, depth + 1)

    print(f"  {name}: trace {spans[0].context.trace_id:032x}" if spans else f"  {name}: no spans")
    for root in by_parent.get(None, []):
        show(root, 0)


async def demo(workdir: Path) -> int:
    step("starting the vantage6 server 4.15.2 (sqlite, loopback)")
    server = v6_peer.V6Server(workdir=workdir / "server", port=free_port())
    server.workdir.mkdir()
    server.write_config()
    server.start()
    print(f"  {server.api_url} (started in {server.last_start_seconds:.1f} s)")
    podman = None
    user = V6UserClient(
        python=v6_peer._venv_python(),
        script=v6_peer.USERCLIENT,
        log_path=workdir / "userclient.log",
    )
    nodes: list[tuple[Node, asyncio.Event, asyncio.Task[None], InMemorySpanExporter]] = []
    try:
        step("setting up organizations A and B, a collaboration and two nodes")
        user.login(
            url=f"http://{server.host}",
            port=server.port,
            api_path=server.api_path,
            username=server.root_username,
            password=server.root_password,
        )
        collab = v6_peer._make_collaboration(
            user, server, prefix="demo", encrypted=False, keydir=None
        )
        step("starting the podman API service")
        podman = podman_peer._start_service(workdir / "podman.sock")

        step("starting two fednode nodes")
        for org, csv in ((collab.org_a, "employees_a.csv"), (collab.org_b, "employees_b.csv")):
            exporter = InMemorySpanExporter()
            settings = load_settings(
                None,
                name=f"fednode-{org.name}",
                server_url=f"http://{server.host}",
                port=server.port,
                api_path=server.api_path,
                api_key=org.api_key,
                task_dir=workdir / f"tasks-{org.name}",
                databases=[{"label": "default", "type": "csv", "uri": str(DATA / csv)}],
                executor={"kind": "podman", "socket": f"unix://{workdir / 'podman.sock'}"},
                health={"port": free_port()},
                proxy={"port": free_port()},
            )
            node = Node(settings, span_processors=(SimpleSpanProcessor(exporter),))
            stop = asyncio.Event()
            nodes.append((node, stop, asyncio.create_task(node.run(stop)), exporter))
            await asyncio.wait_for(node.ready.wait(), 60)
            assert node.state.socket is not None
            await asyncio.wait_for(node.state.socket.connected.wait(), 60)
            print(f"  {settings.name}: organization {org.id}, data {csv}")

        step("sending partial_average(age) to both organizations")
        began = time.monotonic()
        task: dict[str, Any] = await asyncio.to_thread(
            collab.create_task,
            input_={"method": "partial_average", "kwargs": {"column_name": "age"}},
            image=AVERAGE_IMAGE,
        )
        await asyncio.to_thread(user.wait_for_results, task["id"], timeout=120)
        partials = await asyncio.to_thread(user.result_values, task["id"])
        took = time.monotonic() - began
        for partial in partials:
            print(f"  partial: {partial}")
        mean = sum(p["sum"] for p in partials) / sum(p["count"] for p in partials)
        print(f"  combined mean age: {mean:.3f}  (task {task['id']}, {took:.1f} s)")

        step("each run's trace")
        for node, *_, exporter in nodes:
            print_trace(node.settings.name, list(exporter.get_finished_spans()))
        return 0
    finally:
        step("stopping everything")
        for _, stop, _, _ in nodes:
            stop.set()
        for _, _, task_, _ in nodes:
            await asyncio.wait_for(task_, 30)
        user.close()
        if podman is not None:
            podman_peer._stop_service(podman)
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the nodes' logs")
    args = parser.parse_args()
    configure_logging(level="INFO" if args.verbose else "WARNING", fmt="console")
    with tempfile.TemporaryDirectory(prefix="fednode-demo-") as tmp:
        return asyncio.run(demo(Path(tmp)))


if __name__ == "__main__":
    raise SystemExit(main())
