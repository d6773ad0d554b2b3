"""What only the apptainer executor does, run against the FAKE apptainer binary.

The shared behaviour is in ``tests/conformance``. Here: the command lines the fake
apptainer recorded, the image cache and pull policies, apptainer's own fatal errors, the
supervisor (detached, grace period, vanishing), deadlines across a node restart, and the
network arrangements — the ``relay`` namespace is real (made by the supervisor, not by the
fake), so what a run can reach through it is shown for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from executors.apptainer.executor import SUPERVISOR, ApptainerExecutor
from executors.apptainer.records import RunPaths, process_stat, read_record
from executors.base import ExecutorError
from executors.credentials import RegistryCredential
from executors.devices import LABEL_DEVICES
from executors.spec import DatabaseMount, Phase, ProxyEndpoint, Reason, Resources, RunSpec
from tests.conformance.apptainer_harness import BEHAVIOUR_IMAGE, ApptainerHarness
from tests.conformance.harness import AVERAGE_CSV, Behaviour, EventRecorder

pytestmark = [pytest.mark.slow]

PROBE_IMAGE = "docker://localhost/fednode/probe-network:fake"

Made = tuple[ApptainerExecutor, EventRecorder, ApptainerHarness]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Coroutine[Any, Any, Made]]]:
    """``await make(**settings)`` → (executor, recorder, harness); all closed afterwards."""
    opened: list[tuple[ApptainerExecutor, EventRecorder]] = []
    harnesses: list[ApptainerHarness] = []
    node_name = f"apptainer-it-{uuid.uuid4().hex[:8]}"

    async def _make(**settings: Any) -> Made:
        harness = ApptainerHarness(
            node_name=node_name,
            task_dir=tmp_path / "tasks",
            work=tmp_path / "fake-apptainer",
            **settings,
        )
        harness.registry[PROBE_IMAGE] = {"program": "probe-network"}
        harness.write_registry()
        executor = await harness.open_executor()
        recorder = EventRecorder(executor)
        opened.append((executor, recorder))
        harnesses.append(harness)
        return executor, recorder, harness

    yield _make
    for executor, recorder in opened:
        await recorder.aclose()
        await executor.close()
    for harness in harnesses:
        await harness.aclose()


def run_calls(harness: ApptainerHarness) -> list[list[str]]:
    return [c["argv"] for c in harness.calls() if "run" in c["argv"][:3]]


def pull_calls(harness: ApptainerHarness) -> list[list[str]]:
    return [c["argv"] for c in harness.calls() if "pull" in c["argv"][:3]]


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


# -- the command line apptainer gets ------------------------------------------------------------


async def test_the_fake_apptainer_gets_the_isolating_command_line_and_the_env_file(
    make: Callable[..., Coroutine[Any, Any, Made]],
) -> None:
    executor, events, harness = await make()
    database = DatabaseMount(label="default", type="csv", uri=str(AVERAGE_CSV), is_local_path=True)
    spec = harness.spec(1, Behaviour(output="ok"), databases=(database,))

    await executor.start(spec)
    end = await events.terminal(1, timeout=harness.slack)

    assert end.phase is Phase.SUCCEEDED
    [argv] = run_calls(harness)
    paths = RunPaths(harness.task_dir, 1)
    assert argv[:3] == ["--quiet", "run", "--containall"]
    assert {"--cleanenv", "--no-home", "--no-eval", "--no-privs", "--net"} <= set(argv)
    assert flag_values(argv, "--network") == ["none"]
    assert flag_values(argv, "--no-mount") == ["bind-paths"]
    assert flag_values(argv, "--bind") == [
        f"{paths.files.input}:/mnt/task/input:ro",
        f"{paths.files.token}:/mnt/task/token:ro",
        f"{paths.files.output}:/mnt/task/output:rw",
        f"{AVERAGE_CSV}:/mnt/data/default/employees_a.csv:ro",
    ]
    assert flag_values(argv, "--env-file") == [str(paths.env_file)]
    env_lines = paths.env_file.read_text().splitlines()
    assert "export INPUT_FILE=" + spec.environment["INPUT_FILE"] in env_lines
    assert stat.S_IMODE(paths.env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.files.directory.stat().st_mode) == 0o700
    assert argv[-1].startswith(str(harness.settings.image_cache))
    assert (await executor.collect(1)).output == b"ok"


GPU_REPORT = Behaviour(sleep=1, describe={"env": ["CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"]})


async def test_gpu_runs_get_nv_and_their_own_cuda_visible_devices(
    make: Callable[..., Coroutine[Any, Any, Made]],
) -> None:
    executor, events, harness = await make(gpu_devices=["0", "GPU-4f1c"])

    for run_id in (1, 2):
        spec = harness.spec(run_id, GPU_REPORT, resources=Resources(memory_mb=64, gpus=1))
        await executor.start(spec)
    ends = [await events.terminal(run_id, timeout=harness.slack) for run_id in (1, 2)]
    seen = [json.loads((await executor.collect(r)).output)["env"] for r in (1, 2)]

    assert [end.phase for end in ends] == [Phase.SUCCEEDED, Phase.SUCCEEDED]
    assert sorted(env["CUDA_VISIBLE_DEVICES"] for env in seen) == ["0", "GPU-4f1c"]
    for argv in run_calls(harness):
        assert "--nv" in argv
        assert flag_values(argv, "--memory") == [str(64 * 1024 * 1024)]
    for run_id in (1, 2):  # each record names its devices, for a restarted node
        record = read_record(RunPaths(harness.task_dir, run_id))
        assert record is not None
        assert record.labels[LABEL_DEVICES] == seen[run_id - 1]["CUDA_VISIBLE_DEVICES"]


async def test_after_a_restart_a_gpu_run_waits_for_the_device_a_running_run_holds(
    make: Callable[..., Coroutine[Any, Any, Made]],
) -> None:
    executor, events, harness = await make(gpu_devices=["3"], gpu_flag="rocm")
    await executor.start(harness.spec(1, Behaviour(sleep=3), resources=Resources(gpus=1)))
    await events.wait_for(1, Phase.RUNNING, timeout=harness.slack)
    await events.aclose()
    await executor.close()

    restarted, events, harness = await make(gpu_devices=["3"], gpu_flag="rocm")
    starting = asyncio.create_task(
        restarted.start(harness.spec(2, GPU_REPORT, resources=Resources(gpus=1)))
    )
    await events.wait_for(2, Phase.STARTING, timeout=harness.slack)
    launched_while_busy = len(run_calls(harness))
    await events.terminal(1, timeout=harness.slack)
    await starting
    end = await events.terminal(2, timeout=harness.slack)
    report = json.loads((await restarted.collect(2)).output)

    assert launched_while_busy == 1  # only run 1's: run 2 waited for the device
    assert end.phase is Phase.SUCCEEDED
    assert "--rocm" in run_calls(harness)[-1]
    assert report["env"] == {"CUDA_VISIBLE_DEVICES": None, "ROCR_VISIBLE_DEVICES": "3"}


async def test_a_gpu_run_on_an_executor_without_gpus_ends_not_allowed(
    make: Callable[..., Coroutine[Any, Any, Made]],
) -> None:
    executor, events, harness = await make()

    await executor.start(harness.spec(1, resources=Resources(gpus=1)))
    end = await events.terminal(1, timeout=harness.slack)

    assert (end.phase, end.reason) == (Phase.FAILED, Reason.NOT_ALLOWED)
    assert "executor.gpu_devices" in end.message
    assert run_calls(harness) == []


# -- images -------------------------------------------------------------------------------------


async def test_an_image_is_pulled_once_and_every_run_executes_the_cached_sif(
    make: Callable[..., Coroutine[Any, Any, Made]],
) -> None:
    executor, events, harness = await make()

    await asyncio.gather(*(executor.start(harness.spec(i)) for i in (1, 2, 3)))
    for i in (1, 2, 3):
        assert (await events.terminal(i, timeout=harness.slack)).phase is Phase.SUCCEEDED
    await executor.start(harness.spec(4))
    await events.terminal(4, timeout=harness.slack)

    [pull] = pull_calls(harness)
    assert pull[-1] == f"docker://{BEHAVIOUR_IMAGE}"
    sif = Path(pull[-2]).parent
    assert sif == harness.settings.image_cache
    assert len({argv[-1] for argv in run_calls(harness)}) == 1
    assert [p.name for p in sif.iterdir()] == [Path(run_calls(harness)[0][-1]).name]


async def test_pull_policy_always_pulls_on_each_start_and_passes_credentials_in_the_env(
    make: Callable[..., Coroutine[Any, Any, Made]],
) -> None:
    credential = RegistryCredential(registry="localhost", username="robot", password="s3cret")
    executor, events, harness = await make(pull_policy="always", registry_credentials=[credential])

    for i in (1, 2):
        await executor.start(harness.spec(i))
        await events.terminal(i, timeout=harness.slack)

    pulls = [c for c in harness.calls() if "pull" in c["argv"][:3]]
    assert len(pulls) == 2
    assert all(c["docker_username"] == "robot" and c["docker_password_set"] for c in pulls)
    assert not any("s3cret" in " ".join(c["argv"]) for c in harness.calls())


async def test_a_pull_from_another_registry_gets_no_credentials_not_even_inherited_ones(
    make: Callable[..., Coroutine[Any, Any, Made]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The attack: a task names an image on a registry its sender controls. Credentials
    # the node has (configured for localhost, or in the node's own environment) must not
    # reach it. (The FAKE apptainer records what a pull's environment held.)
    monkeypatch.setenv("APPTAINER_DOCKER_USERNAME", "inherited")
    monkeypatch.setenv("APPTAINER_DOCKER_PASSWORD", "inherited-secret")
    credential = RegistryCredential(registry="localhost", username="robot", password="s3cret")
    executor, events, harness = await make(pull_policy="always", registry_credentials=[credential])
    harness.registry["docker://attacker.example/fednode/behaviour:fake"] = {"program": "behave"}
    harness.write_registry()

    await executor.start(
        harness.spec(1).model_copy(update={"image": "attacker.example/fednode/behaviour:fake"})
    )
    await events.terminal(1, timeout=harness.slack)

    pulls = [c for c in harness.calls() if "pull" in c["argv"][:3]]
    assert [c["argv"][-1] for c in pulls] == ["docker://attacker.example/fednode/behaviour:fake"]
    assert pulls[0]["docker_username"] is None and not pulls[0]["docker_password_set"]


async def test_pull_policy_never_runs_only_what_is_in_the_cache(
    make: Callable[..., Coroutine[Any, Any, Made]],
) -> None:
    executor, events, harness = await make(pull_policy="never")

    await executor.start(harness.spec(1))
    refused = await events.terminal(1, timeout=harness.slack)
    # An operator places a SIF in the cache; a task names it.
    cache = harness.settings.image_cache
    assert cache is not None
    pulled = operator_pulls(harness, f"docker://{BEHAVIOUR_IMAGE}", cache / "probe.sif")
    await executor.start(harness.spec(2).model_copy(update={"image": "probe.sif"}))
    ran = await events.terminal(2, timeout=harness.slack)

    assert (refused.phase, refused.reason) == (Phase.FAILED, Reason.IMAGE_NOT_FOUND)
    assert "pull policy: never" in refused.message
    assert pulled.returncode == 0
    assert ran.phase is Phase.SUCCEEDED
    assert run_calls(harness)[-1][-1] == str(cache / "probe.sif")
    assert len(pull_calls(harness)) == 1  # only the operator's


async def test_an_oras_reference_is_pulled_as_oras(
    make: Callable[..., Coroutine[Any, Any, Made]],
) -> None:
    executor, events, harness = await make()
    harness.registry["oras://ghcr.io/fednode/behave:fake"] = {"program": "behave"}
    harness.write_registry()

    await executor.start(
        harness.spec(1).model_copy(update={"image": "oras://ghcr.io/fednode/behave:fake"})
    )
    end = await events.terminal(1, timeout=harness.slack)

    assert end.phase is Phase.SUCCEEDED
    assert pull_calls(harness)[0][-1] == "oras://ghcr.io/fednode/behave:fake"


async def test_a_sif_outside_the_image_cache_is_refused_without_calling_apptainer(
    make: Callable[..., Coroutine[Any, Any, Made]], tmp_path: Path
) -> None:
    executor, events, harness = await make()

    await executor.start(harness.spec(1).model_copy(update={"image": str(tmp_path / "x.sif")}))
    end = await events.terminal(1, timeout=harness.slack)

    assert (end.phase, end.reason) == (Phase.FAILED, Reason.IMAGE_NOT_FOUND)
    assert "image cache" in end.message
    assert run_calls(harness) == pull_calls(harness) == []


# -- apptainer's own errors ---------------------------------------------------------------------


async def test_apptainers_fatal_error_ends_the_run_as_start_failed_with_its_message(
    make: Callable[..., Coroutine[Any, Any, Made]], tmp_path: Path
) -> None:
    executor, events, harness = await make()
    gone = DatabaseMount(
        label="default", type="csv", uri=str(tmp_path / "gone.csv"), is_local_path=True
    )

    await executor.start(harness.spec(1, databases=(gone,)))
    end = await events.terminal(1, timeout=harness.slack)

    assert (end.phase, end.reason, end.exit_code) == (Phase.FAILED, Reason.START_FAILED, 255)
    assert "mount source" in end.message and "gone.csv" in end.message


async def test_a_run_exiting_255_on_its_own_is_a_crash_not_a_start_failure(
    make: Callable[..., Coroutine[Any, Any, Made]],
) -> None:
    executor, events, harness = await make()

    await executor.start(harness.spec(1, Behaviour(exit_code=255)))
    end = await events.terminal(1, timeout=harness.slack)

    assert (end.phase, end.reason, end.exit_code) == (Phase.FAILED, Reason.CRASHED, 255)


async def test_a_missing_apptainer_binary_is_an_operator_error_at_open(tmp_path: Path) -> None:
    harness = ApptainerHarness(
        node_name="n", task_dir=tmp_path / "tasks", work=tmp_path / "w", binary="no-such-apptainer"
    )

    with pytest.raises(ExecutorError, match="no-such-apptainer"):
        await harness.open_executor()


async def test_an_apptainer_older_than_1_2_is_refused_at_open(tmp_path: Path) -> None:
    harness = ApptainerHarness(node_name="n", task_dir=tmp_path / "tasks", work=tmp_path / "w")
    old = {**harness.settings.apptainer_environment, "FAKE_APPTAINER_VERSION": "1.1.9"}
    harness.settings = harness.settings.model_copy(update={"apptainer_environment": old})

    with pytest.raises(ExecutorError, match=r"1\.2 or newer"):
        await harness.open_executor()


# -- the supervisor -----------------------------------------------------------------------------


async def test_the_run_is_detached_from_the_node_in_a_session_of_its_own(
    make: Callable[..., Coroutine[Any, Any, Made]],
) -> None:
    executor, events, harness = await make()
    await executor.start(harness.spec(1, Behaviour(sleep=30)))
    await events.wait_for(1, Phase.RUNNING, timeout=harness.slack)

    status = read_record(RunPaths(harness.task_dir, 1))
    assert status is not None and status.supervisor is not None
    supervisor = status.supervisor
    fields = _stat_fields(supervisor.pid)
    apptainer = _stat_fields(supervisor.child_pid)

    assert fields["ppid"] != os.getpid()  # reparented: never the node's child to reap
    assert fields["session"] == supervisor.pid != os.getsid(0)
    assert apptainer["pgrp"] == supervisor.child_pid  # its own group, signalled as one
    await executor.kill(1)
    await events.terminal(1, timeout=harness.slack)


async def test_a_run_that_ignores_sigterm_is_killed_with_sigkill_after_the_grace(
    make: Callable[..., Coroutine[Any, Any, Made]],
) -> None:
    executor, events, harness = await make(kill_grace_seconds=1.0)
    # ignore_sigterm is the fake's own behaviour key: this "algorithm" outlives SIGTERM.
    stubborn = json.dumps({"sleep": 60, "ignore_sigterm": True}).encode()
    await executor.start(harness.spec(2).model_copy(update={"input": stubborn}))
    await events.wait_for(2, Phase.RUNNING, timeout=harness.slack)
    await asyncio.sleep(0.5)  # let the fake install its SIG_IGN

    began = time.monotonic()
    await executor.kill(2)
    end = await events.terminal(2, timeout=harness.slack)

    assert (end.phase, end.reason, end.exit_code) == (Phase.KILLED, Reason.KILLED, 137)
    assert 0.9 < time.monotonic() - began < 5


async def test_a_supervisor_killed_behind_the_nodes_back_loses_the_run_and_takes_apptainer_along(
    make: Callable[..., Coroutine[Any, Any, Made]],
) -> None:
    executor, events, harness = await make()
    await executor.start(harness.spec(1, Behaviour(sleep=60)))
    await events.wait_for(1, Phase.RUNNING, timeout=harness.slack)
    status = read_record(RunPaths(harness.task_dir, 1))
    assert status is not None and status.supervisor is not None

    os.kill(status.supervisor.pid, signal.SIGKILL)
    end = await events.terminal(1, timeout=harness.slack)
    await asyncio.sleep(0.5)

    assert (end.phase, end.reason) == (Phase.FAILED, Reason.LOST)
    assert process_stat(status.supervisor.child_pid) is None or _is_zombie(
        status.supervisor.child_pid
    )


async def test_a_deadline_that_passed_while_the_node_was_down_is_enforced_when_it_returns(
    make: Callable[..., Coroutine[Any, Any, Made]],
) -> None:
    executor, events, harness = await make()
    await executor.start(harness.spec(1, Behaviour(sleep=60), deadline_seconds=2))
    await events.wait_for(1, Phase.RUNNING, timeout=harness.slack)
    await events.aclose()
    await executor.close()  # the node goes down; the run goes on

    await asyncio.sleep(2.5)
    assert read_record(RunPaths(harness.task_dir, 1)).alive  # type: ignore[union-attr]
    began = time.monotonic()
    executor, events, _ = await make()
    end = await events.terminal(1, timeout=harness.slack)

    assert (end.phase, end.reason) == (Phase.FAILED, Reason.DEADLINE_EXCEEDED)
    assert time.monotonic() - began < 3
    assert events.phases(1) == [Phase.RUNNING, Phase.FAILED]


# -- network ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def host_listener() -> AsyncIterator[int]:
    """A service on the host's loopback that a run must not reach; yields its port."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def probe_spec(harness: ApptainerHarness, run_id: int, *, proxy_port: int, outside: int) -> RunSpec:
    return harness._spec(
        run_id,
        PROBE_IMAGE,
        json.dumps({"outside": ["127.0.0.1", outside]}).encode(),
        proxy=ProxyEndpoint(host="127.0.0.1", port=proxy_port),
    )


async def test_with_host_networking_a_run_shares_the_hosts_network(
    make: Callable[..., Coroutine[Any, Any, Made]],
) -> None:
    executor, events, harness = await make(proxy_network="host")

    async with host_listener() as proxy_port, host_listener() as other_port:
        await executor.start(probe_spec(harness, 1, proxy_port=proxy_port, outside=other_port))
        end = await events.terminal(1, timeout=harness.slack)
        output = await executor.collect(1)

    assert end.phase is Phase.SUCCEEDED, output.log
    report = json.loads(output.output)
    assert report["interfaces"] != ["lo"]
    assert report["outside"]["reached"] is True  # no isolation: the documented trade


@contextlib.asynccontextmanager
async def fake_proxy_on_tcp() -> AsyncIterator[int]:
    """Stands in for the node proxy on the host's loopback (what node/ serves today)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 14\r\n\r\nproxy-over-tcp")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_in_the_relay_namespace_a_run_reaches_the_proxy_and_nothing_else(
    make: Callable[..., Coroutine[Any, Any, Made]],
) -> None:
    executor, events, harness = await make(proxy_network="relay")

    async with fake_proxy_on_tcp() as proxy_port, host_listener() as other_port:
        await executor.start(probe_spec(harness, 1, proxy_port=proxy_port, outside=other_port))
        end = await events.terminal(1, timeout=harness.slack)
        output = await executor.collect(1)

    assert end.phase is Phase.SUCCEEDED, output.log
    report = json.loads(output.output)
    assert report["interfaces"] == ["lo"]
    assert report["proxy"]["reached"] is True
    assert report["proxy"]["answer"].endswith("proxy-over-tcp")  # same address, other netns
    assert report["outside"]["reached"] is False  # not even the host's own loopback
    [argv] = run_calls(harness)
    assert "--net" not in argv and "--network" not in argv


UNPRIVILEGED_PROBE = textwrap.dedent(
    """
    import asyncio, json, os, socket, sys
    sys.path.insert(0, sys.argv[1])
    import supervisor

    tcp_port = int(sys.argv[2])
    dialer = supervisor.Dialer("127.0.0.1", tcp_port, [])  # before leaving the host's netns
    listener = supervisor.private_network({"listen_host": "127.0.0.1", "listen_port": 7654})

    async def get(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /probe HTTP/1.0\\r\\n\\r\\n")
        return (await reader.read()).decode()

    async def main():
        server = await asyncio.start_server(
            lambda r, w: supervisor.relay(r, w, upstream=dialer), sock=listener
        )
        answer = await get(7654)
        try:
            socket.create_connection(("127.0.0.1", tcp_port), timeout=2).close()
            outside = True
        except OSError:
            outside = False
        server.close()
        return answer, outside

    answer, outside = asyncio.run(main())
    print(json.dumps({
        "uid": os.geteuid(),
        "uid_map": open("/proc/self/uid_map").read().split(),
        "interfaces": sorted(
            line.split(":")[0].strip() for line in open("/proc/self/net/dev").readlines()[2:]
        ),
        "answer": answer,
        "outside": outside,
    }))
    """
)


async def test_an_unprivileged_supervisor_makes_the_relay_namespace_with_its_own_uid() -> None:
    """The supervisor's namespace code as an unprivileged user (nobody), as on an HPC host."""
    if os.geteuid() != 0:
        # Root is needed to drop to 'nobody'; the test command runs as root (podman and the
        # testbed need it too), so this only skips in a contributor's unprivileged shell.
        pytest.skip("needs root to become another user for the test")
    async with fake_proxy_on_tcp() as host_port:
        process = await asyncio.create_subprocess_exec(
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-I",
            "-c",
            UNPRIVILEGED_PROBE,
            str(SUPERVISOR.parent),
            str(host_port),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=30)

    assert process.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["uid"] == 65534
    assert report["uid_map"] == ["65534", "65534", "1"]  # the same uid, nothing else mapped
    assert report["interfaces"] == ["lo"]
    assert report["answer"].endswith("proxy-over-tcp")  # dialled from the host's netns
    assert report["outside"] is False  # the same TCP port, directly: unreachable


# -- helpers ------------------------------------------------------------------------------------


def operator_pulls(
    harness: ApptainerHarness, uri: str, sif: Path
) -> subprocess.CompletedProcess[bytes]:
    """What an operator does by hand: ``apptainer pull`` into the image cache."""
    return subprocess.run(
        [harness.settings.binary, "pull", str(sif), uri],
        env={**os.environ, **harness.settings.apptainer_environment},
        check=True,
        timeout=30,
    )


def _stat_fields(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rfind(")") + 2 :].split()
    return {"ppid": int(fields[1]), "pgrp": int(fields[2]), "session": int(fields[3])}


def _is_zombie(pid: int) -> bool:
    found = process_stat(pid)
    return found is not None and found[0] == "Z"
