"""The node's side of algorithm-to-algorithm networking (docs/networking.md).

:mod:`peering` has the relay, the sessions and the streams; this module connects them to
the node:

* **Registration, as a vantage6 4 node does it.** The node's ``ip`` (a stable virtual
  address in ``100.64.0.0/10`` derived from its id; nothing routes to it) is set with the
  node ``PATCH``; for every run, once its container runs, each port its image declares is
  registered with ``POST /port`` (run id, port, label), and removed with
  ``DELETE /port?run_id=`` when the run ends. So the server's
  ``/vpn/algorithm/addresses`` answers as it would for 4.x nodes.
* **Addresses that work inside the sandbox.** The proxy hands the server's answer to
  :meth:`NodePeering.rewrite`: every address becomes a *forwarder* — a port on the proxy's
  own address, opened for that asking run and that peer run's port. A connection to it is
  accepted only from the asking run's own address, and becomes a stream to the peer
  run's node through the relay (or, for a run on this node, a direct connection after
  the same checks).
* **Admission of streams to our runs** (:meth:`NodePeering.admit`): the run must be ours
  and running, the port one its image declares, and the peer run — as the server
  describes it — must be at the node the relay authenticated and belong to the same job.

Each stream ends as a ``peer-stream`` span under the run's trace and a log line (bytes,
seconds, peer organization, outcome).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from opentelemetry import trace
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from common.backoff import Backoff
from common.sockets import tcp_owner
from executors.base import Executor, ExecutorError, PeeringUnavailable
from executors.ports import DeclaredPort, ImagePorts, PeerEndpoints
from executors.ports import configured_ports as ports_by_rules
from node.crypto import CryptoError, b64decode
from node.logging import get_logger
from node.proxy_link import OrganizationKeys
from node.server.models import NodeIdentity
from node.server.rest import ServerClient, ServerError
from node.settings import ImagePortsRule, PeeringSettings
from peering.link import RelayLink
from peering.session import Sessions
from peering.streams import (
    OpenRequest,
    Refused,
    StreamLimits,
    StreamReport,
    Streams,
    connect_patiently,
    gave_up,
)
from proxy.protocols import RunInfo, RunTable

log = get_logger(__name__)

_VIRTUAL_NETWORK = ipaddress.IPv4Network("100.64.0.0/10")


def virtual_address(node_id: int) -> str:
    """The node's ``ip`` at the server: a stable address per node id (nothing routes it)."""
    return str(
        _VIRTUAL_NETWORK.network_address + 1 + node_id % (_VIRTUAL_NETWORK.num_addresses - 2)
    )


def configured_ports(image: str, rules: Sequence[ImagePortsRule]) -> list[DeclaredPort]:
    """An image's ports by ``peering.image_ports`` (for executors that cannot read the
    image's configuration): the first rule matching the whole name, else 8888."""
    return ports_by_rules(
        image,
        [
            ImagePorts(rule.image, tuple(DeclaredPort(p.port, p.label) for p in rule.ports))
            for rule in rules
        ],
    )


class ServerPeerDirectory:
    """The organizations' public keys as the server publishes them, for the sessions."""

    def __init__(self, keys: OrganizationKeys) -> None:
        self._keys = keys

    async def public_key(self, organization_id: int) -> rsa.RSAPublicKey:
        text = await self._keys.public_key(organization_id)
        if not text:
            raise LookupError("no public key published")
        try:
            key = serialization.load_pem_public_key(b64decode(text))
        except (CryptoError, ValueError) as exc:
            raise LookupError(f"unreadable public key: {exc}") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise LookupError("not an RSA key")
        return key


@dataclass(eq=False)
class _LocalRun:
    info: RunInfo
    job_id: int | None = None
    ports: list[DeclaredPort] = field(default_factory=list)
    registered: bool = False
    #: Why the executor cannot offer peering for this run (streams are refused so).
    unavailable: str | None = None
    task: asyncio.Task[None] | None = None
    forwarders: dict[tuple[int, int, int], _Forwarder] = field(default_factory=dict)


@dataclass(eq=False)
class _Forwarder:
    port: int
    server: asyncio.Server


class Forwarders:
    """The pool of forwarder ports on the proxy's address."""

    def __init__(self, *, host: str, first_port: int, count: int) -> None:
        self.host = host
        self.ports = tuple(range(first_port, first_port + count))
        self._free = list(self.ports)

    def take(self) -> int | None:
        return self._free.pop(0) if self._free else None

    def give_back(self, port: int) -> None:
        if port in self.ports and port not in self._free:
            self._free.append(port)


class NodePeering:
    """Relay link, sessions, streams, forwarders and the server bookkeeping of one node."""

    def __init__(
        self,
        *,
        settings: PeeringSettings,
        server: ServerClient,
        identity: NodeIdentity,
        private_key: rsa.RSAPrivateKey,
        keys: OrganizationKeys,
        executor: Executor,
        bind_host: str,
        advertise_host: str,
        tracer: Tracer,
    ) -> None:
        if settings.relay_url is None:
            raise ValueError("peering.relay_url is not set")
        self._settings = settings
        self._server = server
        self._identity = identity
        self._executor = executor
        self._advertise_host = advertise_host
        self._tracer = tracer
        self._runs: dict[int, _LocalRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._forwarders = Forwarders(
            host=bind_host, first_port=settings.first_port, count=settings.ports
        )
        self._directory = ServerPeerDirectory(keys)
        self._session = aiohttp.ClientSession()
        self.link = RelayLink(
            url=settings.relay_url,
            token=lambda: server.access_token,
            session=self._session,
            on_message=self._on_message,
            on_event=self._on_relay_event,
            on_disconnect=self._on_relay_lost,
        )
        self.sessions = Sessions(
            node_id=identity.id,
            organization_id=identity.organization_id,
            private_key=private_key,
            directory=self._directory,
            send=self.link.send,
        )
        self.streams = Streams(
            sessions=self.sessions,
            admission=self,
            observer=self._observe,
            limits=StreamLimits(
                window=settings.window_kb * 1024,
                streams_per_run=settings.max_streams_per_run,
                idle_seconds=settings.idle_seconds,
            ),
        )

    @property
    def peer_ports(self) -> tuple[int, ...]:
        """The forwarder ports runs must be able to reach (beside the proxy port)."""
        return self._forwarders.ports

    # -- life cycle ---------------------------------------------------------------------

    async def announce(self) -> None:
        """Set this node's ``ip`` at the server (what 4.x tooling shows for its runs)."""
        address = virtual_address(self._identity.id)
        await self._server.request("PATCH", f"node/{self._identity.id}", json_body={"ip": address})
        log.info("peering.announced", ip=address, relay=self._settings.relay_url)

    async def run(self) -> None:
        """The relay link (a root task of the node)."""
        await self.link.run()

    async def close(self) -> None:
        await self.streams.close()
        for run in list(self._runs.values()):
            self._close_forwarders(run)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._session.close()

    def _spawn(self, coroutine: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- runs (called through PeeringRunTable) -----------------------------------------

    def run_admitted(self, info: RunInfo) -> None:
        if info.run_id in self._runs:
            self._runs[info.run_id].info = info
            return
        run = self._runs[info.run_id] = _LocalRun(info)
        self._spawn(self._register(run), name=f"peering-register-{info.run_id}")

    def run_ended(self, run_id: int) -> None:
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        self.streams.reset_run(run_id, "the run ended")
        self._close_forwarders(run)
        if run.registered:
            self._spawn(self._unregister(run_id), name=f"peering-unregister-{run_id}")

    async def _register(self, run: _LocalRun) -> None:
        """Once the run's container runs: learn its ports and register them."""
        run_id = run.info.run_id
        bound = log.bind(run_id=run_id, task_id=run.info.task_id)
        try:
            task = await self._server.request("GET", f"task/{run.info.task_id}")
            run.job_id = _int_or_none(task.get("job_id"))
            image = str(task.get("image", ""))
            backoff = Backoff(first=0.1, cap=2.0)
            while run_id in self._runs and await self._address(run_id) is None:
                await backoff.pause()
            if run_id not in self._runs:
                return
            from_image = (
                await self._executor.declared_ports(run_id, image)
                if isinstance(self._executor, PeerEndpoints)
                else []
            )
            run.ports = (
                configured_ports(image, self._settings.image_ports)
                if from_image is None
                else from_image
            )
            existing = await self._server.request("GET", f"run/{run_id}")
            if not existing.get("ports"):
                for declared in run.ports:
                    await self._server.request(
                        "POST",
                        "port",
                        json_body={
                            "port": declared.port,
                            "run_id": run_id,
                            "label": declared.label,
                        },
                    )
            run.registered = True
            bound.info("peering.ports_registered", ports=[p.port for p in run.ports])
        except PeeringUnavailable as exc:
            run.unavailable = str(exc)
            bound.info("peering.unavailable", reason=str(exc))
        except (ServerError, ExecutorError) as exc:
            # The run goes on without peers reaching it; say so rather than lose it in a
            # task nobody awaits.
            bound.warning("peering.ports_not_registered", error=str(exc))

    async def _unregister(self, run_id: int) -> None:
        try:
            await self._server.request("DELETE", "port", params={"run_id": run_id})
        except ServerError as exc:
            log.info("peering.ports_not_removed", run_id=run_id, error=str(exc))

    async def _address(self, run_id: int) -> str | None:
        if not isinstance(self._executor, PeerEndpoints):
            return None
        return await self._executor.run_address(run_id)

    # -- addresses (the proxy's /vpn/algorithm/addresses) -------------------------------

    async def rewrite(self, run_id: int, addresses: list[Any]) -> list[dict[str, Any]]:
        """The server's addresses for ``run_id``, each pointed at a forwarder for it."""
        run = self._runs.get(run_id)
        if run is None:
            return []
        rewritten: list[dict[str, Any]] = []
        for entry in addresses[:256]:
            if not isinstance(entry, Mapping):
                continue
            target = await self._peer_run(entry)
            if target is None:
                continue
            peer_node, peer_run = target
            port = _int_or_none(entry.get("port"))
            if port is None:
                continue
            forwarder = await self._forwarder(run, peer_node, peer_run, port)
            if forwarder is None:
                log.warning("peering.no_forwarder_port", run_id=run_id, ports=len(self.peer_ports))
                continue
            rewritten.append({**entry, "ip": self._advertise_host, "port": forwarder})
        return rewritten

    async def _peer_run(self, entry: Mapping[str, Any]) -> tuple[int, int] | None:
        """(node id, run id) of the run an address entry describes."""
        task_id = _int_or_none(entry.get("task_id"))
        organization_id = _int_or_none(entry.get("organization_id"))
        if task_id is None or organization_id is None:
            return None
        try:
            runs = await self._server.list_pages("run", params={"task_id": task_id})
        except ServerError as exc:
            log.warning("peering.peer_run_unknown", task_id=task_id, error=str(exc))
            return None
        for candidate in runs:
            organization = _int_or_none((candidate.get("organization") or {}).get("id"))
            node = _int_or_none((candidate.get("node") or {}).get("id"))
            if organization == organization_id and node is not None:
                return node, int(candidate["id"])
        return None

    async def _forwarder(
        self, run: _LocalRun, peer_node: int, peer_run: int, port: int
    ) -> int | None:
        key = (peer_node, peer_run, port)
        existing = run.forwarders.get(key)
        if existing is not None:
            return existing.port
        number = self._forwarders.take()
        if number is None:
            return None
        src_run = run.info.run_id

        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._carry(src_run, peer_node, peer_run, port, reader, writer)

        try:
            server = await asyncio.start_server(connected, self._forwarders.host, number)
        except OSError as exc:
            log.warning("peering.forwarder_port_busy", port=number, error=str(exc))
            return None
        run.forwarders[key] = _Forwarder(number, server)
        return number

    def _close_forwarders(self, run: _LocalRun) -> None:
        for forwarder in run.forwarders.values():
            forwarder.server.close()
            self._forwarders.give_back(forwarder.port)
        run.forwarders.clear()

    async def _carry(
        self,
        src_run: int,
        peer_node: int,
        peer_run: int,
        port: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """One connection to a forwarder: only from the run it was made for."""
        peer_address = (writer.get_extra_info("peername") or ("?",))[0]
        try:
            expected = await self._address(src_run)
        except PeeringUnavailable as exc:
            log.warning("peering.forwarder_refused", run_id=src_run, reason=str(exc))
            writer.close()
            return
        if expected is None or peer_address != expected:
            log.warning(
                "peering.forwarder_refused", run_id=src_run, source=peer_address, expected=expected
            )
            writer.close()
            return
        if not await source_is_ours(writer):
            log.warning(
                "peering.forwarder_refused",
                run_id=src_run,
                source=peer_address,
                reason="a loopback source not of the node's own user (not the run's relay)",
            )
            writer.close()
            return
        if peer_node == self._identity.id:
            await self._carry_locally(src_run, peer_run, port, reader, writer)
            return
        await self.streams.open(
            peer=peer_node,
            src_run=src_run,
            dst_run=peer_run,
            port=port,
            reader=reader,
            writer=writer,
        )

    async def _carry_locally(
        self,
        src_run: int,
        dst_run: int,
        port: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """A peer run on this node: the same admission, then a direct connection."""
        report = StreamReport(self._identity.id, src_run, dst_run, port, opened_here=True)
        try:
            host, target_port = await self.admit(
                OpenRequest(self._identity.id, src_run, dst_run, port)
            )
            peer_reader, peer_writer, late = await connect_patiently(
                host, target_port, within=self.streams.limits.open_seconds * 0.75
            )
            if late and gave_up(reader):  # as in Streams.open: no late delivery
                peer_writer.close()
                raise Refused("the connection was closed before the peer run accepted it")
        except (Refused, OSError) as exc:
            report.outcome, report.reason = "refused", str(exc)
            writer.close()
            report.seconds = time.monotonic() - report.started
            self._observe(report)
            return

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> int:
            moved = 0
            while chunk := await source.read(65536):
                sink.write(chunk)
                await sink.drain()
                moved += len(chunk)
            if sink.can_write_eof():
                sink.write_eof()
            return moved

        try:
            sent, received = await asyncio.gather(
                pipe(reader, peer_writer), pipe(peer_reader, writer)
            )
            report.bytes_sent, report.bytes_received = sent, received
        except OSError as exc:
            report.outcome, report.reason = "reset", str(exc)
        finally:
            writer.close()
            peer_writer.close()
            report.seconds = time.monotonic() - report.started
            self._observe(report)

    # -- admission (peering.streams.Admission) ------------------------------------------

    async def admit(self, request: OpenRequest) -> tuple[str, int]:
        run = self._runs.get(request.dst_run)
        if run is None or not run.info.active:
            raise Refused(f"run {request.dst_run} is not running at node {self._identity.id}")
        if run.unavailable is not None:
            raise Refused(f"run {request.dst_run} takes no peer streams: {run.unavailable}")
        if request.port not in {declared.port for declared in run.ports}:
            raise Refused(f"run {request.dst_run} declares no port {request.port}")
        try:
            source = await self._server.request("GET", f"run/{request.src_run}")
            source_node = _int_or_none((source.get("node") or {}).get("id"))
            source_task = _int_or_none((source.get("task") or {}).get("id"))
            if source_node != request.peer_node:
                raise Refused(f"run {request.src_run} is not a run of node {request.peer_node}")
            task = await self._server.request("GET", f"task/{source_task}")
        except ServerError as exc:
            raise Refused(f"the server does not confirm run {request.src_run}: {exc}") from None
        source_job = _int_or_none(task.get("job_id"))
        if source_job is None or source_job != run.job_id:
            raise Refused(
                f"run {request.src_run} is of job {source_job}, run {request.dst_run} of job "
                f"{run.job_id}: only runs of one job may connect"
            )
        try:
            address = await self._address(request.dst_run)
        except PeeringUnavailable as exc:
            raise Refused(f"run {request.dst_run} takes no peer streams: {exc}") from None
        if address is None:
            raise Refused(f"run {request.dst_run} is not running")
        return address, request.port

    # -- the relay ----------------------------------------------------------------------

    async def _on_message(self, peer: int, payload: bytes) -> None:
        await self.streams.receive(peer, payload)

    def _on_relay_event(self, event: Mapping[str, object]) -> None:
        if event.get("event") == "unreachable":
            node = event.get("node")
            if isinstance(node, int):
                self.sessions.forget(node, reason=f"unreachable: {event.get('reason')}")
        elif event.get("event") == "welcome":
            log.info("peering.relay_welcome", node=event.get("node"))

    def _on_relay_lost(self) -> None:
        self.streams.link_lost()

    # -- observability ------------------------------------------------------------------

    def _observe(self, report: StreamReport) -> None:
        local_run = report.src_run if report.opened_here else report.dst_run
        run = self._runs.get(local_run)
        log.info(
            "peering.stream_ended",
            run_id=local_run,
            peer_node=report.peer_node,
            peer_run=report.dst_run if report.opened_here else report.src_run,
            port=report.port,
            direction="out" if report.opened_here else "in",
            outcome=report.outcome,
            reason=report.reason or None,
            bytes_sent=report.bytes_sent,
            bytes_received=report.bytes_received,
            seconds=round(report.seconds, 3),
        )
        if run is None:
            return
        context = TraceContextTextMapPropagator().extract(dict(run.info.trace_context))
        end = time.time_ns()
        span = self._tracer.start_span(
            "peer-stream",
            context=context,
            start_time=end - int(report.seconds * 1e9),
            attributes={
                "fednode.run_id": local_run,
                "fednode.peer.node_id": report.peer_node,
                "fednode.peer.port": report.port,
                "fednode.peer.direction": "out" if report.opened_here else "in",
                "fednode.peer.outcome": report.outcome,
                "fednode.peer.bytes_sent": report.bytes_sent,
                "fednode.peer.bytes_received": report.bytes_received,
            },
        )
        if report.outcome not in ("closed",):
            span.set_status(trace.Status(trace.StatusCode.ERROR, report.reason[:200]))
        span.end(end_time=end)


class PeeringRunTable(RunTable):
    """The proxy's run table, telling :class:`NodePeering` when runs come and go."""

    def __init__(self, peering: NodePeering, *, restoring: bool = False) -> None:
        super().__init__(restoring=restoring)
        self._peering = peering

    def add(self, token: str, run: RunInfo) -> None:
        super().add(token, run)
        if run.active:
            self._peering.run_admitted(run)

    def finish(self, token: str) -> None:
        run = self.lookup(token)
        super().finish(token)
        if run is not None:
            self._peering.run_ended(run.run_id)

    def discard(self, token: str) -> None:
        run = self.lookup(token)
        super().discard(token)
        if run is not None:
            self._peering.run_ended(run.run_id)


async def source_is_ours(writer: asyncio.StreamWriter) -> bool:
    """A loopback source (a run's host-side address on apptainer) must be a socket of the
    node's own uid: any local user can bind a 127.x address. Other sources are runs'
    network addresses, which their runtime's isolation vouches for."""
    peer = writer.get_extra_info("peername")
    local = writer.get_extra_info("sockname")
    if not peer or not local:
        return False
    address = ipaddress.ip_address(peer[0])
    if not address.is_loopback:
        return True
    if address.version != 4:
        return False
    owner = await asyncio.to_thread(tcp_owner, (peer[0], peer[1]), (local[0], local[1]))
    return owner == os.getuid()


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None
