"""The apptainer command line, env file, supervisor plan and image references, without apptainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from executors.apptainer.command import (
    NetworkMode,
    PlanError,
    bind_spec,
    env_file_text,
    network_mode,
    run_argv,
    supervisor_plan,
)
from executors.apptainer.config import ApptainerSettings
from executors.apptainer.images import cache_name, failure_text, resolve
from executors.apptainer.records import RunPaths
from executors.base import ImageUnavailable
from executors.spec import DatabaseMount, ProxyEndpoint, Resources, RunSpec

TASKS = Path("/srv/fednode/tasks")


def spec(**fields: Any) -> RunSpec:
    values: dict[str, Any] = {
        "run_id": 7,
        "task_id": 3,
        "organization_id": 1,
        "collaboration_id": 1,
        "image": "harbor2.vantage6.ai/demo/average:latest",
        "input": b"{}",
        "token": SecretStr("jwt"),
        "environment": {"INPUT_FILE": "/mnt/task/input"},
        "resources": Resources(cpu=1.5, memory_mb=256, pids=100),
    }
    values.update(fields)
    return RunSpec(**values)


def argv(run: RunSpec, *, euid: int = 1000, **settings: Any) -> list[str]:
    configured = ApptainerSettings(**settings)
    return run_argv(
        binary="/usr/bin/apptainer",
        spec=run,
        sif=Path("/srv/images/average.sif"),
        paths=RunPaths(TASKS, run.run_id),
        settings=configured,
        mode=network_mode(run, configured),
        euid=euid,
    )


def test_a_run_without_proxy_gets_the_full_isolation_and_no_network() -> None:
    state = "/srv/fednode/tasks/run-7/apptainer"
    assert argv(spec()) == [
        "/usr/bin/apptainer",
        "--quiet",
        "run",
        "--containall",
        "--cleanenv",
        "--no-home",
        "--no-eval",
        "--no-privs",
        "--no-mount",
        "bind-paths",
        "--workdir",
        f"{state}/work",
        "--env-file",
        f"{state}/env",
        "--net",
        "--network",
        "none",
        "--bind",
        "/srv/fednode/tasks/run-7/input:/mnt/task/input:ro",
        "--bind",
        "/srv/fednode/tasks/run-7/token:/mnt/task/token:ro",
        "--bind",
        "/srv/fednode/tasks/run-7/output:/mnt/task/output:rw",
        "--memory",
        str(256 * 1024 * 1024),
        "--memory-swap",
        str(256 * 1024 * 1024),
        "--cpus",
        "1.5",
        "--pids-limit",
        "100",
        "/srv/images/average.sif",
    ]


def test_file_databases_are_bound_read_only_where_the_environment_says_and_services_not() -> None:
    databases = (
        DatabaseMount(label="default", type="csv", uri="/data/a.csv", is_local_path=True),
        DatabaseMount(label="images", type="folder", uri="/data/scans", is_local_path=True),
        DatabaseMount(label="pg", type="sql", uri="postgresql://db/x", is_local_path=False),
    )

    args = argv(spec(databases=databases))

    binds = [args[i + 1] for i, a in enumerate(args) if a == "--bind"]
    assert binds[3:] == [
        "/data/a.csv:/mnt/data/default/a.csv:ro",
        "/data/scans:/mnt/data/images:ro",
    ]


def test_gpus_are_asked_for_with_nv_or_rocm_and_not_otherwise() -> None:
    with_gpu = spec(resources=Resources(gpus=2))

    assert "--nv" in argv(with_gpu)
    assert "--rocm" in argv(with_gpu, gpu_flag="rocm")
    assert "--nv" not in argv(with_gpu, gpu_flag="rocm")
    assert not {"--nv", "--rocm"} & set(argv(spec()))


def test_a_run_with_a_proxy_gets_no_apptainer_network_namespace_but_the_supervisors() -> None:
    run = spec(proxy=ProxyEndpoint(host="127.0.0.1", port=7654))

    relay_unprivileged = argv(run)
    relay_as_root = argv(run, euid=0)
    host = argv(run, proxy_network="host")

    for args in (relay_unprivileged, relay_as_root, host):
        assert "--net" not in args
        assert "--network" not in args
    assert "--userns" in relay_unprivileged  # inside our user namespace, no setuid starter
    assert "--userns" not in relay_as_root
    assert "--userns" not in host


def test_without_cgroup_limits_no_limit_flags_are_passed() -> None:
    args = argv(spec(), cgroup_limits=False)

    assert not {"--memory", "--memory-swap", "--cpus", "--pids-limit"} & set(args)


def test_secrets_never_reach_the_command_line() -> None:
    run = spec(environment={"DB_PASSWORD": "hunter2"}, token=SecretStr("the-jwt"))

    joined = " ".join(argv(run))

    assert "hunter2" not in joined
    assert "the-jwt" not in joined


@pytest.mark.parametrize("path", ["/data/a,b.csv", "/data/a:b.csv"])
def test_bind_paths_apptainer_would_split_are_refused(path: str) -> None:
    with pytest.raises(PlanError, match="may not contain"):
        bind_spec(Path(path), "/mnt/data/x", read_only=True)


def test_the_env_file_quotes_every_value_for_apptainers_shell() -> None:
    text = env_file_text({"A": "plain", "B": 'it\'s $HOME `x` "q"', "EMPTY": ""})

    assert text.splitlines()[1:] == [
        "export A=plain",
        "export B='it'\"'\"'s $HOME `x` \"q\"'",
        "export EMPTY=''",
    ]


def test_an_environment_name_a_shell_cannot_assign_is_refused() -> None:
    with pytest.raises(PlanError, match="MY-DB_DATABASE_URI"):
        env_file_text({"MY-DB_DATABASE_URI": "x"})


def test_the_relay_plan_relays_to_the_proxys_loopback_tcp_port_in_the_hosts_namespace() -> None:
    run = spec(proxy=ProxyEndpoint(host="localhost", port=7654))

    to_tcp = supervisor_plan(
        argv=["x"], spec=run, settings=ApptainerSettings(), mode=NetworkMode.RELAY
    )

    assert to_tcp["network"] == {
        "listen_host": "127.0.0.1",
        "listen_port": 7654,
        "upstream_host": "127.0.0.1",
        "upstream_port": 7654,
    }


def test_the_relay_plan_refuses_a_proxy_host_that_is_not_loopback() -> None:
    remote = spec(proxy=ProxyEndpoint(host="10.0.0.5", port=7654))

    with pytest.raises(PlanError, match="loopback"):
        supervisor_plan(
            argv=["x"], spec=remote, settings=ApptainerSettings(), mode=NetworkMode.RELAY
        )


def test_a_run_without_proxy_has_no_network_in_its_plan() -> None:
    plan = supervisor_plan(
        argv=["x"],
        spec=spec(),
        settings=ApptainerSettings(kill_grace_seconds=4),
        mode=NetworkMode.NONE,
    )

    assert plan == {"argv": ["x"], "environment": {}, "grace_seconds": 4.0, "network": None}


# -- image references ---------------------------------------------------------------------------


def test_a_plain_docker_reference_is_pulled_as_docker_into_the_cache(tmp_path: Path) -> None:
    source = resolve("harbor2.vantage6.ai/demo/average:latest", cache=tmp_path)

    assert source.uri == "docker://harbor2.vantage6.ai/demo/average:latest"
    assert source.sif.parent == tmp_path
    assert source.sif.name.startswith("harbor2.vantage6.ai_demo_average_latest-")


@pytest.mark.parametrize("uri", ["docker://x/y:1", "oras://ghcr.io/o/sif:1", "library://u/c/i:1"])
def test_apptainers_own_references_are_kept(tmp_path: Path, uri: str) -> None:
    source = resolve(uri, cache=tmp_path)

    assert source.uri == uri


def test_a_sif_in_the_cache_runs_as_is_and_one_outside_is_refused(tmp_path: Path) -> None:
    inside = resolve("mine.sif", cache=tmp_path)
    absolute = resolve(str(tmp_path / "mine.sif"), cache=tmp_path)

    assert inside.uri is None
    assert inside == absolute
    with pytest.raises(ImageUnavailable, match="image cache"):
        resolve("../etc/secret.sif", cache=tmp_path)
    with pytest.raises(ImageUnavailable, match="image cache"):
        resolve("/home/someone/x.sif", cache=tmp_path)


def test_other_transports_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageUnavailable, match="docker://, oras://"):
        resolve("https://example.org/x.sif", cache=tmp_path)


def test_cache_names_are_distinct_for_references_that_sanitise_alike() -> None:
    assert cache_name("docker://a/b:1") != cache_name("docker://a_b:1")
    assert cache_name("docker://a/b:1") == cache_name("docker://a/b:1")


def test_a_pull_failure_is_reported_by_apptainers_fatal_line() -> None:
    output = b"INFO:    Converting\nFATAL:   While making image from oci registry: nope\n"

    assert failure_text(output) == "FATAL:   While making image from oci registry: nope"
    assert failure_text(b"") == "(no output)"
