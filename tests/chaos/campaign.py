"""One chaos campaign: a real node process killed at random while a task stream runs.

The peers are real and private to the campaign: a vantage6 4.15.2 server (fresh sqlite)
with organizations A and B in a collaboration, a podman API service on its own socket, and
organization A's node as ``fednode start -c node.yaml`` in its own process. Two things run
at once:

* the **task stream** (:mod:`tests.chaos.workload`), created through the real vantage6
  user client at a steady pace, with the user killing some tasks through the server;
* the **fault schedule**: ``node_kills`` times (and on until the last task is created),
  wait a random moment after the node is ready (or, for a share of the kills, after it
  was started: during start-up and reconcile), SIGKILL it, wait a little, start it again;
  at random points of that schedule the server is restarted (SIGTERM, same database) and
  the podman service is restarted (its containers live on under conmon).

Then the node is left alone until every run has ended (or ``settle_seconds`` pass), stopped
cleanly, and :mod:`tests.chaos.accounting` judges from the server's and podman's records.
Every random choice comes from one RNG seeded with ``seed``; the seed is printed so a
schedule can be replayed (timings on a loaded machine still vary).
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from executors.base import LABEL_NODE, LABEL_RUN
from tests.chaos.accounting import Faults, Verdict, is_finished, judge, read_node_log
from tests.chaos.processes import NodeProcess, PodmanServiceProcess
from tests.chaos.userapi import UserApi
from tests.chaos.workload import PlannedTask, plan
from tests.peers import podman as podman_peer
from tests.peers.stack import CSV_OF, free_port, server_with_collaboration
from tests.peers.v6server import V6Collaboration, V6Server

Say = Callable[[str], None]


@dataclass(frozen=True)
class CampaignConfig:
    workdir: Path
    seed: int
    tasks: int = 300
    node_kills: int = 100
    server_restarts: int = 5
    podman_restarts: int = 5
    #: Seconds from the node's readiness to its SIGKILL, drawn uniformly.
    kill_after: tuple[float, float] = (1.0, 6.0)
    #: The share of kills that land 0-4 s after a start instead (start-up, reconcile).
    startup_kills: float = 0.2
    #: Seconds the node stays down, drawn uniformly.
    down_for: tuple[float, float] = (0.0, 2.0)
    #: How long the node gets, after the last fault, to end every run.
    settle_seconds: float = 600.0
    max_concurrent_runs: int = 16


@dataclass
class Researcher:
    """The server's side of a campaign: its collaboration and the user who sends tasks."""

    server: V6Server
    collab: V6Collaboration
    api: UserApi
    user_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Peers(Researcher):
    podman: PodmanServiceProcess = field(kw_only=True)
    node: NodeProcess = field(kw_only=True)
    node_name: str = field(kw_only=True)
    task_dir: Path = field(kw_only=True)


async def run_campaign(config: CampaignConfig, *, say: Say = print) -> Verdict:
    rng = random.Random(config.seed)
    say(
        f"chaos: seed {config.seed}: {config.tasks} tasks, {config.node_kills} node kills, "
        f"{config.server_restarts} server restarts, {config.podman_restarts} podman restarts"
    )
    began = int(time.time())
    config.workdir.mkdir(parents=True, exist_ok=True)
    with server_with_collaboration(config.workdir, prefix="chaos") as fed:
        podman = PodmanServiceProcess(config.workdir / "podman.sock")
        podman.start()
        try:
            return await _campaign(config, rng, fed.server, fed.collaboration, podman, began, say)
        finally:
            podman.stop()


async def _campaign(
    config: CampaignConfig,
    rng: random.Random,
    server: V6Server,
    collab: V6Collaboration,
    podman: PodmanServiceProcess,
    began: int,
    say: Say,
) -> Verdict:
    from tests.conformance.podman_harness import build_behaviour_image

    service = podman_peer.PodmanService(
        socket_path=podman.socket_path,
        base_image=podman_peer.BASE_IMAGE,
        average_image=podman_peer.AVERAGE_IMAGE,
        diagnostics_image=podman_peer.DIAGNOSTICS_IMAGE,
        data_dir=podman_peer.REPO / "algorithms" / "data",
    )
    probe_image = await asyncio.to_thread(build_behaviour_image, service)
    node_name = f"chaos-{uuid.uuid4().hex[:6]}"
    # Its own runs network (and so its own nftables table): other nodes on this host, and
    # test sessions that remove the default network's table, cannot drop its proxy port.
    network = node_name
    subnet = f"10.216.{uuid.uuid4().int % 256}.0/24"
    task_dir = config.workdir / "tasks"
    health_port = free_port()
    node_config = config.workdir / "node.yaml"
    node_config.write_text(
        yaml.safe_dump(
            {
                "name": node_name,
                "server_url": f"http://{server.host}",
                "port": server.port,
                "api_path": server.api_path,
                "api_key": collab.org_a.api_key,
                "task_dir": str(task_dir),
                "databases": [{"label": "default", "type": "csv", "uri": str(CSV_OF["a"])}],
                "executor": {
                    "kind": "podman",
                    "socket": podman.url,
                    "network": network,
                    "network_subnet": subnet,
                },
                "health": {"port": health_port},
                "proxy": {"port": free_port()},
                "max_concurrent_runs": config.max_concurrent_runs,
                "logging": {"level": "INFO", "format": "json"},
            }
        )
    )
    node = NodeProcess(
        config=node_config, log_path=config.workdir / "node.log", health_port=health_port
    )
    api = UserApi(
        api_url=server.api_url, username=server.root_username, password=server.root_password
    )
    peers = _Peers(
        server, collab, api, podman=podman, node=node, node_name=node_name, task_dir=task_dir
    )
    planned = plan(
        rng,
        tasks=config.tasks,
        probe_image=probe_image,
        average_image=podman_peer.AVERAGE_IMAGE,
        org_id=collab.org_a.id,
    )
    say("chaos: task mix " + json.dumps(Counter(t.kind for t in planned)))
    node.start()
    await _until_ready(node, timeout=120)
    faults = Faults()
    mean_cycle = sum(config.kill_after) / 2 + sum(config.down_for) / 2 + 4  # + start-up
    pace = mean_cycle * config.node_kills / max(config.tasks, 1)
    fault_rng = random.Random(rng.random())  # the stream's draws do not shift the faults'
    try:
        fed = asyncio.Event()
        await asyncio.gather(
            feed(peers, planned, rng, pace=pace, say=say, done=fed),
            _faults(peers, config, fault_rng, faults, say=say, feeding=fed),
        )
        node.start()
        say(f"chaos: faults done ({faults}); settling for up to {config.settle_seconds:.0f} s")
        await settle(peers, timeout=config.settle_seconds, say=say)
    finally:
        node.start()
        await _until_idle(node, timeout=60)
        code = node.stop()
        say(f"chaos: node stopped cleanly (exit {code})")
        await asyncio.to_thread(_remove_network, podman, network)
    runs, tasks = await server_records(peers)
    creates = {"containers": await asyncio.to_thread(_container_creates, node_name, began)}
    containers_left = await asyncio.to_thread(_containers_left, podman, node_name)
    run_dirs_left = sorted(task_dir.glob("run-*")) if task_dir.exists() else []
    return judge(
        faults=faults,
        planned=planned,
        tasks=tasks,
        runs=runs,
        creates=creates,
        node_log=read_node_log(node.log_path),
        objects_left=[f"container {name}" for name in containers_left],
        run_dirs_left=run_dirs_left,
    )


async def feed(
    peers: Researcher,
    planned: list[PlannedTask],
    rng: random.Random,
    *,
    pace: float,
    say: Say,
    done: asyncio.Event,
) -> None:
    """Create the planned tasks at a steady pace; the user kills the ``kill`` ones later."""
    killers: list[asyncio.Task[None]] = []
    for task in planned:
        async with peers.user_lock:
            created = await asyncio.to_thread(
                peers.api.create_task,
                collaboration=peers.collab.id,
                organization=peers.collab.org_a.id,
                input_=task.input,
                image=task.image,
                name=f"chaos-{task.kind}-{task.index}",
            )
        task.task_id = int(created["id"])
        if task.kill_after is not None:
            killers.append(asyncio.create_task(_kill_later(peers, task.task_id, task.kill_after)))
        if (task.index + 1) % 20 == 0:
            say(f"chaos: {task.index + 1}/{len(planned)} tasks created")
        await asyncio.sleep(rng.uniform(0, 2 * pace))
    done.set()
    await asyncio.gather(*killers)


async def _kill_later(peers: Researcher, task_id: int, delay: float) -> None:
    await asyncio.sleep(delay)
    async with peers.user_lock:
        await asyncio.to_thread(peers.api.kill_task, task_id)


async def _faults(
    peers: _Peers,
    config: CampaignConfig,
    rng: random.Random,
    faults: Faults,
    *,
    say: Say,
    feeding: asyncio.Event,
) -> None:
    """At least ``node_kills`` kills, and more until the last task is created."""
    kills = config.node_kills
    server_at = set(rng.sample(range(kills), min(config.server_restarts, kills)))
    podman_at = set(rng.sample(range(kills), min(config.podman_restarts, kills)))
    i = -1
    while (i := i + 1) < kills or not feeding.is_set():
        if rng.random() < config.startup_kills:
            await asyncio.sleep(rng.uniform(0, 4))  # while it starts up and reconciles
        else:
            await _until_ready(peers.node, timeout=180)
            await asyncio.sleep(rng.uniform(*config.kill_after))
        peers.node.kill()
        faults.node_kills += 1
        await asyncio.sleep(rng.uniform(*config.down_for))
        peers.node.start()
        if i in server_at:
            await restart_server(peers, rng, faults, say=say)
        if i in podman_at:
            await asyncio.sleep(rng.uniform(0, 3))
            await asyncio.to_thread(peers.podman.restart)
            faults.podman_restarts += 1
            say("chaos: podman service restarted")
        if (i + 1) % 10 == 0:
            say(f"chaos: {i + 1} node kills (at least {kills})")


async def restart_server(
    peers: Researcher, rng: random.Random, faults: Faults, *, say: Say
) -> None:
    """A moment after a node fault, the server restarted (SIGTERM, same database)."""
    await asyncio.sleep(rng.uniform(0, 3))
    async with peers.user_lock:
        await asyncio.to_thread(peers.server.restart)
    faults.server_restarts += 1
    say(f"chaos: server restarted ({peers.server.last_start_seconds:.1f} s to healthy)")


async def settle(peers: Researcher, *, timeout: float, say: Say) -> None:
    """Wait until no run of the collaboration is open (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = await every(peers, "run")
        open_runs = [r for r in runs if not is_finished(r["status"])]
        if not open_runs:
            return
        if time.monotonic() > deadline:
            say(f"chaos: {len(open_runs)} runs still open after {timeout:.0f} s")
            return
        await asyncio.sleep(3)


async def server_records(
    peers: Researcher,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every run (with its result) and every task of the collaboration, at the server."""
    runs = await every(peers, "run")
    results = {int(r["id"]): r.get("result") for r in await every(peers, "result")}
    for run in runs:  # the run listing leaves results out; /result has them
        run["result"] = results.get(int(run["id"]))
    return runs, await every(peers, "task")


async def every(peers: Researcher, what: str) -> list[dict[str, Any]]:
    """Every run (or result, or task) of the collaboration at the server."""
    async with peers.user_lock:
        return await asyncio.to_thread(peers.api.all, what, collaboration_id=peers.collab.id)


async def _until_ready(node: NodeProcess, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ((status := node.status()) and status.get("ready")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node was not ready within {timeout} s; see {node.log_path}")
        await asyncio.sleep(0.5)


async def _until_idle(node: NodeProcess, *, timeout: float) -> None:
    """Until the node has no run in flight (its cleanups done), or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = node.status()
        if status and status.get("ready") and status.get("runs_in_flight") == 0:
            await asyncio.sleep(2)  # the last cleanups are spawned after the count drops
            return
        await asyncio.sleep(1)


def _container_creates(node_name: str, since: int) -> Counter[int]:
    """Containers created per run since ``since``, from podman's own event log."""
    listing = subprocess.run(
        [
            "podman",
            "events",
            "--since",
            str(since),
            "--until",
            str(int(time.time()) + 1),
            "--filter",
            "event=create",
            "--filter",
            f"label={LABEL_NODE}={node_name}",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    creates: Counter[int] = Counter()
    for line in listing.stdout.splitlines():
        event = json.loads(line)
        run_id = (event.get("Attributes") or {}).get(LABEL_RUN)
        if run_id is not None:
            creates[int(run_id)] += 1
    return creates


def _remove_network(podman: PodmanServiceProcess, network: str) -> None:
    """The campaign's runs network and its nftables table (the node leaves both, by design)."""
    podman_peer._remove_firewall(network)
    subprocess.run(
        ["podman", "--url", podman.url, "network", "rm", network],
        capture_output=True,
        check=False,
    )


def _containers_left(podman: PodmanServiceProcess, node_name: str) -> list[str]:
    listing = subprocess.run(
        [
            "podman",
            "--url",
            podman.url,
            "ps",
            "-a",
            "--filter",
            f"label={LABEL_NODE}={node_name}",
            "--format",
            "{{.Names}} {{.Status}}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in listing.stdout.splitlines() if line.strip()]
