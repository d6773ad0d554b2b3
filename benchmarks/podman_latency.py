"""Podman executor latency, beside the floor: the same libpod calls made directly.

One command (from the repository root, after ``scripts/podman-setup``)::

    .venv/bin/python benchmarks/podman_latency.py [--runs 50]

The workload is the smallest real one: ``localhost/fednode/python-base`` with its default
command (``python3`` reading an empty stdin, which exits at once), so the numbers are the
machinery's cost, not the algorithm's. Runs go one after another (latency, not
contention); then one batch of ``--runs`` started at once shows concurrency.

Measured, per run:

* ``start → running``: from ``executor.start(spec)`` being called to the ``running``
  event reaching the consumer of ``executor.events()``;
* ``exit → event``: from the moment podman records the container's end (``FinishedAt``:
  the ctime of conmon's exit file) to the terminal event reaching the consumer; once with
  the exit watch (inotify on conmon's exit directory, the default) and once with only
  podman's event stream (which podman 4.3 reads by polling its events file every 250 ms);
* ``start → end``: ``start()`` to the terminal event, and the same plus ``cleanup()``
  (container removal).

The floor, measured between the executor's samples on the same warm service, through the
same client (``LibpodClient``, one connection pool): the requests the executor makes for
one run, made directly and in order, with nothing around them: inspect the name (404),
image exists, the run's files written, create (the executor's own create body), start —
*running* —; then ``POST /containers/{name}/wait`` (libpod answers when the container has
stopped; it looks every ``interval``, here 10 ms) and the one inspect the executor makes to
read the exit code — *end* —; then remove — *cleaned*. The floor has no event stream and no
exit watch, so its *container end → known* is libpod's own ``wait`` answer. What the
executor adds over the floor is its own machinery (event subscription, exit watch,
bookkeeping).

(An earlier version compared with a ``podman run --rm`` CLI process: a cold process per
run, with removal, against a warm REST service; not the same work.)

Targets: exit → event p95 ≤ 20 ms; executor start → end ≤ 1.2 x the floor.
The executor talks to a ``podman system service`` this script starts on a private socket
(or the one at ``$FEDNODE_TEST_PODMAN_SOCKET``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import structlog  # noqa: E402

from benchmarks.stats import percentile, summary  # noqa: E402
from executors.base import ExecutorContext  # noqa: E402
from executors.podman.api import LibpodClient  # noqa: E402
from executors.podman.config import PodmanSettings  # noqa: E402
from executors.podman.containers import container_name, create_body, finished_at  # noqa: E402
from executors.podman.executor import PodmanExecutor  # noqa: E402
from executors.runfiles import RunFiles  # noqa: E402
from executors.spec import Phase, RunEvent, RunSpec  # noqa: E402

IMAGE = "localhost/fednode/python-base:latest"


@dataclass
class Series:
    name: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def p95(self) -> float:
        return percentile(self.values, 0.95)

    def line(self) -> str:
        return summary(self.name, [v * 1000 for v in self.values], width=48)


@contextlib.contextmanager
def podman_service() -> Iterator[str]:
    """A podman API socket: ``$FEDNODE_TEST_PODMAN_SOCKET`` or a private service."""
    reused = os.environ.get("FEDNODE_TEST_PODMAN_SOCKET")
    if reused:
        yield reused
        return
    podman = shutil.which("podman")
    if podman is None:
        sys.exit("podman is not installed; run scripts/podman-setup")
    with tempfile.TemporaryDirectory(prefix="fednode-bench-") as scratch:
        path = str(Path(scratch) / "podman.sock")
        process = subprocess.Popen(
            [podman, "system", "service", "--time=0", f"unix://{path}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                with socket.socket(socket.AF_UNIX) as probe:
                    try:
                        probe.connect(path)
                        break
                    except OSError:
                        if time.monotonic() > deadline or process.poll() is not None:
                            sys.exit("podman system service did not start")
                time.sleep(0.05)
            yield path
        finally:
            process.terminate()
            process.wait(timeout=30)


class Consumer:
    """Reads the executor's events; ``expect(run_id, "running" | "end")`` is a future of
    (monotonic time, wall time, event) of when that event reached this consumer."""

    def __init__(self, executor: PodmanExecutor, node_name: str) -> None:
        self.node_name = node_name
        self._waiters: dict[tuple[int, str], asyncio.Future[tuple[float, float, RunEvent]]] = {}
        self._task = asyncio.create_task(self._consume(executor))

    def expect(self, run_id: int, what: str) -> asyncio.Future[tuple[float, float, RunEvent]]:
        future = asyncio.get_running_loop().create_future()
        self._waiters[(run_id, what)] = future
        return future

    async def _consume(self, executor: PodmanExecutor) -> None:
        async for event in executor.events():
            key = (event.run_id, "end" if event.phase.is_terminal else event.phase.value)
            future = self._waiters.pop(key, None)
            if future is not None and not future.done():
                future.set_result((time.monotonic(), time.time(), event))

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def executor_on(
    socket_path: str, task_dir: Path, *, exit_watch: bool
) -> AsyncIterator[tuple[PodmanExecutor, Consumer]]:
    settings = PodmanSettings(
        socket=f"unix://{socket_path}",
        pull_policy="never",
        **({} if exit_watch else {"exits_dir": None}),
    )
    context = ExecutorContext(node_name=f"bench-{uuid.uuid4().hex[:6]}", task_dir=task_dir)
    executor = PodmanExecutor(settings, context=context)
    await executor.open()
    consumer = Consumer(executor, context.node_name)
    try:
        yield executor, consumer
    finally:
        await consumer.aclose()
        await executor.close()


def spec(run_id: int) -> RunSpec:
    return RunSpec(
        run_id=run_id, task_id=run_id, organization_id=1, collaboration_id=1, image=IMAGE
    )


async def finished_wall_time(api: LibpodClient, node_name: str, run_id: int) -> float:
    document = await api.inspect_container(container_name(node_name, run_id))
    assert document is not None
    when = finished_at(document)
    assert when is not None
    return when.timestamp()


async def one_run(
    api: LibpodClient,
    executor: PodmanExecutor,
    consumer: Consumer,
    run_id: int,
    series: dict[str, Series],
) -> None:
    running = consumer.expect(run_id, "running")
    ended = consumer.expect(run_id, "end")
    began = time.monotonic()
    await executor.start(spec(run_id))
    # A container this short may end before "running" is consumed; both are waited for.
    running_at, _, _ = await asyncio.wait_for(running, 30)
    ended_at, ended_wall, event = await asyncio.wait_for(ended, 30)
    if event.phase is not Phase.SUCCEEDED:
        raise SystemExit(f"run {run_id} ended {event.phase} ({event.reason}): {event.message}")
    exit_to_event = ended_wall - await finished_wall_time(api, consumer.node_name, run_id)
    await executor.cleanup(run_id)
    cleaned_at = time.monotonic()
    series["start_running"].values.append(running_at - began)
    series["exit_event"].values.append(exit_to_event)
    series["start_end"].values.append(ended_at - began)
    series["start_cleaned"].values.append(cleaned_at - began)


async def floor_run(
    api: LibpodClient, settings: PodmanSettings, node_name: str, task_dir: Path, run_id: int
) -> tuple[float, float, float, float]:
    """The executor's libpod calls for one run, made directly: (running, end, cleaned)
    seconds after the first call, and container end → known (s)."""
    run = spec(run_id)
    name = container_name(node_name, run_id)
    files = RunFiles(task_dir, run_id)
    began = time.monotonic()
    assert await api.inspect_container(name) is None
    assert await api.image_exists(IMAGE)
    files.prepare(run, owner=(settings.run_uid, settings.run_gid))
    await api.create_container(
        create_body(run, settings=settings, node_name=node_name, files=files)
    )
    await api.start_container(name)
    running = time.monotonic() - began
    # libpod checks the state every ``interval`` (250 ms unless told): 10 ms for a floor
    async with api._request("POST", f"/containers/{name}/wait", params={"interval": "10ms"}):
        pass
    document = await api.inspect_container(name)
    known_wall = time.time()
    end = time.monotonic() - began
    assert document is not None
    finished = finished_at(document)
    assert finished is not None
    await api.remove_container(name)
    cleaned = time.monotonic() - began
    return running, end, cleaned, known_wall - finished.timestamp()


async def measure(socket_path: str, runs: int) -> None:
    task_dir = Path(tempfile.mkdtemp(prefix="fednode-bench-tasks-"))
    names = {
        "start_running": "executor: start() → running event",
        "exit_event": "executor: container end → terminal event",
        "start_end": "executor: start() → terminal event",
        "start_cleaned": "executor: start() → terminal event + cleanup()",
    }
    watched = {key: Series(label) for key, label in names.items()}
    stream_only = {key: Series(label) for key, label in names.items()}
    floor = {
        "start_running": Series("floor: first call → started"),
        "exit_event": Series("floor: container end → wait + inspect answered"),
        "start_end": Series("floor: first call → end known"),
        "start_cleaned": Series("floor: first call → end known + removed"),
    }
    floor_settings = PodmanSettings(socket=f"unix://{socket_path}", pull_policy="never")
    floor_node = f"bench-floor-{uuid.uuid4().hex[:6]}"

    api = LibpodClient(socket_path, timeout=30)
    await api.open()
    print(f"podman executor latency: {runs} sequential runs of {IMAGE} (default command)")
    for i in range(3):  # warm caches: image layers, podman's database, the code paths
        await floor_run(api, floor_settings, floor_node, task_dir, 20_000 + i)
    async with executor_on(socket_path, task_dir, exit_watch=True) as (executor, consumer):
        for i in range(1, 4):
            await one_run(api, executor, consumer, 10_000 + i, {k: Series(k) for k in names})
        for i in range(1, runs + 1):
            await one_run(api, executor, consumer, i, watched)
            running, end, cleaned, known = await floor_run(
                api, floor_settings, floor_node, task_dir, 30_000 + i
            )
            floor["start_running"].values.append(running)
            floor["start_end"].values.append(end)
            floor["start_cleaned"].values.append(cleaned)
            floor["exit_event"].values.append(known)
    async with executor_on(socket_path, task_dir, exit_watch=False) as (executor, consumer):
        for i in range(1, runs + 1):
            await one_run(api, executor, consumer, 1000 + i, stream_only)

    print("\nwith the exit watch (inotify on conmon's exit directory; the default):")
    for key, series in watched.items():
        print(series.line())
        print(floor[key].line())
    print("\nwith podman's event stream only (exits_dir: null):")
    print(stream_only["exit_event"].line())
    print(stream_only["start_end"].line())

    async with executor_on(socket_path, task_dir, exit_watch=True) as (executor, consumer):
        ended = [consumer.expect(5000 + i, "end") for i in range(runs)]
        began = time.monotonic()
        await asyncio.gather(*(executor.start(spec(5000 + i)) for i in range(runs)))
        await asyncio.wait_for(asyncio.gather(*ended), 120)
        batch = time.monotonic() - began
        await asyncio.gather(*(executor.cleanup(5000 + i) for i in range(runs)))
    print(f"\n{runs} runs started at once: all ended in {batch:.2f} s")

    p95_exit = watched["exit_event"].p95 * 1000
    print("\nratios executor / floor (median, p95, max):")
    for key, title in (
        ("start_running", "start → running"),
        ("exit_event", "container end → known"),
        ("start_end", "start → end"),
        ("start_cleaned", "start → end + cleanup"),
    ):
        ours, base = watched[key], floor[key]
        print(
            f"  {title:<24} {ours.median / base.median:5.2f}  {ours.p95 / base.p95:5.2f}"
            f"  {max(ours.values) / max(base.values):5.2f}"
        )
    end_ratio = watched["start_end"].median / floor["start_end"].median
    print("\ntargets:")
    print(f"  exit → event p95 ≤ 20 ms: {p95_exit:.1f} ms  {'ok' if p95_exit <= 20 else 'MISSED'}")
    print(
        f"  executor start → end ≤ 1.2 x the floor (medians): {end_ratio:.2f}x  "
        f"{'ok' if end_ratio <= 1.2 else 'MISSED'}"
    )
    await api.close()
    shutil.rmtree(task_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(30)  # warnings and up
    )
    with podman_service() as socket_path:
        asyncio.run(measure(socket_path, args.runs))


if __name__ == "__main__":
    main()
