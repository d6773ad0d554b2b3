"""A whole local federation in one call: the vantage6 server, podman, and fednode nodes.

The demo (``scripts/demo.py``) and the node benchmark (``benchmarks/node_latency.py``) need
the same thing the end-to-end tests build from fixtures: a real vantage6 4.15.2 server with
organizations A and B in a collaboration, the podman API service, and one fednode node per
organization running in this process with an in-memory span exporter. Outside pytest,
:func:`local_federation` builds it and takes it all down again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from executors.base import Executor
from node.app import Node
from node.settings import NodeSettings, load_settings
from tests.peers import podman as podman_peer
from tests.peers import v6server as v6_peer
from tests.peers.v6client import V6UserClient
from tests.peers.v6server import V6Collaboration, V6Org

DATA = Path(__file__).resolve().parents[2] / "algorithms" / "data"
CSV_OF = {"a": DATA / "employees_a.csv", "b": DATA / "employees_b.csv"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class LocalNode:
    org: V6Org | None
    node: Node
    exporter: InMemorySpanExporter
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


@contextlib.asynccontextmanager
async def running_node(
    settings: NodeSettings, *, org: V6Org | None = None, executor: Executor | None = None
) -> AsyncIterator[LocalNode]:
    """A node served in this event loop, ready and connected to the server's socket;
    its spans in memory; stopped (within 60 s) on exit."""
    exporter = InMemorySpanExporter()
    node = Node(settings, executor=executor, span_processors=(SimpleSpanProcessor(exporter),))
    stop = asyncio.Event()
    local = LocalNode(org, node, exporter, stop, asyncio.create_task(node.run(stop)))
    try:
        await asyncio.wait_for(node.ready.wait(), 60)
        assert node.state.socket is not None
        await asyncio.wait_for(node.state.socket.connected.wait(), 60)
        yield local
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(local.task, 60)


@dataclass
class LocalFederation:
    server: v6_peer.V6Server
    user: V6UserClient
    collaboration: V6Collaboration
    nodes: list[LocalNode]
    podman_socket: Path


@dataclass
class ServerWithUsers:
    server: v6_peer.V6Server
    user: V6UserClient
    collaboration: V6Collaboration


@contextlib.contextmanager
def server_with_collaboration(
    workdir: Path, *, prefix: str = "local", encrypted: bool = False, host: str = "127.0.0.1"
) -> Iterator[ServerWithUsers]:
    """A fresh vantage6 server listening on ``host``, its root user logged in, and a
    collaboration of organizations A and B (with key pairs under ``workdir/keys`` when
    ``encrypted``)."""
    server = v6_peer.V6Server(workdir=workdir / "server", port=free_port(), host=host)
    server.workdir.mkdir(parents=True)
    server.write_config()
    server.start()
    user = V6UserClient(
        python=v6_peer._venv_python(),
        script=v6_peer.USERCLIENT,
        log_path=workdir / "userclient.log",
    )
    try:
        user.login(
            url=f"http://{server.host}",
            port=server.port,
            api_path=server.api_path,
            username=server.root_username,
            password=server.root_password,
        )
        keydir = workdir / "keys" if encrypted else None
        if keydir is not None:
            keydir.mkdir()
        collab = v6_peer._make_collaboration(
            user, server, prefix=prefix, encrypted=encrypted, keydir=keydir
        )
        yield ServerWithUsers(server, user, collab)
    finally:
        user.close()
        server.stop()


@contextlib.asynccontextmanager
async def local_federation(
    workdir: Path, *, encrypted: bool = False, **node_settings: Any
) -> AsyncIterator[LocalFederation]:
    """Server, podman service and two connected nodes; everything stopped on exit."""
    podman_socket = workdir / "podman.sock"
    podman = None
    nodes: list[LocalNode] = []
    stack = contextlib.AsyncExitStack()
    with server_with_collaboration(workdir, encrypted=encrypted) as peers:
        server, user, collab = peers.server, peers.user, peers.collaboration
        try:
            podman = podman_peer._start_service(podman_socket)
            for who, org in (("a", collab.org_a), ("b", collab.org_b)):
                values: dict[str, Any] = {
                    # Unique per federation: a fresh server database reuses run ids.
                    "name": f"fednode-{org.name}-{uuid.uuid4().hex[:6]}",
                    "server_url": f"http://{server.host}",
                    "port": server.port,
                    "api_path": server.api_path,
                    "api_key": org.api_key,
                    "task_dir": workdir / f"tasks-{who}",
                    "databases": [{"label": "default", "type": "csv", "uri": str(CSV_OF[who])}],
                    "executor": {"kind": "podman", "socket": f"unix://{podman_socket}"},
                    "health": {"port": free_port()},
                    "proxy": {"port": free_port()},
                    **node_settings,
                }
                if org.private_key is not None:
                    values["encryption"] = {"enabled": True, "private_key": org.private_key}
                settings = load_settings(None, **values)
                nodes.append(await stack.enter_async_context(running_node(settings, org=org)))
            yield LocalFederation(server, user, collab, nodes, podman_socket)
        finally:
            for local in nodes:
                local.stop.set()  # both stop at once; the stack then waits for each
            await stack.aclose()
            if podman is not None:
                podman_peer._stop_service(podman)
