"""End-to-end fixtures: real fednode nodes, in this process, against the real peers.

``start_node`` starts a :class:`node.app.Node` for one organization of a collaboration on
the real vantage6 server, running its containers on real podman, and stops it at the end
of the test. Each node records its spans in an in-memory exporter (``node.spans``).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import random
import socket
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from node.app import Node
from node.settings import load_settings
from tests.peers.podman import PodmanService
from tests.peers.v6server import V6Collaboration, V6Org, V6Server

ROOT = Path(__file__).resolve().parents[2]
SESSION = uuid.uuid4().hex[:6]
DATA = ROOT / "algorithms" / "data"


@dataclass
class RunningNode:
    node: Node
    org: V6Org
    exporter: InMemorySpanExporter
    stop: asyncio.Event
    task: asyncio.Task[None]
    settings_overrides: dict[str, Any] = field(default_factory=dict)
    settings_values: dict[str, Any] = field(default_factory=dict)  # all, as given to the node

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 60)


StartNode = Callable[..., Awaitable[RunningNode]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def node_settings(
    *,
    org: V6Org,
    server: V6Server,
    podman: PodmanService,
    task_dir: Path,
    csv: Path,
    **overrides: Any,
) -> dict[str, Any]:
    values: dict[str, Any] = {
        # Run ids restart with every test session's fresh server database: a per-session
        # name keeps one session's containers apart from another's leftovers.
        "name": f"fednode-{org.name}-{SESSION}",
        "server_url": f"http://{server.host}",
        "port": server.port,
        "api_path": server.api_path,
        "api_key": org.api_key,
        "task_dir": task_dir,
        "databases": [{"label": "default", "type": "csv", "uri": str(csv)}],
        "executor": {"kind": "podman", "socket": podman.url},
        "max_concurrent_runs": 16,
        "health": {"port": free_port()},
        "proxy": {"port": free_port()},
    }
    if org.private_key is not None:
        values["encryption"] = {"enabled": True, "private_key": org.private_key}
    values.update(overrides)
    if "executors" in overrides:
        del values["executor"]  # several executors instead of the one
    return values


@pytest.fixture
async def start_node(
    v6_server: V6Server, podman_service: PodmanService, tmp_path: Path
) -> AsyncIterator[StartNode]:
    started: list[RunningNode] = []

    async def start(
        collaboration: V6Collaboration,
        org: V6Org,
        *,
        csv: Path | None = None,
        connected: bool = True,
        from_file: bool = False,
        **overrides: Any,
    ) -> RunningNode:
        """Start a node; unless ``connected=False``, wait until it is connected.

        ``from_file``: the settings are written to a ``node.yaml`` and read from it, as
        ``fednode start -c`` does (vantage6 4 keys among ``overrides`` are carried over).
        """
        csv = csv or DATA / ("employees_a.csv" if org is collaboration.org_a else "employees_b.csv")
        values = node_settings(
            org=org,
            server=v6_server,
            podman=podman_service,
            task_dir=tmp_path / f"tasks-{org.name}",
            csv=csv,
            **overrides,
        )
        exporter = InMemorySpanExporter()
        if from_file:
            path = tmp_path / f"node-{org.name}.yaml"
            path.write_text(yaml.safe_dump(json.loads(json.dumps(values, default=str))))
            settings = load_settings(path)
        else:
            settings = load_settings(None, **values)
        node = Node(
            settings,
            span_processors=(SimpleSpanProcessor(exporter),),
            shutdown_grace=5.0,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(node.run(stop), name=f"node-{org.name}")
        running = RunningNode(node, org, exporter, stop, task, overrides, values)
        started.append(running)
        if connected:
            await wait_until_connected(running)
        return running

    yield start
    for running in started:
        if not running.task.done():
            with contextlib.suppress(Exception):
                await running.shutdown()


def status_of(node: RunningNode) -> dict[str, Any]:
    """The node's ``/status`` (what ``fednode status`` prints), from its health port."""
    port = node.settings_values["health"]["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as answer:
        body: dict[str, Any] = json.load(answer)
    return body


async def wait_until_connected(running: RunningNode, timeout: float = 30.0) -> None:
    """The node is authenticated, reconciled and its socket has synced."""

    async def ready() -> None:
        await running.node.ready.wait()
        socket = running.node.state.socket
        assert socket is not None
        await socket.connected.wait()

    waiter = asyncio.create_task(ready())
    done, _ = await asyncio.wait(
        {waiter, running.task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
    )
    if running.task in done:
        waiter.cancel()
        running.task.result()  # raises the node's start-up error
        pytest.fail("the node stopped during start-up")
    if waiter not in done:
        waiter.cancel()
        pytest.fail(f"node {running.org.name} did not connect within {timeout} s")


@pytest.fixture(scope="session")
def behaviour_image(podman_service: PodmanService) -> str:
    """The conformance suite's probe algorithm: does what its JSON input says."""
    from tests.conformance.podman_harness import build_behaviour_image

    return build_behaviour_image(podman_service)


def assert_carried_streams(node: RunningNode, *, closed_at_least: int) -> None:
    """The node's ``peer-stream`` spans: at least that many closed after carrying bytes,
    and any other ended only because the peer run was not listening yet: refused after
    the wait, or abandoned by a sender that gave up meanwhile (it tries again; pods start
    slower than containers, and load slows both)."""
    spans = [s for s in node.spans if s.name == "peer-stream"]
    closed = [s for s in spans if (s.attributes or {})["fednode.peer.outcome"] == "closed"]
    assert len(closed) >= closed_at_least, f"{node.org.name}: {[s.attributes for s in spans]}"
    waits = [s.status.description or "" for s in spans if s not in closed]
    late = ("does not answer on its port", "closed before the peer run accepted it")
    assert all(any(why in text for why in late) for text in waits), waits


async def start_peered_nodes(
    start_node: StartNode, collab: V6Collaboration, orgs: Sequence[V6Org], relay_url: str
) -> list[RunningNode]:
    """One podman node per organization, each with 8 forwarder ports of its own."""
    base = random.randrange(40000, 50000, 100)
    return [
        await start_node(
            collab, org, peering={"relay_url": relay_url, "first_port": base + 10 * i, "ports": 8}
        )
        for i, org in enumerate(orgs)
    ]


def salaries(name: str) -> int:
    with (DATA / name).open() as handle:
        return sum(int(row["salary"]) for row in csv.DictReader(handle))


async def central_sum(collab: V6Collaboration, image: str, method: str) -> Any:
    """``method`` (central_secret_sum or central_mpc_sum) of ``salary`` over all the
    collaboration's organizations, started at A; its result, checked to be the exact
    total (A's data is employees_a.csv, every other organization's employees_b.csv)."""
    task = await asyncio.to_thread(
        collab.create_task,
        input_={
            "method": method,
            "kwargs": {
                "column_name": "salary",
                "organizations": [org.id for org in collab.all_orgs],
            },
        },
        image=image,
        organizations=[collab.org_a.id],
    )
    try:
        await asyncio.to_thread(collab.user.wait_for_results, task["id"], timeout=300)
        (result,) = await asyncio.to_thread(collab.user.result_values, task["id"])
    finally:  # say why, if the partial runs failed
        for run in await asyncio.to_thread(collab.user.runs, task["id"] + 1):
            if run["status"] != "completed":
                print(f"run {run['id']} {run['status']}:\n{run.get('log')}")
    others = len(collab.all_orgs) - 1
    expected = salaries("employees_a.csv") + others * salaries("employees_b.csv")
    assert result == {"sum": expected, "parties": len(collab.all_orgs)}
    return result
