"""Peering between apptainer runs on one node, with the FAKE apptainer binary.

The fake (``tests/fakes/apptainer_fake.py``) isolates nothing itself, but everything that
carries a peer connection is real: each run's supervisor makes the run's network
namespace, listens there on the proxy's and the forwarders' ports and on the run's
host-side address for its declared ports; the node side is a real :class:`NodePeering`
(its forwarder, its source-address check, its admission) over a server whose answers are
fakes, named so. Run A connects to a forwarder on the proxy's address inside its own
namespace; the node admits the stream and connects to run B's host-side address and
declared port; B's supervisor relays it to B's listener inside B's namespace.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from opentelemetry import trace

from executors.apptainer.command import RUN_ADDRESSES
from executors.apptainer.executor import ApptainerExecutor
from executors.base import PeeringUnavailable
from executors.ports import DeclaredPort, ImagePorts
from executors.spec import Phase, ProxyEndpoint, RunSpec
from node.peers import NodePeering
from node.proxy_link import OrganizationKeys
from node.server.models import NodeIdentity
from node.server.rest import ServerClient
from node.settings import PeeringSettings
from proxy.protocols import RunInfo
from tests.conformance.apptainer_harness import ApptainerHarness
from tests.conformance.harness import EventRecorder

pytestmark = [pytest.mark.slow]

PEER_IMAGE = "localhost/fednode/peer:fake"
PEER_PORT = 9931
NODE_ID, ORGANIZATION, JOB = 5, 1, 77


class FakeServer:
    """The vantage6 server's answers NodePeering asks for (a FAKE: runs 1 and 2 of one
    job, both at this node); records the ports registered."""

    def __init__(self) -> None:
        self.registered: list[dict[str, Any]] = []
        self.access_token = "fake-token"

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
    ) -> Any:
        kind, _, number = path.partition("/")
        if method == "POST" and kind == "port":
            self.registered.append(dict(json_body))
            return {}
        if method == "DELETE":
            return {}
        if kind == "task":
            return {"id": int(number), "job_id": JOB, "image": PEER_IMAGE}
        if kind == "run":
            run_id = int(number)
            return {"id": run_id, "node": {"id": NODE_ID}, "task": {"id": 1000 + run_id}}
        raise AssertionError(f"the fake server has no {method} {path}")

    async def list_pages(self, path: str, *, params: Mapping[str, Any]) -> list[Any]:
        run_id = int(params["task_id"]) - 1000
        return [{"id": run_id, "organization": {"id": ORGANIZATION}, "node": {"id": NODE_ID}}]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def proxy() -> AsyncIterator[int]:
    """Stands in for the node's proxy (the runs do not call it; their relay needs one)."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.fixture
async def node(
    tmp_path: Path, proxy: int
) -> AsyncIterator[tuple[ApptainerExecutor, EventRecorder, ApptainerHarness, NodePeering]]:
    settings = PeeringSettings(
        relay_url="ws://127.0.0.1:9/v1/connect", first_port=free_port(), ports=1
    )
    harness = ApptainerHarness(
        node_name=f"apptainer-peers-{uuid.uuid4().hex[:8]}",
        task_dir=tmp_path / "tasks",
        work=tmp_path / "fake-apptainer",
        proxy_network="relay",
        peer_ports=settings.forwarder_ports,
        peer_image_ports=[
            ImagePorts(r"localhost/fednode/peer(:.*)?", (DeclaredPort(PEER_PORT, "shares"),))
        ],
    )
    harness.registry[f"docker://{PEER_IMAGE}"] = {"program": "peer"}
    harness.write_registry()
    executor = await harness.open_executor()
    events = EventRecorder(executor)
    server = cast(ServerClient, FakeServer())
    peering = NodePeering(
        settings=settings,
        server=server,
        identity=NodeIdentity(
            id=NODE_ID, organization_id=ORGANIZATION, collaboration_id=1, encrypted=True
        ),
        private_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        keys=OrganizationKeys(server),
        executor=executor,
        bind_host="127.0.0.1",
        advertise_host="127.0.0.1",
        tracer=trace.get_tracer("test"),
    )
    yield executor, events, harness, peering
    await peering.close()
    await events.aclose()
    await executor.close()
    await harness.aclose()


def peer_spec(harness: ApptainerHarness, run_id: int, proxy: int, **behaviour: Any) -> RunSpec:
    return harness._spec(
        run_id,
        PEER_IMAGE,
        json.dumps(behaviour).encode(),
        proxy=ProxyEndpoint(host="127.0.0.1", port=proxy, peer_ports=harness.peer_ports),
    )


async def as_nobody(host: str, port: int) -> str:
    """Another local user connects to a run's host-side port: what does it read?"""
    probe = (
        "import socket,sys\n"
        "c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
        "c.sendall(b'from nobody'); c.shutdown(socket.SHUT_WR)\n"
        "print(repr(c.recv(100)))\n"
    )
    process = await asyncio.create_subprocess_exec(
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
        sys.executable, "-I", "-c", probe, host, str(port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), timeout=15)
    return out.decode().strip()


async def test_a_run_reaches_another_runs_declared_port_through_the_nodes_forwarder(
    node: tuple[ApptainerExecutor, EventRecorder, ApptainerHarness, NodePeering], proxy: int
) -> None:
    executor, events, harness, peering = node
    [forwarder] = peering.peer_ports
    await executor.start(peer_spec(harness, 2, proxy, listen=PEER_PORT, seconds=30))
    await executor.start(peer_spec(harness, 1, proxy, connect=forwarder, send="share of A"))
    for run_id in (2, 1):
        await events.wait_for(run_id, Phase.RUNNING, timeout=harness.slack)
        peering.run_admitted(RunInfo(run_id, 1000 + run_id, ORGANIZATION, 1))
    addresses = [await executor.run_address(run_id) for run_id in (1, 2)]
    assert None not in addresses
    b_address = str(addresses[1])
    # Before any forwarder is opened: another host user tries run B's port directly.
    nobody_read = await as_nobody(b_address, PEER_PORT) if os.geteuid() == 0 else "b''"

    [entry] = await peering.rewrite(
        1, [{"ip": "100.64.0.5", "port": PEER_PORT, "task_id": 1002, "organization_id": 1}]
    )
    # A process on the host, not run A, at run A's forwarder: the source check refuses it.
    reader, writer = await asyncio.open_connection("127.0.0.1", forwarder)
    writer.write(b"not run A")
    writer.write_eof()
    try:
        spoofed = await asyncio.wait_for(reader.read(), timeout=10)
    except ConnectionResetError:  # closed with our bytes unread
        spoofed = b""
    writer.close()
    ends = [await events.terminal(run_id, timeout=30) for run_id in (1, 2)]
    a, b = [json.loads((await executor.collect(r)).output) for r in (1, 2)]

    assert [end.phase for end in ends] == [Phase.SUCCEEDED, Phase.SUCCEEDED], (a, b)
    assert entry["ip"] == "127.0.0.1" and entry["port"] == forwarder
    assert a["answer"] == "B got: share of A"
    assert b["received"] == "share of A"
    assert spoofed == b""
    assert nobody_read == "b''"
    assert len(set(addresses)) == 2
    assert all(ipaddress.ip_address(str(address)) in RUN_ADDRESSES for address in addresses)
    assert await executor.declared_ports(2, PEER_IMAGE) == [DeclaredPort(PEER_PORT, "shares")]
    registered = cast(FakeServer, peering._server).registered
    assert {(p["run_id"], p["port"], p["label"]) for p in registered} == {
        (1, PEER_PORT, "shares"),
        (2, PEER_PORT, "shares"),
    }


async def test_a_host_networking_run_takes_no_part_and_the_node_is_told_why(
    tmp_path: Path, proxy: int
) -> None:
    harness = ApptainerHarness(
        node_name=f"apptainer-peers-{uuid.uuid4().hex[:8]}",
        task_dir=tmp_path / "tasks",
        work=tmp_path / "fake-apptainer",
        proxy_network="host",
        peer_ports=(free_port(),),
    )
    executor = await harness.open_executor()
    events = EventRecorder(executor)
    try:
        await executor.start(
            harness._spec(
                1,
                harness.behaviour_image(),
                json.dumps({"sleep": 5}).encode(),
                proxy=ProxyEndpoint(host="127.0.0.1", port=proxy),
            )
        )
        await events.wait_for(1, Phase.RUNNING, timeout=harness.slack)

        with pytest.raises(PeeringUnavailable, match="proxy_network: host"):
            await executor.run_address(1)
        await executor.kill(1)
        await events.terminal(1, timeout=harness.slack)
    finally:
        await events.aclose()
        await executor.close()
        await harness.aclose()
