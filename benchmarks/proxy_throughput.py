"""Proxy throughput and added latency: fednode's proxy beside vantage6-node 4.15.2's own.

One command (from the repository root)::

    .venv/bin/python benchmarks/proxy_throughput.py [--quick] [--rounds 3]

Three ways to the same upstream, with the same run's token, for the same simple
authenticated GET an algorithm makes (``task.get``: ``GET /task/<id>``):

(a) ``direct``  — straight to the upstream (the floor: client + upstream cost);
(b) ``fednode`` — through ``proxy.make_proxy_app`` served by ``ProxyServer``, configured as
    in production: token lookup, allow-list, one pooled ClientSession, an OpenTelemetry
    span per request (SDK provider, batch processor, spans dropped by the exporter), a
    JSON access-log line (``node.logging``, written to /dev/null) and the request counted
    and timed in the node's Prometheus metrics (``node.metrics``);
(c) ``vantage6`` — ``vantage6.node.proxy_server`` from the real vantage6-node 4.15.2,
    installed in its own venv by ``scripts/v6node-proxy-setup`` (run here if needed) and
    served as that node serves it: a gevent ``WSGIServer`` in a thread, file access log
    (``scripts/v6node_proxy/serve.py``).

The upstream is a fast local stand-in for the server (a tiny aiohttp app answering a
task record of ~600 bytes after checking the bearer token) in its own process, so the
numbers are the proxies' cost, not the vantage6 server's (which answers in ~10-50 ms and
would hide both proxies). Everything is on 127.0.0.1; each piece is its own process.

The client is a minimal HTTP/1.1 client on asyncio streams (cheaper than any library
client, so it is less often the bottleneck), in two modes:

* ``per-request`` — a new TCP connection for every request, which is what the 4.x
  ``AlgorithmClient`` does (``requests.get`` without a session): the headline numbers;
* ``keep-alive`` — one connection reused, what a session-based client would do. The
  gevent server answers a reused connection only after the client's delayed ACK (~40 ms
  on Linux: Nagle's algorithm meets a response written in two pieces), so this mode shows
  a real, if avoidable, cost of the vantage6 proxy; it is reported, not the headline.

Latency: requests one after another (bounded in count and time); "added" is the proxied
percentile minus the direct one. Throughput: ``--connections`` clients in parallel, for
a bounded number of requests and time. With ``--rounds N`` the three are measured N times,
interleaved; the table shows medians over the rounds and each round's ratios are printed,
so one burst of load from elsewhere on the machine does not decide the result. The CPU
time of each serving process per request (from ``/proc``) is the number load disturbs
least. Beside it, the CPU of the whole chain per request (this client, the serving
process and, through a proxy, the upstream): on a machine with few cores the three share
them, so ``cores / chain CPU`` bounds the throughput of a proxy that uses a core's worth
at most, whatever the proxy itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # after PYTHONPATH: an A/B can run another tree's proxy
from benchmarks.stats import percentile, record, record_values  # noqa: E402

V6NODE_VENV = Path(os.environ.get("V6NODE_VENV", Path.home() / ".cache/fednode/v6node-venv"))
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOnsidGFza19pZCI6MX19.benchmark-container-token"
TASK = {
    "id": 1,
    "name": "average",
    "description": "benchmark task",
    "image": "harbor2.vantage6.ai/demo/average:latest",
    "status": "active",
    "collaboration": {"id": 1, "link": "/api/collaboration/1", "methods": ["GET", "PATCH"]},
    "init_org": {"id": 1, "link": "/api/organization/1", "methods": ["GET", "PATCH"]},
    "init_user": {"id": 1, "link": "/api/user/1", "methods": ["GET", "PATCH"]},
    "parent": None,
    "job_id": 1,
    "runs": "/api/run?task_id=1",
    "results": "/api/result?task_id=1",
    "children": "/api/task?parent_id=1",
    "databases": [{"label": "default", "parameters": "{}"}],
    "created_at": "2026-01-01T00:00:00.000000",
    "study": None,
    "algorithm_store": None,
}


# ---- the pieces, each run as its own process ---------------------------------------------


def serve_upstream(port: int) -> None:
    from aiohttp import web

    body = json.dumps(TASK).encode()

    async def task(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"msg": "unauthorized"}, status=401)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/task/{id}", task)
    print(f"READY {port}", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def serve_fednode(port: int, upstream_api_url: str) -> None:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from node.logging import configure_logging, direct_logger
    from node.metrics import NodeMetrics
    from proxy import ProxyServer, RunInfo, RunTable, make_proxy_app

    class DropSpans(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    class Plain:
        encrypted = False

        async def encrypt_for(self, organization_id: int, data: bytes) -> str:
            raise NotImplementedError

        def decrypt(self, data: str) -> bytes:
            raise NotImplementedError

    configure_logging(level="INFO", fmt="json", stream=Path(os.devnull).open("w"))  # noqa: SIM115
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropSpans()))
    runs = RunTable()
    trace = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    runs.add(TOKEN, RunInfo(1, 1, 1, 1, trace_context=trace))
    app = make_proxy_app(
        upstream_api_url=upstream_api_url,
        runs=runs,
        crypto=Plain(),
        tracer=provider.get_tracer("fednode"),
        metrics=NodeMetrics().proxy,
        access_log=direct_logger("proxy.access"),  # as node.app passes it
    )

    async def main() -> None:
        async with ProxyServer(app, host="127.0.0.1", port=port):
            print(f"READY {port}", flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())


# ---- the client -------------------------------------------------------------------------


class Connection:
    """An HTTP/1.1 client sending the same GET again and again; ``fresh``: a new TCP
    connection for each request (``Connection: close``), else one kept alive."""

    def __init__(self, port: int, path: str, *, fresh: bool) -> None:
        self.port = port
        self.fresh = fresh
        close = "Connection: close\r\n" if fresh else ""
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nAccept: */*\r\n{close}\r\n"
        ).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.reader, self.writer
        writer.write(self.request)
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        status = int(head[9:12])
        if b"transfer-encoding: chunked" in head:
            body = b""
            while size := int((await reader.readline()).strip(), 16):
                body += await reader.readexactly(size + 2)
            await reader.readline()
        else:
            start = head.index(b"content-length:") + 15
            length = int(head[start : head.index(b"\r\n", start)])
            body = await reader.readexactly(length)
        if self.fresh or b"connection: close" in head:
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Result:
    name: str
    mode: str
    p50_ms: float
    p99_ms: float
    rps: float
    cpu_us: float  # CPU time of the serving process per request, throughput phase
    chain_us: float  # client + serving process (+ upstream behind a proxy), per request
    latency_requests: int
    throughput_requests: int
    latencies: list[float]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    name: str,
    port: int,
    pid: int,
    path: str,
    fresh: bool,
    args: argparse.Namespace,
    upstream_pid: int | None = None,
) -> Result:
    mode = "per-request" if fresh else "keep-alive"
    connection = Connection(port, path, fresh=fresh)
    status, body = await connection.get()
    if status != 200 or json.loads(body)["id"] != 1:
        raise SystemExit(f"{name}: unexpected answer {status} {body[:200]!r}")
    for _ in range(args.warmup):
        await connection.get()
    latencies: list[float] = []
    deadline = time.perf_counter() + args.latency_seconds
    while len(latencies) < args.latency_requests and time.perf_counter() < deadline:
        started = time.perf_counter()
        await connection.get()
        latencies.append((time.perf_counter() - started) * 1e3)
    await connection.close()

    remaining = args.throughput_requests
    deadline = time.perf_counter() + args.seconds
    done = 0

    async def worker() -> None:
        nonlocal remaining, done
        mine = Connection(port, path, fresh=fresh)
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            status, _ = await mine.get()
            if status != 200:
                raise SystemExit(f"{name}: status {status} under load")
            done += 1
        await mine.close()

    chain = [pid] if upstream_pid is None else [pid, upstream_pid]
    cpu_before = cpu_seconds(pid)
    chain_before = sum(map(cpu_seconds, chain)) + time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.connections)))
    elapsed = time.perf_counter() - started
    cpu_us = (cpu_seconds(pid) - cpu_before) / done * 1e6
    chain_us = (sum(map(cpu_seconds, chain)) + time.process_time() - chain_before) / done * 1e6
    return Result(
        name,
        mode,
        statistics.median(latencies),
        percentile(latencies, 0.99),
        done / elapsed,
        cpu_us,
        chain_us,
        len(latencies),
        done,
        latencies,
    )


# ---- orchestration ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=log.open("wb"), cwd=REPO, env=dict(os.environ)
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith(b"READY"):
        process.kill()
        raise SystemExit(f"{argv[1:3]} did not start; see {log}:\n{log.read_text()[-2000:]}")
    return process


def ensure_v6node_venv() -> Path:
    python = V6NODE_VENV / "bin" / "python"
    subprocess.run([str(REPO / "scripts" / "v6node-proxy-setup")], check=True)
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-fednode", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0, help="cap per throughput run")
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure all three this many times, interleaved"
    )
    args = parser.parse_args()
    if args.serve_upstream:
        return serve_upstream(args.serve_upstream)
    if args.serve_fednode:
        return serve_fednode(args.serve_fednode, args.upstream)
    args.warmup = 50 if args.quick else 200
    args.latency_requests = 300 if args.quick else 2000
    args.latency_seconds = 1.5 if args.quick else 4.0
    args.throughput_requests = 2000 if args.quick else 20000

    v6_python = ensure_v6node_venv()
    logs = Path(tempfile.mkdtemp(prefix="fednode-proxy-bench-"))
    me = [sys.executable, str(Path(__file__).resolve())]
    upstream_port, fednode_port, v6_port = free_port(), free_port(), free_port()
    upstream_api = f"http://127.0.0.1:{upstream_port}/api"
    processes = []
    try:
        processes.append(spawn([*me, "--serve-upstream", str(upstream_port)], logs / "up.log"))
        processes.append(
            spawn(
                [*me, "--serve-fednode", str(fednode_port), "--upstream", upstream_api],
                logs / "fednode.log",
            )
        )
        processes.append(
            spawn(
                [
                    str(v6_python),
                    str(REPO / "scripts/v6node_proxy/serve.py"),
                    "--upstream",
                    upstream_api,
                    "--port",
                    str(v6_port),
                    "--log",
                    str(logs / "v6-proxy-access.log"),
                ],
                logs / "v6.log",
            )
        )
        pids = [process.pid for process in processes]
        results = asyncio.run(run_all(args, (upstream_port, fednode_port, v6_port), pids))
    finally:
        for process in processes:
            process.kill()
            process.wait()
    report(results, args, logs)


async def run_all(
    args: argparse.Namespace, ports: tuple[int, int, int], pids: list[int]
) -> list[Result]:
    upstream, fednode, v6 = ports
    results = []
    for _ in range(args.rounds):
        for fresh in (True, False):
            results.append(await measure("direct", upstream, pids[0], "/api/task/1", fresh, args))
            for name, port, pid in (("fednode", fednode, pids[1]), ("vantage6", v6, pids[2])):
                results.append(await measure(name, port, pid, "/task/1", fresh, args, pids[0]))
    return results


def combine(rounds: list[Result]) -> Result:
    """One path's rounds as one: medians of req/s and CPU, all latency samples."""
    latencies = [value for r in rounds for value in r.latencies]
    return Result(
        rounds[0].name,
        rounds[0].mode,
        statistics.median(latencies),
        percentile(latencies, 0.99),
        statistics.median(r.rps for r in rounds),
        statistics.median(r.cpu_us for r in rounds),
        statistics.median(r.chain_us for r in rounds),
        len(latencies),
        sum(r.throughput_requests for r in rounds),
        latencies,
    )


def report(results: list[Result], args: argparse.Namespace, logs: Path) -> None:
    print(
        f"\nproxy benchmark: GET /task/1 with a container token; fast local upstream stand-in; "
        f"{os.cpu_count()} CPUs; latency: sequential requests; throughput: "
        f"{args.connections} parallel clients (logs: {logs})"
    )
    for mode in ("per-request", "keep-alive"):
        per_path = {
            name: [r for r in results if r.mode == mode and r.name == name]
            for name in ("direct", "fednode", "vantage6")
        }
        direct, fednode, v6 = (combine(rounds) for rounds in per_path.values())
        print(
            f"\n[{mode} connections]" + (f", medians of {args.rounds} rounds" * (args.rounds > 1))
        )
        print(
            f"{'path':<9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} "
            f"{'+p99 ms':>8} {'CPU us/req':>10} {'chain us':>9}  requests (latency/throughput)"
        )
        for r in (direct, fednode, v6):
            added = (
                " " * 17
                if r is direct
                else f"{r.p50_ms - direct.p50_ms:8.3f} {r.p99_ms - direct.p99_ms:8.3f}"
            )
            print(
                f"{r.name:<9} {r.rps:8.0f} {r.p50_ms:8.3f} {r.p99_ms:8.3f} {added} "
                f"{r.cpu_us:10.0f} {r.chain_us:9.0f}  {r.latency_requests}/{r.throughput_requests}"
            )
        added_fed = fednode.p50_ms - direct.p50_ms
        added_v6 = v6.p50_ms - direct.p50_ms
        print(
            f"fednode vs vantage6: throughput {fednode.rps / v6.rps:.1f}x; added p50 "
            f"{added_fed:.3f} ms vs {added_v6:.3f} ms; added p99 "
            f"{fednode.p99_ms - direct.p99_ms:.3f} ms vs {v6.p99_ms - direct.p99_ms:.3f} ms; "
            f"CPU per request {v6.cpu_us / fednode.cpu_us:.1f}x less"
        )
        rounds = zip(per_path["fednode"], per_path["vantage6"], strict=True)
        ratios = [(f.rps / v.rps, v.cpu_us / f.cpu_us) for f, v in rounds]
        if len(ratios) > 1:
            print(
                "  per round, throughput / CPU-per-request ratio: "
                + ", ".join(f"{t:.1f}x/{c:.1f}x" for t, c in ratios)
            )
        for r in (direct, fednode, v6):
            ratio = ""
            if r is fednode:
                ratio = f"{fednode.rps / v6.rps:.1f}x vantage6's req/s"
            record_values(f"{mode}: {r.name} latency", r.latencies, ratio=ratio)
            record(f"{mode}: {r.name} req/s", median=round(r.rps), n=args.rounds, unit="req/s")
            cpu_ratio = f"{v6.cpu_us / r.cpu_us:.1f}x less than vantage6" if r is fednode else ""
            record(
                f"{mode}: {r.name} chain CPU/request",
                median=round(r.chain_us),
                n=args.rounds,
                unit="us",
            )
            record(
                f"{mode}: {r.name} CPU/request",
                median=round(r.cpu_us),
                n=args.rounds,
                unit="us",
                ratio=cpu_ratio,
            )


if __name__ == "__main__":
    main()
