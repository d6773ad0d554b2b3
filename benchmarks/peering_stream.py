"""One algorithm-to-algorithm stream through forwarder → relay → peer node, against direct TCP.

``python -m benchmarks.peering_stream``: a real relay (``peering.relay``), two nodes' real
relay links, end-to-end sessions and streams (``peering``) and a forwarder, all on
loopback in this one process; the baseline is a direct loopback TCP connection to the
same echo/sink server, measured in the same run. What the vantage6 server would answer
(whose token is whose, the organizations' public keys) comes from in-memory stand-ins —
they are off the data path.

Printed: round-trip latency of 64-byte messages (median, p95, max; the added latency is
the difference of the medians), one-way throughput of ``--megabytes``, connections per
second (open, one byte echoed, close), and the process's memory per open idle stream.
Everything runs in one event loop on one core (relay, both nodes, the echo server), so the
stream's numbers are a floor on what separate processes would give.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from benchmarks.stats import percentile, summary
from peering.identity import IdentityRefused, NodeIdentity
from peering.link import RelayLink
from peering.relay import Relay
from peering.session import Sessions
from peering.streams import OpenRequest, StreamLimits, Streams

ECHO_PORT, SINK_PORT = 8888, 9999
_KEYS = {org: rsa.generate_private_key(public_exponent=65537, key_size=2048) for org in (1, 2)}


class StandInIdentities:
    """The server's answer to the relay: token ``node-<n>`` is node n of organization n."""

    async def verify(self, token: str) -> NodeIdentity:
        if not token.startswith("node-"):
            raise IdentityRefused("not a node token")
        node = int(token.removeprefix("node-"))
        return NodeIdentity(node, node, 1, "", 4e9)


class StandInKeys:
    """The organizations' public keys as the server would publish them."""

    async def public_key(self, organization_id: int) -> rsa.RSAPublicKey:
        return _KEYS[organization_id].public_key()


class Targets:
    """Admission at the accepting node: declared port → the local server behind it."""

    def __init__(self, targets: dict[int, int]) -> None:
        self.targets = targets

    async def admit(self, request: OpenRequest) -> tuple[str, int]:
        return "127.0.0.1", self.targets[request.port]


async def _node(
    node_id: int,
    url: str,
    session: aiohttp.ClientSession,
    targets: dict[int, int],
    links: list[asyncio.Task[None]],
) -> Streams:
    """One node's streams over its own relay link; the link's task goes into ``links``."""
    holder: dict[str, Streams] = {}
    link = RelayLink(
        url=url,
        token=lambda: f"node-{node_id}",
        session=session,
        on_message=lambda peer, payload: holder["s"].receive(peer, payload),
        on_event=lambda event: None,
        on_disconnect=lambda: holder["s"].link_lost(),
    )
    sessions = Sessions(
        node_id=node_id,
        organization_id=node_id,
        private_key=_KEYS[node_id],
        directory=StandInKeys(),
        send=link.send,
    )
    streams = Streams(
        sessions=sessions,
        admission=Targets(targets),
        observer=lambda report: None,
        limits=StreamLimits(streams_per_run=100_000, streams=100_000),
    )
    holder["s"] = streams
    links.append(asyncio.create_task(link.run(), name=f"relay-link-{node_id}"))
    await asyncio.wait_for(link.connected.wait(), 10)
    return streams


async def _serve(handler: Callable[..., object], servers: list[asyncio.Server]) -> int:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    servers.append(server)
    return int(server.sockets[0].getsockname()[1])


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    while data := await reader.read(262144):
        total += len(data)
    writer.write(str(total).encode())
    await writer.drain()
    writer.close()


async def _round_trips(port: int, count: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    message = b"x" * 64
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        writer.write(message)
        await writer.drain()
        await reader.readexactly(len(message))
        samples.append((time.perf_counter() - started) * 1e3)
    writer.close()
    return samples


async def _throughput(port: int, megabytes: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk = os.urandom(1 << 20)
    started = time.perf_counter()
    for _ in range(megabytes):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    received = int(await reader.read())
    seconds = time.perf_counter() - started
    writer.close()
    assert received == megabytes << 20, received
    return megabytes / seconds


async def _connections(port: int, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"!")
        await writer.drain()
        await reader.readexactly(1)
        writer.close()
        await writer.wait_closed()
    return count / (time.perf_counter() - started)


def _rss_kib() -> int:
    with Path("/proc/self/status").open() as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def main(args: argparse.Namespace) -> None:
    servers: list[asyncio.Server] = []
    links: list[asyncio.Task[None]] = []
    echo, sink = await _serve(_echo, servers), await _serve(_sink, servers)
    relay = Relay(StandInIdentities())
    runner = web.AppRunner(relay.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/connect"
    async with aiohttp.ClientSession() as session:
        opener = await _node(1, url, session, {}, links)
        acceptor = await _node(2, url, session, {ECHO_PORT: echo, SINK_PORT: sink}, links)

        async def forwarder(port: int) -> int:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await opener.open(
                    peer=2, src_run=1, dst_run=2, port=port, reader=reader, writer=writer
                )

            return await _serve(handle, servers)

        peered_echo, peered_sink = await forwarder(ECHO_PORT), await forwarder(SINK_PORT)

        print(
            f"peering stream: one stream through the relay vs direct loopback TCP "
            f"(date {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores)"
        )
        direct = await _round_trips(echo, args.round_trips)
        peered = await _round_trips(peered_echo, args.round_trips)
        print(summary("round trip, direct TCP", direct))
        print(summary("round trip, through the relay", peered))
        added = statistics.median(peered) - statistics.median(direct)
        print(
            f"  added latency (median): {added:.3f} ms; p95 ratio "
            f"{percentile(peered, 0.95) / percentile(direct, 0.95):.1f}x"
        )

        direct_cps = await _connections(echo, args.connections)
        peered_cps = await _connections(peered_echo, args.connections)
        print(
            f"  connections/s (open, 1 byte echoed, close): direct {direct_cps:,.0f}, "
            f"through the relay {peered_cps:,.0f} ({peered_cps / direct_cps:.2f}x)"
        )

        direct_mbs = await _throughput(sink, args.megabytes)
        peered_mbs = await _throughput(peered_sink, args.megabytes)
        print(
            f"  throughput, {args.megabytes} MiB one way: direct {direct_mbs:,.0f} MiB/s, "
            f"through the relay {peered_mbs:,.0f} MiB/s ({peered_mbs / direct_mbs:.2f}x)"
        )

        before = _rss_kib()
        held = []
        for _ in range(args.streams):
            reader, writer = await asyncio.open_connection("127.0.0.1", peered_echo)
            writer.write(b"!")
            await reader.readexactly(1)
            held.append(writer)
        after = _rss_kib()
        print(
            f"  memory per open idle stream (both nodes and the relay, one process): "
            f"{(after - before) / args.streams:.1f} KiB over {args.streams} streams "
            f"({opener.open_streams} open at the opener)"
        )
        for writer in held:
            writer.close()
        await opener.close()
        await acceptor.close()
        for task in links:
            task.cancel()
        await asyncio.gather(*links, return_exceptions=True)
    for server in servers:
        server.close()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--streams", type=int, default=500)
    asyncio.run(main(parser.parse_args()))
