"""What only the podman executor does, against real podman (the shared behaviour is in
``tests/conformance``): the container podman really created, the runs' internal network,
the proxy on its gateway and the nftables firewall that leaves runs only that, the
relays of network databases (open only to the runs that asked), pull
policies, GPU requests on a host without GPUs, and following podman's event stream across
a restart of the podman service itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from executors.podman.api import LibpodClient
from executors.podman.config import PodmanSettings
from executors.podman.containers import container_name
from executors.podman.executor import PodmanExecutor
from executors.podman.firewall import NFT_COMMANDS
from executors.spec import DatabaseMount, Phase, ProxyEndpoint, Reason, Resources
from policies.podman_firewall import PORTS_SET, removal_ruleset, table_name
from tests.conformance.harness import Behaviour, EventRecorder
from tests.conformance.podman_harness import PodmanHarness, build_behaviour_image
from tests.peers.podman import PodmanService
from tests.peers.postgres import PATIENTS, PostgresDatabase

pytestmark = [pytest.mark.podman, pytest.mark.slow]

IP_FREEBIND = 15  # linux/in.h; socket.IP_FREEBIND is missing from some Python builds


@pytest.fixture(scope="module")
def behaviour(podman_service: PodmanService) -> str:
    return build_behaviour_image(podman_service)


@pytest.fixture
async def make(podman_service: PodmanService, behaviour: str, tmp_path: Path) -> AsyncIterator[Any]:
    """``await make(**settings)`` → (executor, recorder, harness), all closed afterwards."""
    opened: list[tuple[PodmanExecutor, EventRecorder]] = []
    node_name = f"podman-it-{uuid.uuid4().hex[:8]}"

    def harness() -> PodmanHarness:
        return PodmanHarness(
            podman=podman_service,
            behaviour_image=behaviour,
            node_name=node_name,
            task_dir=tmp_path / "tasks",
        )

    async def _make(
        socket_path: Path | None = None, **settings: Any
    ) -> tuple[PodmanExecutor, EventRecorder, PodmanHarness]:
        url = f"unix://{socket_path}" if socket_path else podman_service.url
        made = harness()
        made.settings = PodmanSettings(socket=url, **settings)
        executor = await made.open_executor()
        recorder = EventRecorder(executor)
        opened.append((executor, recorder))
        return executor, recorder, made

    yield _make
    for executor, recorder in opened:
        await recorder.aclose()
        await executor.close()
    await harness().aclose()  # through the shared service: the test's own may be gone


async def inspect(podman: PodmanService, name: str) -> dict[str, Any]:
    client = LibpodClient(str(podman.socket_path), timeout=30)
    await client.open()
    try:
        document = await client.inspect_container(name)
    finally:
        await client.close()
    assert document is not None
    return document


async def test_the_container_podman_runs_is_isolated_and_limited_as_the_spec_says(
    make: Any, podman_service: PodmanService
) -> None:
    executor, events, harness = await make()
    spec = harness.spec(
        1, Behaviour(sleep=30), resources=Resources(cpu=0.5, memory_mb=128, pids=50)
    )

    await executor.start(spec)
    await events.wait_for(1, Phase.RUNNING, timeout=30)
    document = await inspect(podman_service, container_name(harness.node_name, 1))
    status = await asyncio.to_thread(Path(f"/proc/{document['State']['Pid']}/status").read_text)
    await executor.kill(1)

    host = document["HostConfig"]
    assert document["Config"]["User"] == "65532:65532"
    assert host["ReadonlyRootfs"] is True
    assert "CapEff:\t0000000000000000" in status
    assert "NoNewPrivs:\t1" in status
    assert "Seccomp:\t2" in status
    assert "no-new-privileges" in " ".join(host["SecurityOpt"] or [])
    assert host["NetworkMode"] == "none"
    assert host["Memory"] == 128 * 1024 * 1024
    assert host["NanoCpus"] == 500_000_000 or host["CpuQuota"] == 50_000
    assert host["PidsLimit"] == 50
    assert document["Config"]["Timeout"] == spec.deadline_seconds
    assert (await events.terminal(1, timeout=30)).phase is Phase.KILLED


@contextlib.asynccontextmanager
async def proxy_on(address: str) -> AsyncIterator[int]:
    """A stand-in for the node's proxy, listening on ``address`` before it exists.

    netavark gives the bridge its gateway address only while a container is attached, so
    the proxy binds with IP_FREEBIND (the arrangement ``docs/executors.md`` describes).
    """

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, 0))
    port = int(sock.getsockname()[1])
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield port
    finally:
        await runner.cleanup()


def nft(*args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    command = next(c for c in (shutil.which(n) for n in NFT_COMMANDS) if c is not None)
    return subprocess.run(
        [command, *args], input=script, check=False, capture_output=True, text=True
    )


@pytest.fixture
def run_network(podman_service: PodmanService) -> Iterator[tuple[str, str]]:
    """A fresh network name and subnet for one test; the network and the firewall tables
    the executor made for it are removed afterwards."""
    name = f"fednode-it-{uuid.uuid4().hex[:6]}"
    yield name, "10.213.77.0/24"
    subprocess.run(
        podman_service.cli("network", "rm", "-f", name), check=False, capture_output=True
    )
    removed = nft("-f", "-", script=removal_ruleset(name))
    assert removed.returncode == 0, removed.stderr


def allowed_ports(network: str) -> set[int]:
    listed = nft("-j", "list", "set", "inet", table_name(network), PORTS_SET)
    assert listed.returncode == 0, listed.stderr
    (entry,) = [e["set"] for e in json.loads(listed.stdout)["nftables"] if "set" in e]
    return set(entry.get("elem", []))


async def test_a_run_with_a_proxy_reaches_it_on_the_internal_networks_gateway_and_nothing_else(
    make: Any, run_network: tuple[str, str]
) -> None:
    network, subnet = run_network
    executor, events, harness = await make(network=network, network_subnet=subnet)
    gateway = harness.settings.network_gateway

    async with proxy_on(gateway) as port:
        spec = harness.diagnostics_spec(1, proxy=ProxyEndpoint(host=gateway, port=port))
        await executor.start(spec)
        end = await events.terminal(1, timeout=30)
        report = json.loads((await executor.collect(1)).output)
    # Starting a second run reuses the network (created once, idempotently).
    await executor.start(harness.spec(2, proxy=ProxyEndpoint(host=gateway, port=1)))
    second = await events.terminal(2, timeout=30)

    assert end.phase is Phase.SUCCEEDED
    assert report["proxy"]["reachable"] is True
    assert report["proxy"]["healthz"]["status"] == 200
    assert report["internet"]["reachable"] is False
    assert report["dns"]["resolves"] is False
    assert second.phase is Phase.SUCCEEDED
    assert allowed_ports(network) == {port, 1}  # the second run's port was added
    await executor.close()
    # Runs outlive a node restart and call the same port again: it stays allowed.
    assert allowed_ports(network) == {port, 1}
    client = LibpodClient(harness.settings.socket_path, timeout=30)
    await client.open()
    try:
        described = await client.inspect_network(network)
    finally:
        await client.close()
    assert described is not None
    assert described["internal"] is True
    assert described["subnets"][0]["gateway"] == gateway


@contextlib.contextmanager
def peer_run(podman: PodmanService, network: str, address: str, port: int) -> Iterator[None]:
    """Another container on the runs' network at ``address``, serving HTTP on ``port``.

    Started with the podman CLI (it is no run of the executor's) and waited for from the
    host, before any run applies the firewall (which also drops the host's view of it).
    """
    name = f"fednode-it-peer-{uuid.uuid4().hex[:6]}"
    run = ["run", "-d", "--name", name, "--network", network, "--ip", address]
    serve = ["python3", "-m", "http.server", str(port), "--bind", "0.0.0.0"]
    started = subprocess.run(
        podman.cli(*run, podman.base_image, *serve),
        check=False,
        capture_output=True,
        text=True,
    )
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((address, port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"the peer at {address}:{port} never listened"
                time.sleep(0.1)
        yield
    finally:
        subprocess.run(podman.cli("rm", "-f", "-t", "0", name), check=False, capture_output=True)


@pytest.mark.parametrize("firewall", ["nftables", "off"])
async def test_behind_the_firewall_a_run_reaches_the_proxy_and_no_other_host_service_nor_run(
    make: Any, podman_service: PodmanService, run_network: tuple[str, str], firewall: str
) -> None:
    network, subnet = run_network
    executor, events, harness = await make(
        network=network, network_subnet=subnet, firewall=firewall
    )
    gateway, peer = harness.settings.network_gateway, "10.213.77.50"
    create = ["network", "create", "--internal", "--disable-dns", "--subnet", subnet]
    await asyncio.to_thread(
        subprocess.run,
        podman_service.cli(*create, "--gateway", gateway, network),
        check=True,
        capture_output=True,
    )

    with peer_run(podman_service, network, peer, 8080):
        # The second listener stands for any host service: on the gateway, another port.
        async with proxy_on(gateway) as port, proxy_on(gateway) as other:
            spec = harness.diagnostics_spec(
                1,
                proxy=ProxyEndpoint(host=gateway, port=port),
                targets=[f"{gateway}:{other}", f"{peer}:8080"],
            )
            await executor.start(spec)
            end = await events.terminal(1, timeout=30)
            report = json.loads((await executor.collect(1)).output)

    reached = {a["target"]: a["reachable"] for a in report["internet"]["attempts"]}
    assert end.phase is Phase.SUCCEEDED
    assert report["proxy"]["healthz"]["status"] == 200
    open_ = firewall == "off"  # without it both are reachable: the test sees the difference
    assert reached == {f"{gateway}:{other}": open_, f"{peer}:8080": open_}


async def test_a_network_with_a_route_out_is_refused(
    make: Any, podman_service: PodmanService, run_network: tuple[str, str]
) -> None:
    network, _ = run_network
    await asyncio.to_thread(
        subprocess.run,
        podman_service.cli("network", "create", "--subnet", "10.213.78.0/24", network),
        check=True,
        capture_output=True,
    )
    executor, events, harness = await make(network=network)

    await executor.start(harness.spec(1, proxy=ProxyEndpoint(host="10.213.78.1", port=1)))
    end = await events.terminal(1, timeout=30)

    assert (end.phase, end.reason) == (Phase.FAILED, Reason.START_FAILED)
    assert "not internal" in end.message
    assert not await harness.object_exists(1)


async def test_pull_policy_never_fails_a_missing_image_at_once(make: Any) -> None:
    executor, events, harness = await make(pull_policy="never")

    began = time.monotonic()
    await executor.start(harness.missing_image_spec(1))
    end = await events.terminal(1, timeout=10)

    assert (end.phase, end.reason) == (Phase.FAILED, Reason.IMAGE_NOT_FOUND)
    assert "pull policy: never" in end.message
    assert time.monotonic() - began < 1


async def test_pull_policy_always_pulls_even_a_local_image_and_reports_why_it_failed(
    make: Any,
) -> None:
    executor, events, harness = await make(pull_policy="always")

    await executor.start(harness.spec(1))  # localhost/fednode/behaviour: no registry serves it
    end = await events.terminal(1, timeout=60)

    assert (end.phase, end.reason) == (Phase.FAILED, Reason.IMAGE_NOT_FOUND)
    assert "could not be pulled" in end.message


async def test_a_gpu_request_on_a_host_without_cdi_devices_fails_the_start_with_the_reason(
    make: Any,
) -> None:
    executor, events, harness = await make(gpu_devices=["nvidia.com/gpu=0"])
    unconfigured, unconfigured_events, _ = await make()

    await executor.start(harness.spec(1, resources=Resources(gpus=1)))
    await unconfigured.start(harness.spec(2, resources=Resources(gpus=1)))
    end = await events.terminal(1, timeout=30)
    refused = await unconfigured_events.terminal(2, timeout=30)

    assert (end.phase, end.reason) == (Phase.FAILED, Reason.START_FAILED)
    assert "nvidia.com/gpu=0" in end.message
    assert (refused.phase, refused.reason) == (Phase.FAILED, Reason.NOT_ALLOWED)
    assert "executor.gpu_devices" in refused.message


async def test_without_the_exit_watch_the_event_stream_alone_reports_every_end(
    make: Any,
) -> None:
    executor, events, harness = await make(exits_dir=None)

    await asyncio.gather(*(executor.start(harness.spec(i, Behaviour(exit_code=i))) for i in (0, 5)))
    ends = [await events.terminal(i, timeout=30) for i in (0, 5)]
    await events.settle()

    assert [(e.phase, e.exit_code) for e in ends] == [(Phase.SUCCEEDED, 0), (Phase.FAILED, 5)]
    assert events.phases(5) == [Phase.STARTING, Phase.RUNNING, Phase.FAILED]


def start_service(socket_path: Path) -> subprocess.Popen[bytes]:
    podman = shutil.which("podman")
    assert podman is not None
    process = subprocess.Popen(
        [podman, "system", "service", "--time=0", f"unix://{socket_path}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while True:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(socket_path))
                return process
            except OSError:
                if time.monotonic() > deadline:
                    process.kill()
                    raise
        time.sleep(0.05)


def stop_service(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=30)


async def test_when_the_podman_service_restarts_the_executor_reconnects_and_misses_no_end(
    make: Any, tmp_path: Path
) -> None:
    socket_path = tmp_path / "own-podman.sock"
    service = await asyncio.to_thread(start_service, socket_path)
    try:
        # The exit watch would see the end without podman's API; switch it off to show
        # that the stream's reconnect and re-list alone catch what happened meanwhile.
        executor, events, harness = await make(socket_path, exits_dir=None)
        await executor.start(harness.spec(1, Behaviour(sleep=2, output="meanwhile")))
        await executor.start(harness.spec(2, Behaviour(sleep=6, output="later")))
        await events.wait_for(2, Phase.RUNNING, timeout=30)

        await asyncio.to_thread(stop_service, service)
        await asyncio.sleep(3)  # run 1 ends while podman's API is down
        service = await asyncio.to_thread(start_service, socket_path)

        first = await events.terminal(1, timeout=30)
        second = await events.terminal(2, timeout=30)
        await events.settle()
        assert (first.phase, (await executor.collect(1)).output) == (
            Phase.SUCCEEDED,
            b"meanwhile",
        )
        assert (second.phase, (await executor.collect(2)).output) == (Phase.SUCCEEDED, b"later")
        assert events.phases(1) == [Phase.STARTING, Phase.RUNNING, Phase.SUCCEEDED]
    finally:
        await asyncio.to_thread(stop_service, service)


SQLPROBE_IMAGE = "localhost/fednode/sqlprobe:latest"


@pytest.fixture(scope="module")
def sqlprobe(podman_service: PodmanService) -> str:
    present = subprocess.run(
        podman_service.cli("image", "exists", SQLPROBE_IMAGE), check=False, capture_output=True
    )
    if present.returncode != 0:
        pytest.fail(f"{SQLPROBE_IMAGE} is missing. Run `scripts/podman-setup` first.")
    return SQLPROBE_IMAGE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


@pytest.mark.postgres
@pytest.mark.parametrize("firewall", ["nftables", "off"])
async def test_only_a_run_that_asked_for_a_network_database_reads_it_and_neither_reaches_more(
    make: Any,
    run_network: tuple[str, str],
    postgres_database: PostgresDatabase,
    sqlprobe: str,
    firewall: str,
) -> None:
    network, _ = run_network
    subnet = "10.213.79.0/24"
    executor, events, harness = await make(
        network=network, network_subnet=subnet, firewall=firewall, database_relay_port=free_port()
    )
    gateway = harness.settings.network_gateway
    configured = DatabaseMount(
        label="clinic", type="sql", uri=postgres_database.uri, is_local_path=False
    )
    (clinic,) = await executor.relay_databases((configured,))
    relay = f"{gateway}:{clinic.run_port}"
    query = "select id, age, department from patients order by id"

    async with proxy_on(gateway) as port, proxy_on(gateway) as other:
        proxy = ProxyEndpoint(host=gateway, port=port)
        # Besides its database: another service on the gateway, the database server's own
        # port on the host's gateway address, and a host on the internet, by address.
        targets = [f"{gateway}:{other}", f"{gateway}:{postgres_database.port}", "1.1.1.1:443"]
        task = {"label": "clinic", "query": query, "targets": targets, "timeout": 2}
        for run_id, requested in ((1, ("clinic",)), (2, ())):
            await executor.start(
                harness._spec(
                    run_id,
                    sqlprobe,
                    json.dumps(task).encode(),
                    databases=(clinic,),
                    requested=[{"label": label} for label in requested],
                    proxy=proxy,
                    requested_databases=requested,
                )
            )
        ends = [await events.terminal(run_id, timeout=60) for run_id in (1, 2)]
        asked, not_asked = [json.loads((await executor.collect(r)).output) for r in (1, 2)]

    assert [end.phase for end in ends] == [Phase.SUCCEEDED, Phase.SUCCEEDED]
    # Both were told the relay on the gateway, not the database's own address.
    assert {(r["uri_host"], r["uri_port"]) for r in (asked, not_asked)} == {
        (gateway, clinic.run_port)
    }
    assert asked.get("error") is None, asked
    assert [tuple(row) for row in asked["rows"]] == list(PATIENTS)
    assert "rows" not in not_asked
    assert not_asked["error"], not_asked
    if firewall == "nftables":  # off: the host's services are open (the test above shows it)
        for report in (asked, not_asked):
            assert [a["reachable"] for a in report["attempts"]] == [False] * 3, report
    await executor.cleanup(1)
    await executor.cleanup(2)
    if firewall == "nftables":  # the run's address is taken out with it
        listed = nft("-j", "list", "set", "inet", table_name(network), "db_access")
        assert listed.returncode == 0, listed.stderr
        (entry,) = [e["set"] for e in json.loads(listed.stdout)["nftables"] if "set" in e]
        assert not entry.get("elem"), (entry, relay)


@pytest.mark.postgres
async def test_after_a_restart_the_relays_open_again_to_the_running_runs_that_asked(
    make: Any,
    run_network: tuple[str, str],
    postgres_database: PostgresDatabase,
) -> None:
    network, _ = run_network
    subnet, relay_port = "10.213.80.0/24", free_port()
    settings = {"network": network, "network_subnet": subnet, "database_relay_port": relay_port}
    configured = DatabaseMount(
        label="clinic", type="sql", uri=postgres_database.uri, is_local_path=False
    )
    first, events, harness = await make(**settings)
    gateway = harness.settings.network_gateway
    (clinic,) = await first.relay_databases((configured,))
    async with proxy_on(gateway) as port:
        spec = harness.spec(
            1,
            Behaviour(sleep=120),
            proxy=ProxyEndpoint(host=gateway, port=port),
            databases=(clinic,),
            requested=[{"label": "clinic"}],
            requested_databases=("clinic",),
        )
        await first.start(spec)
        await events.wait_for(1, Phase.RUNNING, timeout=60)
        await first.close()  # the node stops; the run goes on

        second, _, _ = await make(**settings)
        await second.relay_databases((configured,))
        (relay,) = second._relays.values()
        admitted = set(relay.admitted)
        listed = nft("-j", "list", "set", "inet", table_name(network), "db_access")
        await second.kill(1)

    assert listed.returncode == 0, listed.stderr
    (entry,) = [e["set"] for e in json.loads(listed.stdout)["nftables"] if "set" in e]
    pairs = [tuple(e["concat"]) for e in entry.get("elem", [])]
    (address,) = admitted
    assert pairs == [(address, relay_port)]


@pytest.mark.postgres
async def test_a_database_named_by_host_name_is_reached_by_that_name_through_the_relay(
    make: Any,
    run_network: tuple[str, str],
    postgres_database: PostgresDatabase,
    sqlprobe: str,
) -> None:
    """A URI's host *name* stays in what the run is told (TLS would check it): the run's
    hosts file maps it to the relay. The name is this host's own, which resolves here."""
    name = socket.gethostname()
    network, _ = run_network
    executor, events, harness = await make(
        network=network, network_subnet="10.213.81.0/24", database_relay_port=free_port()
    )
    gateway = harness.settings.network_gateway
    db = postgres_database
    uri = f"postgresql://{db.user}:{db.password}@{name}:{db.port}/{db.database}"
    (clinic,) = await executor.relay_databases(
        (DatabaseMount(label="clinic", type="sql", uri=uri, is_local_path=False),)
    )
    task = {"label": "clinic", "query": "select count(*) from patients", "timeout": 5}
    async with proxy_on(gateway) as port:
        await executor.start(
            harness._spec(
                1,
                sqlprobe,
                json.dumps(task).encode(),
                databases=(clinic,),
                requested=[{"label": "clinic"}],
                proxy=ProxyEndpoint(host=gateway, port=port),
                requested_databases=("clinic",),
            )
        )
        end = await events.terminal(1, timeout=60)
        report = json.loads((await executor.collect(1)).output)

    assert end.phase is Phase.SUCCEEDED
    assert (report["uri_host"], report["uri_port"]) == (name, clinic.run_port)
    assert report.get("error") is None, report
    assert report["rows"] == [[len(PATIENTS)]]
