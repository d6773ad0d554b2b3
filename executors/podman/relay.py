"""A TCP relay on the runs' gateway to one network database, open only to the runs that asked.

Runs on podman's internal network have no route out: they reach the node's own addresses
on the gateway and nothing else. A network database (``sql``, ``sparql``, ``omop``) lives
elsewhere — on this host, or on another. :class:`DatabaseRelay` listens on the gateway on
one port per database and copies bytes both ways between a run and the database's
host:port, which the node (not the run) connects to. The run is told the relay's port in
its ``<LABEL>_DATABASE_URI`` (:attr:`~executors.spec.DatabaseMount.run_port`).

Who may connect is decided twice, for the same answer:

* the host firewall accepts a run's connection to the relay port only from the run's own
  address, and only for databases the run asked for
  (:func:`policies.podman_firewall.database_access_ruleset`);
* the relay itself accepts a connection only from an address it was told to
  (:meth:`DatabaseRelay.admit`), so that the rule holds with ``firewall: off`` too, and a
  run that slipped past one still meets the other.

An address is admitted just before its run's container starts and revoked when the run is
cleaned up (podman hands addresses out again). The relay reads nothing it copies: the
database's own protocol (and TLS) passes through unchanged; each connection is bounded by
the buffers of the copy, never by what the run sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import NamedTuple

from common.logging import get_logger
from executors.base import ExecutorError

log = get_logger(__name__)

IP_FREEBIND = 15  # linux/in.h; socket.IP_FREEBIND is missing from some Python builds
_CHUNK = 64 * 1024
#: Connections one run may hold open through one relay at once; more are closed at once
#: (each is a connection the node opens to the database, on the run's behalf).
MAX_CONNECTIONS_PER_RUN = 32


class RelayTarget(NamedTuple):
    """One network database: its label, where it is, and the gateway port it is relayed on."""

    label: str
    host: str
    port: int
    relay_port: int


class DatabaseRelay:
    """Relays ``gateway:relay_port`` to one database for the admitted run addresses."""

    def __init__(
        self,
        target: RelayTarget,
        *,
        bind_host: str,
        connect_seconds: float,
        max_connections_per_run: int = MAX_CONNECTIONS_PER_RUN,
    ) -> None:
        self.target = target
        self._bind_host = bind_host
        self._connect_seconds = connect_seconds
        self._max_per_run = max_connections_per_run
        self._open_by: dict[str, int] = {}
        self._admitted: set[str] = set()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def admitted(self) -> frozenset[str]:
        return frozenset(self._admitted)

    async def open(self) -> None:
        """Listen on the gateway (bound before the bridge has that address)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            sock.bind((self._bind_host, self.target.relay_port))
        except OSError as exc:
            sock.close()
            raise ExecutorError(
                f"database {self.target.label!r} cannot be relayed on "
                f"{self._bind_host}:{self.target.relay_port}: {exc.strerror} "
                f"(executor.database_relay_port sets the first relay port)"
            ) from None
        self._server = await asyncio.start_server(self._accept, sock=sock)
        log.info(
            "podman.relay.listening",
            label=self.target.label,
            relay=f"{self._bind_host}:{self.target.relay_port}",
            database=f"{self.target.host}:{self.target.port}",
        )

    async def close(self) -> None:
        """Stop listening and cut every relayed connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def admit(self, address: str) -> None:
        self._admitted.add(address)

    def revoke(self, address: str) -> None:
        self._admitted.discard(address)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Each connection's task is owned here, so close() can cut it.
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if peer else ""
        label = self.target.label
        if address not in self._admitted:
            log.warning("podman.relay.refused", label=label, peer=address)
            writer.close()
            return
        if self._open_by.get(address, 0) >= self._max_per_run:
            log.warning("podman.relay.too_many", label=label, peer=address, limit=self._max_per_run)
            writer.close()
            return
        self._open_by[address] = self._open_by.get(address, 0) + 1
        try:
            await self._relay(reader, writer, address)
        finally:
            left = self._open_by.pop(address, 1) - 1
            if left:
                self._open_by[address] = left

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str
    ) -> None:
        label = self.target.label
        try:
            async with asyncio.timeout(self._connect_seconds):
                upstream_reader, upstream_writer = await asyncio.open_connection(
                    self.target.host, self.target.port
                )
        except (OSError, TimeoutError) as exc:
            log.warning("podman.relay.unreachable", label=label, peer=address, error=str(exc))
            writer.close()
            return
        log.info("podman.relay.connected", label=label, peer=address)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(_copy(reader, upstream_writer))
                group.create_task(_copy(upstream_reader, writer))
        except* OSError as errors:
            log.info("podman.relay.broken", label=label, peer=address, error=str(errors))
        finally:
            for end in (writer, upstream_writer):
                end.close()
            log.info("podman.relay.closed", label=label, peer=address)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Bytes from ``reader`` to ``writer`` until end of stream, then half-close ``writer``."""
    while data := await reader.read(_CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()
