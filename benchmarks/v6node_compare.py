"""fednode's podman node beside vantage6-node 4.15.2, on one server, one podman, one image.

What an operator would otherwise run is the vantage6 4.x node; this measures both on the
same machine in the same run, each as its own process so that its CPU and memory are its
own:

* **fednode**: ``python -m node start`` with the podman executor (organization A);
* **vantage6-node 4.15.2** from PyPI: ``vnode-local start`` (the node outside a
  container, as vantage6 documents for development; organization B), from the venv that
  ``scripts/v6node-proxy-setup`` builds, through ``benchmarks/v6node_launch.py`` (two
  shims without which it cannot start outside a container here; see there), talking to
  podman through podman's Docker-compatible API (``DOCKER_HOST`` = the same
  ``podman system service`` socket);

both on one real vantage6-server 4.15.2 (a fresh one, ``tests/peers``) and running the
same algorithm image (the conformance suite's behaviour image, which follows the vantage6
4.x file contract).

Every time comes from a peer, not from either node: *task created* is the server's own
``task.created_at``; *container started* and *container exit* are podman's ``start`` and
``died`` events (``timeNano``); *result at the server* is when the run's row in the
server's database first holds its result and a final status (the database is read every
20 ms, read-only, so that number is up to 20 ms late for both nodes alike). One clock: all
are this machine's.

Phases, one node at a time (the other idles):

1. sequential: ``--runs`` tasks per node, one after another, alternating the nodes;
2. bursts: ``--bursts`` (default 50 and 200) tasks created as fast as the server takes
   them, per node: time from the first task created to the last result, runs with no
   result by the deadline (120 s + 4 s per task after the last one was created: lost, or
   not yet done), wrong results (not the task's own output), runs whose container started
   more than once; node CPU per run and RSS (peak sampled every 0.2 s).

Prints median, p95 and max and the ratio vantage6 / fednode for each.

    .venv/bin/python benchmarks/v6node_compare.py [--runs 20] [--bursts 50,200]

Needs ``scripts/podman-setup``, ``scripts/v6server-setup`` and
``scripts/v6node-proxy-setup`` (run here). Benchmark only: not part of CI. It bounds
every wait and stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.stats import percentile, summary  # noqa: E402
from executors.podman.api import LibpodClient  # noqa: E402
from executors.podman.containers import container_name  # noqa: E402
from tests.conformance.podman_harness import build_behaviour_image  # noqa: E402
from tests.peers import podman as podman_peer  # noqa: E402
from tests.peers.podman import PodmanService  # noqa: E402
from tests.peers.stack import CSV_OF, free_port, server_with_collaboration  # noqa: E402
from tests.peers.v6server import V6Collaboration, V6Org  # noqa: E402

V6NODE_VENV = Path(
    os.environ.get("V6NODE_VENV", Path.home() / ".cache" / "fednode" / "v6node-venv")
)
LAUNCH = Path(__file__).with_name("v6node_launch.py")
FINAL = {"completed", "failed", "crashed", "start failed", "non-existing Docker image"}
POLL_DB = 0.02


# ---- the two nodes ----------------------------------------------------------------------


@dataclass
class NodeProcess:
    label: str
    org: V6Org
    process: subprocess.Popen[bytes]
    log_path: Path
    container_prefix: str  # its run containers are named <prefix><run id>

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def start_fednode(workdir: Path, org: V6Org, *, server: Any, socket: Path) -> NodeProcess:
    name = f"fednode-cmp-{uuid.uuid4().hex[:6]}"
    config = {
        "name": name,
        "server_url": f"http://{server.host}",
        "port": server.port,
        "api_path": server.api_path,
        "api_key": org.api_key,
        "task_dir": str(workdir / "tasks-fednode"),
        "databases": [{"label": "default", "type": "csv", "uri": str(CSV_OF["a"])}],
        "executor": {"kind": "podman", "socket": f"unix://{socket}", "pull_policy": "never"},
        "health": {"port": free_port()},
        "proxy": {"port": free_port()},
        "logging": {"level": "WARNING"},
    }
    path = workdir / "fednode.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    log_path = workdir / "fednode.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "node", "start", "--config", str(path)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    prefix = container_name(name, 0).removesuffix("0")
    return NodeProcess("fednode", org, process, log_path, prefix)


def start_v6node(workdir: Path, org: V6Org, *, server: Any, socket: Path) -> NodeProcess:
    home = workdir / "v6node"
    home.mkdir()
    config = {
        "api_key": org.api_key,
        "server_url": f"http://{server.host}",
        "port": server.port,
        "api_path": server.api_path,
        "task_dir": str(home / "tasks"),
        "databases": [{"label": "default", "uri": str(CSV_OF["b"]), "type": "csv"}],
        "encryption": {"enabled": False, "private_key": None},
        "logging": {
            "backup_count": 1,
            "datefmt": "%Y-%m-%d %H:%M:%S",
            "file": str(home / "node.log"),
            "format": "%(asctime)s - %(name)-14s - %(levelname)-8s - %(message)s",
            "level": "INFO",
            "max_size": 1024,
            "use_console": True,
            "loggers": [
                {"level": "warning", "name": name}
                for name in ("urllib3", "requests", "engineio.client", "docker.utils.config")
            ],
        },
    }
    name = f"v6cmp-{uuid.uuid4().hex[:6]}"  # the config's stem is the node's name
    path = home / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=2))
    env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{socket}",
        "PROXY_SERVER_PORT": str(free_port()),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_STATE_HOME": str(home / "state"),
        "HOME": str(home),
    }
    log_path = workdir / "v6node.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(V6NODE_VENV / "bin" / "python"), str(LAUNCH), "--config", str(path)],
            cwd=home,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    # its containers: vantage6-<name>-run-<id>; its volumes and network:
    # vantage6-<name>-user-…, as vnode-local --user names them
    return NodeProcess("vantage6-node 4.15.2", org, process, log_path, f"vantage6-{name}-run-")


def stop(node: NodeProcess) -> None:
    if node.alive():
        node.process.terminate()
        try:
            node.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(timeout=20)


# ---- what the peers saw -----------------------------------------------------------------


@dataclass
class Seen:
    since: float = field(default_factory=time.time)
    created: dict[int, float] = field(default_factory=dict)  # run -> task.created_at
    task_of: dict[int, int] = field(default_factory=dict)
    org_of: dict[int, int] = field(default_factory=dict)
    result_at: dict[int, float] = field(default_factory=dict)
    result: dict[int, str | None] = field(default_factory=dict)
    status: dict[int, str] = field(default_factory=dict)
    started: dict[int, list[float]] = field(default_factory=dict)
    died: dict[int, list[float]] = field(default_factory=dict)


def _utc(text: str) -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC).timestamp()


def read_runs(db: Path, since: int) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return connection.execute(
            "SELECT run.id, run.task_id, run.organization_id, run.status, run.result, "
            "task.created_at FROM run JOIN task ON run.task_id = task.id WHERE run.id >= ?",
            (since,),
        ).fetchall()
    finally:
        connection.close()


async def watch_database(db: Path, seen: Seen) -> None:
    lowest = 0
    while True:
        rows = await asyncio.to_thread(read_runs, db, lowest)
        now = time.time()
        for run_id, task_id, org_id, status, result, created_at in rows:
            seen.task_of[run_id] = task_id
            seen.org_of[run_id] = org_id
            if created_at:
                seen.created[run_id] = _utc(created_at)
            if status in FINAL and run_id not in seen.result_at:
                seen.result_at[run_id] = now
                seen.result[run_id] = result
                seen.status[run_id] = status
        pending = [r for r in seen.task_of if r not in seen.result_at]
        lowest = min(pending) if pending else max(seen.task_of, default=0) + 1
        await asyncio.sleep(POLL_DB)


def run_of(name: str, prefixes: list[str]) -> int | None:
    for prefix in prefixes:
        rest = name.removeprefix(prefix)
        if rest != name and rest.isdigit():
            return int(rest)
    return None


async def watch_podman(socket: Path, seen: Seen, prefixes: list[str]) -> None:
    """podman's start and died events of the two nodes' run containers (podman's storage
    is shared with other users of this machine: only these names count)."""
    api = LibpodClient(str(socket), timeout=30)
    await api.open()
    try:
        filters = {"type": ["container"], "event": ["start", "died"]}
        async with api.events(filters=filters) as events:
            async for event in events:
                actor = event.get("Actor") or {}
                name = (actor.get("Attributes") or {}).get("name") or event.get("Name") or ""
                run_id = run_of(name, prefixes)
                when = int(event.get("timeNano") or 0) / 1e9
                if run_id is None or when < seen.since:  # the stream replays the past
                    continue
                action = event.get("Action") or event.get("Status")
                times = (seen.started if action == "start" else seen.died).setdefault(run_id, [])
                if when not in times:  # podman may deliver one event twice (same timeNano)
                    times.append(when)
    finally:
        await api.close()


@dataclass
class Usage:
    cpu: float = 0.0
    rss_peak: float = 0.0
    rss_end: float = 0.0


async def sample_rss(node: NodeProcess, usage: Usage) -> None:
    while True:
        with contextlib.suppress(OSError):
            usage.rss_peak = max(usage.rss_peak, node.rss_mib())
        await asyncio.sleep(0.2)


# ---- phases -----------------------------------------------------------------------------


def output_of(tag: str) -> str:
    return json.dumps({"tag": tag})


async def create(collab: V6Collaboration, org: V6Org, image: str, tag: str, sleep: float) -> int:
    task = await asyncio.to_thread(
        collab.create_task,
        input_={"sleep": sleep, "output": output_of(tag)},
        image=image,
        organizations=[org.id],
        name=f"cmp-{tag}",
    )
    return int(task["id"])


async def wait_results(seen: Seen, task_ids: set[int], *, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done = {seen.task_of[r] for r in seen.result_at if r in seen.task_of}
        if task_ids <= done:
            return True
        await asyncio.sleep(0.05)
    return False


@dataclass
class Sample:
    """One node's runs in one phase."""

    runs: list[int]
    expected: dict[int, str]  # task id -> its output
    seconds: float = 0.0  # first created -> last result (bursts)
    create_seconds: float = 0.0
    usage: Usage = field(default_factory=Usage)

    def started(self, seen: Seen) -> list[float]:
        return [
            (seen.started[r][0] - seen.created[r]) * 1000
            for r in self.runs
            if r in seen.started and r in seen.created
        ]

    def delivered(self, seen: Seen) -> list[float]:
        return [
            (seen.result_at[r] - seen.died[r][-1]) * 1000
            for r in self.runs
            if r in seen.died and r in seen.result_at
        ]

    def lost(self, seen: Seen) -> int:
        return sum(1 for r in self.runs if r not in seen.result_at)

    def wrong(self, seen: Seen) -> int:
        bad = 0
        for r in self.runs:
            if r not in seen.result_at:
                continue
            want = self.expected[seen.task_of[r]]
            if seen.status.get(r) != "completed" or decode(seen.result.get(r)) != want:
                bad += 1
        return bad

    def restarted(self, seen: Seen) -> int:
        return sum(1 for r in self.runs if len(seen.started.get(r, [])) > 1)


def decode(result: str | None) -> str | None:
    """The output bytes the run's result carries (unencrypted: base64 of them)."""
    if result is None:
        return None
    with contextlib.suppress(ValueError):
        return base64.b64decode(result).decode()
    return result


def runs_of(seen: Seen, task_ids: set[int]) -> list[int]:
    return sorted(r for r, t in seen.task_of.items() if t in task_ids)


async def sequential(
    nodes: list[NodeProcess], collab: V6Collaboration, image: str, seen: Seen, runs: int
) -> dict[str, Sample]:
    tasks: dict[str, dict[int, str]] = {node.label: {} for node in nodes}
    for i in range(runs):
        for node in nodes:
            tag = f"seq-{node.org.id}-{i}"
            task_id = await create(collab, node.org, image, tag, 0.2)
            tasks[node.label][task_id] = output_of(tag)
            if not await wait_results(seen, {task_id}, seconds=60):
                print(f"  {node.label}: task {task_id} had no result within 60 s", flush=True)
    return {
        label: Sample(runs_of(seen, set(expected)), expected) for label, expected in tasks.items()
    }


async def burst(
    node: NodeProcess, collab: V6Collaboration, image: str, seen: Seen, size: int
) -> Sample:
    usage = Usage(rss_peak=node.rss_mib())
    sampler = asyncio.create_task(sample_rss(node, usage))
    cpu_before = node.cpu_seconds()
    expected: dict[int, str] = {}
    began = time.monotonic()
    for i in range(size):
        tag = f"burst{size}-{node.org.id}-{i}"
        expected[await create(collab, node.org, image, tag, 0.0)] = output_of(tag)
    created = time.monotonic() - began
    await wait_results(seen, set(expected), seconds=120 + 4 * size)
    usage.cpu = node.cpu_seconds() - cpu_before
    usage.rss_end = node.rss_mib()
    sampler.cancel()
    await asyncio.gather(sampler, return_exceptions=True)
    sample = Sample(runs_of(seen, set(expected)), expected, create_seconds=created, usage=usage)
    created_at = [seen.created[r] for r in sample.runs if r in seen.created]
    results_at = [seen.result_at[r] for r in sample.runs if r in seen.result_at]
    if created_at and results_at:
        sample.seconds = max(results_at) - min(created_at)
    return sample


# ---- report -----------------------------------------------------------------------------


def stats_line(title: str, values: list[float]) -> str:
    return summary(title, values, width=34, indent=4)


def ratio_line(title: str, fed: list[float], v6: list[float]) -> str:
    if not fed or not v6:
        return f"    {title:<34} (no ratio: a side has no samples)"
    parts = []
    for name, pick in (
        ("median", statistics.median),
        ("p95", lambda v: percentile(v, 0.95)),
        ("max", max),
    ):
        parts.append(f"{name} {pick(v6) / max(pick(fed), 1e-3):.1f}x")
    return f"    {title:<34} vantage6 / fednode: " + ", ".join(parts)


def report_latency(title: str, samples: dict[str, Sample], seen: Seen, labels: list[str]) -> None:
    print(f"\n== {title} ==")
    for label in labels:
        sample = samples[label]
        print(f"  {label}:")
        print(stats_line("task created -> container started", sample.started(seen)))
        print(stats_line("container exit -> result at server", sample.delivered(seen)))
        print(
            f"    no result by the deadline {sample.lost(seen)}, wrong {sample.wrong(seen)}, "
            f"started twice {sample.restarted(seen)} (of {len(sample.expected)} tasks)"
        )
        for r in sample.runs:
            if len(seen.started.get(r, [])) > 1:
                starts = ", ".join(f"{t - seen.started[r][0]:+.3f} s" for t in seen.started[r])
                print(f"      run {r}: podman start events at {starts}; died {seen.died.get(r)}")
    if len(labels) == 2:
        fed, v6 = (samples[label] for label in labels)
        print(ratio_line("created -> started", fed.started(seen), v6.started(seen)))
        print(ratio_line("exit -> result", fed.delivered(seen), v6.delivered(seen)))


def report_burst(size: int, samples: dict[str, Sample], seen: Seen, labels: list[str]) -> None:
    report_latency(f"burst of {size} tasks (algorithm exits at once)", samples, seen, labels)
    for label in labels:
        sample = samples[label]
        n = max(1, len(sample.expected))
        print(
            f"  {label}: first task created -> last result {sample.seconds:.1f} s "
            f"(creating the {size} tasks took {sample.create_seconds:.1f} s); node CPU "
            f"{sample.usage.cpu:.1f} s = {sample.usage.cpu * 1000 / n:.0f} ms per run; RSS peak "
            f"{sample.usage.rss_peak:.0f} MiB, after {sample.usage.rss_end:.0f} MiB"
        )
    if len(labels) == 2:
        fed, v6 = (samples[label] for label in labels)
        if fed.seconds and v6.seconds:
            print(f"  time to all results, vantage6 / fednode: {v6.seconds / fed.seconds:.1f}x")


# ---- driver -----------------------------------------------------------------------------


def as_root(image: str, workdir: Path) -> str:
    """The behaviour image with ``USER 0``: the one image both nodes run.

    The behaviour image runs as uid 1000. vantage6-node 4.x starts a container as its
    image's user and leaves the run's folder root's, 0755, so an image that is not root
    cannot write its output there (seen: ``PermissionError: '/mnt/data/task-…/output'``,
    status ``crashed``); vantage6's algorithm images run as root. fednode runs every
    container as its own ``run_uid`` whatever the image says, so the change is only
    visible to the vantage6 node.
    """
    tag = f"{image.replace('behaviour', 'behaviour-root')}"
    if subprocess.run(["podman", "image", "exists", tag], check=False).returncode != 0:
        context = workdir / "root-image"
        context.mkdir()
        (context / "Containerfile").write_text(f"FROM {image}\nUSER 0:0\n")
        subprocess.run(
            ["podman", "build", "--quiet", "--pull=never", "-t", tag, str(context)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return tag


def remove_v6node_leftovers(nodes: list[NodeProcess]) -> None:
    """vantage6-node leaves a volume per job and its network behind: remove its own."""
    for node in nodes:
        if not node.container_prefix.startswith("vantage6-"):
            continue
        stem = node.container_prefix.removesuffix("-run-") + "-user"
        volumes = subprocess.run(
            ["podman", "volume", "ls", "--format", "{{.Name}}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        mine = [v for v in volumes if v.startswith(f"{stem}-")]
        if mine:
            subprocess.run(
                ["podman", "volume", "rm", "-f", *mine], check=False, capture_output=True
            )
        subprocess.run(
            ["podman", "network", "rm", "-f", f"{stem}-net"], check=False, capture_output=True
        )


@contextlib.contextmanager
def podman_service(workdir: Path) -> Iterator[Path]:
    socket = workdir / "podman.sock"
    process = podman_peer._start_service(socket)
    try:
        yield socket
    finally:
        podman_peer._stop_service(process)


async def wait_ready(
    node: NodeProcess, collab: V6Collaboration, image: str, seen: Seen, seconds: float
) -> bool:
    """One warm-up task (not counted): the node is up, its image cache is warm."""
    task_id = await create(collab, node.org, image, f"warm-{node.org.id}", 0.0)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not node.alive():
            return False
        if await wait_results(seen, {task_id}, seconds=1):
            return True
    return False


async def measure(args: argparse.Namespace, workdir: Path) -> None:
    seen = Seen()
    with (
        podman_service(workdir) as socket,
        server_with_collaboration(workdir, prefix="cmp") as peers,
    ):
        server, collab = peers.server, peers.collaboration
        image = build_behaviour_image(
            PodmanService(
                socket_path=socket,
                base_image="localhost/fednode/python-base:latest",
                average_image="localhost/fednode/average:latest",
                diagnostics_image="localhost/fednode/diagnostics:latest",
                data_dir=REPO / "algorithms" / "data",
            )
        )
        image = as_root(image, workdir)
        db = server.workdir / "v6.sqlite"
        nodes: list[NodeProcess] = []
        watchers: list[asyncio.Task[None]] = []
        try:
            nodes.append(start_fednode(workdir, collab.org_a, server=server, socket=socket))
            nodes.append(start_v6node(workdir, collab.org_b, server=server, socket=socket))
            prefixes = [node.container_prefix for node in nodes]
            watchers = [
                asyncio.create_task(watch_database(db, seen)),
                asyncio.create_task(watch_podman(socket, seen, prefixes)),
            ]
            ready = []
            for node in nodes:
                if await wait_ready(node, collab, image, seen, args.start_seconds):
                    ready.append(node)
                    print(f"{node.label}: up (pid {node.process.pid})", flush=True)
                else:
                    state = "exited" if not node.alive() else "running, no result"
                    print(
                        f"\n{node.label}: NOT READY ({state} after {args.start_seconds:.0f} s); "
                        f"its log ({node.log_path}) ends:\n{node.log_tail()}\n",
                        flush=True,
                    )
            if not ready:
                sys.exit("neither node came up")
            labels = [node.label for node in ready]
            print(f"\nsequential: {args.runs} tasks per node, one at a time ...", flush=True)
            samples = await sequential(ready, collab, image, seen, args.runs)
            report_latency(f"sequential ({args.runs} tasks per node)", samples, seen, labels)
            for size in args.bursts:
                bursts: dict[str, Sample] = {}
                for node in ready:
                    print(f"\nburst: {size} tasks for {node.label} ...", flush=True)
                    bursts[node.label] = await burst(node, collab, image, seen, size)
                report_burst(size, bursts, seen, labels)
            for node in ready:
                print(f"\n{node.label}: still running at the end: {node.alive()}")
        finally:
            for node in nodes:
                stop(node)
            remove_v6node_leftovers(nodes)
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            counts = Counter(seen.status.values())
            print(f"\nrun statuses at the server: {dict(counts)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--bursts", type=lambda s: [int(x) for x in s.split(",") if x], default=[50, 200]
    )
    parser.add_argument("--start-seconds", type=float, default=180)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    subprocess.run([str(REPO / "scripts" / "v6node-proxy-setup")], check=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="fednode-v6cmp-"))
    try:
        asyncio.run(measure(args, workdir))
    finally:
        print(f"load average after: {os.getloadavg()}; work directory {workdir}")
        if not args.keep:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)


if __name__ == "__main__":
    main()
