"""Peering end to end on loopback: a real relay, two nodes' links, sessions and streams.

Everything here is the real code over real sockets (aiohttp WebSockets, TCP) except what
the vantage6 server would answer: which organization a node belongs to, the
organizations' public keys and whose token is whose. Those come from ``FakeServerDirectory``
and ``FakeIdentities`` — fakes standing in for the server; the server-backed identity
check is tested against the real vantage6 server in
``tests/integration/test_peering_v6server.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from executors.ports import DeclaredPort
from node.peers import configured_ports, source_is_ours
from node.settings import PeeringSettings
from peering.identity import IdentityRefused, NodeIdentity
from peering.link import RelayLink
from peering.relay import Relay
from peering.session import Sessions
from peering.streams import OpenRequest, Refused, StreamLimits, StreamReport, Streams

pytestmark = pytest.mark.asyncio

_KEYS: dict[int, rsa.RSAPrivateKey] = {}


def org_key(org: int) -> rsa.RSAPrivateKey:
    if org not in _KEYS:
        _KEYS[org] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _KEYS[org]


class FakeServerDirectory:
    """A fake of the server's answer: the organizations' public keys."""

    def __init__(self, organizations: dict[int, int]) -> None:
        self.organizations = organizations

    async def public_key(self, organization_id: int) -> rsa.RSAPublicKey:
        return org_key(organization_id).public_key()


class FakeIdentities:
    """A fake of the server's token check: token ``node-<id>`` is node ``id``."""

    def __init__(self, organizations: dict[int, int], collaboration: dict[int, int]) -> None:
        self.organizations = organizations
        self.collaboration = collaboration

    async def verify(self, token: str) -> NodeIdentity:
        if not token.startswith("node-"):
            raise IdentityRefused("not a node token")
        node = int(token.removeprefix("node-"))
        return NodeIdentity(
            node, self.organizations[node], self.collaboration.get(node, 1), "", 4e9
        )


class Admit:
    """Admission at the accepting node: maps (run, port) to a local TCP address."""

    def __init__(self) -> None:
        self.targets: dict[tuple[int, int], tuple[str, int]] = {}
        self.refuse: str | None = None
        self.requests: list[OpenRequest] = []

    async def admit(self, request: OpenRequest) -> tuple[str, int]:
        self.requests.append(request)
        if self.refuse is not None:
            raise Refused(self.refuse)
        target = self.targets.get((request.dst_run, request.port))
        if target is None:
            raise Refused(f"run {request.dst_run} declares no port {request.port}")
        return target


@dataclass
class Node:
    node_id: int
    org: int
    streams: Streams
    link: RelayLink
    admit: Admit
    reports: list[StreamReport] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def forwarder(self, *, peer: int, src_run: int, dst_run: int, port: int) -> int:
        """A local listener whose connections become streams to ``peer``; its port."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.streams.open(
                peer=peer,
                src_run=src_run,
                dst_run=dst_run,
                port=port,
                reader=reader,
                writer=writer,
            )

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.tasks.append(asyncio.create_task(server.serve_forever()))
        return int(server.sockets[0].getsockname()[1])


@dataclass
class Mesh:
    relay_url: str
    relay: Relay
    session: aiohttp.ClientSession
    organizations: dict[int, int]
    nodes: dict[int, Node] = field(default_factory=dict)
    relayed: list[bytes] = field(default_factory=list)

    async def add_node(
        self,
        node_id: int,
        org: int,
        *,
        key: rsa.RSAPrivateKey | None = None,
        limits: StreamLimits | None = None,
    ) -> Node:
        self.organizations[node_id] = org
        admit = Admit()
        holder: dict[str, Streams] = {}
        link = RelayLink(
            url=self.relay_url,
            token=lambda: f"node-{node_id}",
            session=self.session,
            on_message=lambda peer, payload: holder["streams"].receive(peer, payload),
            on_event=lambda event: None,
            on_disconnect=lambda: holder["streams"].link_lost(),
        )
        sessions = Sessions(
            node_id=node_id,
            organization_id=org,
            private_key=key or org_key(org),
            directory=FakeServerDirectory(self.organizations),
            send=link.send,
            handshake_timeout=5.0,
        )
        node = Node(
            node_id,
            org,
            Streams(
                sessions=sessions,
                admission=admit,
                observer=lambda r: node.reports.append(r),
                limits=limits,
            ),
            link,
            admit,
        )
        holder["streams"] = node.streams
        node.tasks.append(asyncio.create_task(link.run()))
        await asyncio.wait_for(link.connected.wait(), 5)
        self.nodes[node_id] = node
        return node


async def echo_server(port: int = 0) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    return server, int(server.sockets[0].getsockname()[1])


@contextlib.asynccontextmanager
async def running_relay(
    organizations: dict[int, int], collaboration: dict[int, int] | None = None, port: int = 0
) -> AsyncIterator[tuple[Relay, web.AppRunner, str]]:
    relay = Relay(FakeIdentities(organizations, collaboration or {}))
    runner = web.AppRunner(relay.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = runner.addresses[0][1]
    try:
        yield relay, runner, f"http://127.0.0.1:{bound}/v1/connect"
    finally:
        await runner.cleanup()


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    organizations: dict[int, int] = {}
    async with running_relay(organizations) as (relay, _, url), aiohttp.ClientSession() as s:
        built = Mesh(url, relay, s, organizations)
        original = relay._deliver

        async def recording(destination, data):  # type: ignore[no-untyped-def]
            built.relayed.append(data)
            await original(destination, data)

        relay._deliver = recording  # type: ignore[method-assign]
        yield built
        for node in built.nodes.values():
            await node.streams.close()
            for task in node.tasks:
                task.cancel()
            await asyncio.gather(*node.tasks, return_exceptions=True)


async def exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        for start in range(0, len(data), 50_000):
            writer.write(data[start : start + 50_000])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await asyncio.wait_for(reader.read(-1), 30)
    await sender
    writer.close()
    return received


async def test_bytes_travel_both_ways_through_the_relay_encrypted(mesh: Mesh) -> None:
    a = await mesh.add_node(1, org=10)
    b = await mesh.add_node(2, org=20)
    server, echo_port = await echo_server()
    b.admit.targets[(200, 8888)] = ("127.0.0.1", echo_port)
    port = await a.forwarder(peer=2, src_run=100, dst_run=200, port=8888)
    marker = b"PLAINTEXT-MARKER-" * 64
    data = marker + os.urandom(3_000_000) + marker
    assert await exchange(port, data) == data
    server.close()
    assert not any(b"PLAINTEXT-MARKER" in message for message in mesh.relayed)
    await _until(lambda: len(a.reports) == 1 and len(b.reports) == 1)
    sent = a.reports[0]
    assert (sent.outcome, sent.bytes_sent, sent.bytes_received) == ("closed", len(data), len(data))
    assert b.admit.requests == [OpenRequest(1, 100, 200, 8888, peer_organization=10)]


async def test_a_stream_to_a_run_that_listens_a_moment_later_waits_for_it(mesh: Mesh) -> None:
    """The opener's connection is already accepted by its forwarder; the peer's run may
    start listening a moment later (MPyC connects as soon as its own server is up): the
    peer node tries the run's port again instead of failing the stream."""
    a = await mesh.add_node(1, org=10)
    b = await mesh.add_node(2, org=20)
    with socket.socket() as reserve:  # a port nothing listens on yet
        reserve.bind(("127.0.0.1", 0))
        echo_port = reserve.getsockname()[1]
    b.admit.targets[(200, 8888)] = ("127.0.0.1", echo_port)
    port = await a.forwarder(peer=2, src_run=100, dst_run=200, port=8888)

    async def listen_later() -> asyncio.Server:
        await asyncio.sleep(0.7)
        server, _ = await echo_server(echo_port)
        return server

    later = asyncio.create_task(listen_later())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello")  # and waits for the answer, the connection open (as MPyC does)
    assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
    writer.close()
    (await later).close()
    await _until(lambda: len(a.reports) == 1)
    assert a.reports[0].outcome == "closed"


async def test_a_connection_closed_before_the_late_peer_listened_delivers_nothing(
    mesh: Mesh,
) -> None:
    """The algorithm gave up (closed) while the peer's run did not listen yet; when it
    does, none of the given-up connection's bytes arrive there (its retry will)."""
    a = await mesh.add_node(1, org=10)
    b = await mesh.add_node(2, org=20)
    with socket.socket() as reserve:
        reserve.bind(("127.0.0.1", 0))
        target = reserve.getsockname()[1]
    b.admit.targets[(200, 8888)] = ("127.0.0.1", target)
    port = await a.forwarder(peer=2, src_run=100, dst_run=200, port=8888)
    received: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(-1))
        writer.close()

    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"a share")
    writer.close()  # it timed out: gone before the peer listens
    await asyncio.sleep(0.5)
    server = await asyncio.start_server(record, "127.0.0.1", target)
    async with server:
        await _until(lambda: len(a.reports) == 1)
        await asyncio.sleep(0.3)
    assert a.reports[0].outcome == "abandoned"
    assert received in ([], [b""])  # connected and reset, or not at all: no share


async def test_a_refused_stream_closes_the_local_connection_with_the_reason(mesh: Mesh) -> None:
    a = await mesh.add_node(1, org=10)
    b = await mesh.add_node(2, org=20)
    b.admit.refuse = "run 100 is not of job 7"
    port = await a.forwarder(peer=2, src_run=100, dst_run=200, port=8888)
    assert await exchange(port, b"hello") == b""
    await _until(lambda: len(a.reports) == 1)
    assert a.reports[0].outcome == "refused"
    assert "not of job 7" in a.reports[0].reason


async def test_a_node_signing_with_a_key_not_its_organizations_is_refused(mesh: Mesh) -> None:
    a = await mesh.add_node(
        1, org=10, key=rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    b = await mesh.add_node(2, org=20)
    server, echo_port = await echo_server()
    b.admit.targets[(200, 8888)] = ("127.0.0.1", echo_port)
    port = await a.forwarder(peer=2, src_run=100, dst_run=200, port=8888)
    assert await exchange(port, b"hello") == b""
    server.close()
    await _until(lambda: len(a.reports) == 1)
    assert a.reports[0].outcome == "refused"
    assert "not signed by organization 10" in a.reports[0].reason
    assert b.admit.requests == []


async def test_a_run_that_does_not_read_stops_its_sender_at_one_window(mesh: Mesh) -> None:
    limits = StreamLimits(window=64 * 1024)
    a = await mesh.add_node(1, org=10, limits=limits)
    b = await mesh.add_node(2, org=20, limits=limits)
    got = bytearray()
    release, done = asyncio.Event(), asyncio.Event()

    async def stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        while chunk := await reader.read(65536):
            got.extend(chunk)
        done.set()
        writer.close()

    server = await asyncio.start_server(stalled, "127.0.0.1", 0)
    b.admit.targets[(200, 8888)] = ("127.0.0.1", int(server.sockets[0].getsockname()[1]))
    port = await a.forwarder(peer=2, src_run=100, dst_run=200, port=8888)
    data = os.urandom(24 * 1024 * 1024)  # more than the loopback socket buffers hold
    _, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        writer.write(data)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    # The receiving run reads nothing: the opener runs out of credit and stops sending,
    # while the accepting node holds at most one window of the stream.
    await _until(lambda: any(s.credit == 0 for s in a.streams._streams.values()), timeout=30)
    for _ in range(20):
        assert all(s.inbound_bytes <= limits.window for s in b.streams._streams.values())
        await asyncio.sleep(0.01)
    release.set()
    await asyncio.wait_for(done.wait(), 60)
    await sender
    writer.close()
    server.close()
    assert bytes(got) == data


async def test_a_relay_restart_fails_open_streams_and_new_ones_work(mesh: Mesh) -> None:
    # A relay of its own on a fixed port, so the nodes reconnect to the same address.
    organizations = mesh.organizations
    async with running_relay(organizations) as (_, runner, url):
        port_number = int(url.split(":")[2].split("/")[0])
        mesh.relay_url = url
        a = await mesh.add_node(1, org=10)
        b = await mesh.add_node(2, org=20)
        server, echo_port = await echo_server()
        b.admit.targets[(200, 8888)] = ("127.0.0.1", echo_port)
        port = await a.forwarder(peer=2, src_run=100, dst_run=200, port=8888)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        await runner.cleanup()  # the relay goes away mid-stream
    assert await asyncio.wait_for(reader.read(-1), 10) == b""  # closed, not hung
    writer.close()
    async with running_relay(organizations, port=port_number):
        await asyncio.wait_for(a.link.connected.wait(), 20)
        await asyncio.wait_for(b.link.connected.wait(), 20)
        assert await exchange(port, b"after the restart") == b"after the restart"
    server.close()
    assert [r.outcome for r in a.reports][:1] == ["reset"]


async def test_the_relay_refuses_a_connection_without_a_node_identity(mesh: Mesh) -> None:
    async with mesh.session.get(
        mesh.relay_url, headers={"Authorization": "Bearer user-5"}
    ) as response:
        assert response.status == 401
        assert "not a node token" in (await response.json())["msg"]
    async with mesh.session.get(mesh.relay_url) as response:
        assert response.status == 401


async def test_nodes_of_another_collaboration_are_unreachable() -> None:
    organizations = {1: 10, 2: 20}
    events: list[dict[str, object]] = []
    async with (
        running_relay(organizations, {1: 1, 2: 2}) as (_, _, url),
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers={"Authorization": "Bearer node-1"}) as one,
        session.ws_connect(url, headers={"Authorization": "Bearer node-2"}),
    ):
        welcome = await one.receive_json()
        assert welcome["event"] == "welcome"
        await one.send_bytes((2).to_bytes(4, "big") + b"\x01{}")
        events.append(await asyncio.wait_for(one.receive_json(), 5))
    assert events == [{"event": "unreachable", "node": 2, "reason": "not connected to this relay"}]


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"not true within {timeout} s: {condition}")
        await asyncio.sleep(0.01)


async def test_after_a_peer_restarts_the_next_stream_agrees_on_a_new_session(mesh: Mesh) -> None:
    a = await mesh.add_node(1, org=10)
    b = await mesh.add_node(2, org=20)
    server, echo_port = await echo_server()
    b.admit.targets[(200, 8888)] = ("127.0.0.1", echo_port)
    port = await a.forwarder(peer=2, src_run=100, dst_run=200, port=8888)
    assert await exchange(port, b"before") == b"before"
    await b.streams.close()  # node 2 stops; its sessions are gone with it
    for task in b.tasks:
        task.cancel()
    await asyncio.gather(*b.tasks, return_exceptions=True)
    b2 = await mesh.add_node(2, org=20)
    b2.admit.targets[(200, 8888)] = ("127.0.0.1", echo_port)
    assert await exchange(port, b"after") == b"after"
    server.close()


async def test_fednode_relay_serves_until_sigterm(tmp_path: Path) -> None:
    import signal
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "node",
        "relay",
        "--server",
        "http://127.0.0.1:9/api",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(1200):  # up to a minute on a loaded machine
                try:
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                        assert await response.json() == {"status": "ok", "nodes": 0}
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("the relay did not answer /healthz")
            # A token the server cannot confirm (it is unreachable) is refused, clearly.
            async with session.get(
                f"http://127.0.0.1:{port}/v1/connect",
                headers={"Authorization": "Bearer a.eyJjbGllbnRfdHlwZSI6Im5vZGUiLCJzdWIiOjF9.b"},
            ) as response:
                assert response.status == 401
                assert "unreachable" in (await response.json())["msg"]
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()


async def test_images_the_executor_cannot_read_get_the_configured_ports() -> None:
    rules = PeeringSettings.model_validate(
        {
            "image_ports": [
                {
                    "image": r"harbor\.example\.org/mpc/.*",
                    "ports": [{"port": 5000, "label": "mpc"}],
                },
                {"image": r".*/secretsum(:.*)?", "ports": [{"port": 8888, "label": "shares"}]},
            ]
        }
    ).image_ports
    assert configured_ports("harbor.example.org/mpc/x:1", rules) == [DeclaredPort(5000, "mpc")]
    assert configured_ports("localhost/fednode/secretsum:abc", rules) == [
        DeclaredPort(8888, "shares")
    ]
    # whole-name matches only; anything else gets vantage6 4's default
    assert configured_ports("evil/harbor.example.org/mpc/x", rules) == [DeclaredPort(8888, None)]


async def test_a_loopback_source_counts_only_as_the_nodes_own_users_socket() -> None:
    """A run's host-side address on apptainer is a 127.x address any local user can bind:
    the forwarder also asks the kernel (/proc/net/tcp) whose socket connected. The attack:
    another user binds the run's address and connects."""
    verdicts: asyncio.Queue[bool] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await verdicts.put(await source_is_ours(writer))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connect = (
        "import socket,sys\n"
        "s=socket.socket(); s.bind(('127.64.0.9',0)); s.connect(('127.0.0.1',int(sys.argv[1])))\n"
        "s.recv(1)\n"
    )
    async with server:
        ours = await asyncio.create_subprocess_exec(sys.executable, "-c", connect, str(port))
        assert await asyncio.wait_for(verdicts.get(), 10) is True
        await ours.wait()
        if os.geteuid() == 0:
            theirs = await asyncio.create_subprocess_exec(
                "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                sys.executable, "-I", "-c", connect, str(port),
            )  # fmt: skip
            assert await asyncio.wait_for(verdicts.get(), 10) is False
            await theirs.wait()
