"""The podman container body and the reading of container states, without podman."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from executors.base import ANNOTATION_TRACEPARENT, LABEL_NODE, LABEL_RUN, LABEL_TASK
from executors.devices import LABEL_DEVICES, devices_of
from executors.podman.config import PodmanSettings
from executors.podman.containers import (
    LABEL_DEADLINE,
    ContainerState,
    container_name,
    create_body,
    finished_at,
    phase_of,
)
from executors.runfiles import RunFiles
from executors.spec import DatabaseMount, Phase, ProxyEndpoint, Reason, Resources, RunSpec

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def spec(**fields: Any) -> RunSpec:
    values: dict[str, Any] = {
        "run_id": 7,
        "task_id": 3,
        "organization_id": 1,
        "collaboration_id": 1,
        "image": "localhost/fednode/average:latest",
        "input": b"{}",
        "token": SecretStr("jwt"),
        "environment": {"INPUT_FILE": "/mnt/task/input"},
        "deadline_seconds": 90,
    }
    values.update(fields)
    return RunSpec(**values)


def body_of(run: RunSpec, settings: PodmanSettings | None = None) -> dict[str, Any]:
    return create_body(
        run,
        settings=settings or PodmanSettings(),
        node_name="hospital-a",
        files=RunFiles(Path("/srv/tasks"), run.run_id),
    )


def test_every_run_is_isolated_whatever_its_spec_says() -> None:
    body = body_of(spec(resources=Resources(cpu=1.5, memory_mb=512, pids=64)))

    assert body["user"] == "65532:65532"
    assert body["read_only_filesystem"] is True
    assert body["cap_drop"] == ["ALL"]
    assert body["no_new_privileges"] is True
    assert body["seccomp_policy"] == "default"
    assert "privileged" not in body
    assert body["netns"] == {"nsmode": "none"}
    assert body["resource_limits"] == {
        "memory": {"limit": 512 * 1024 * 1024, "swap": 512 * 1024 * 1024},
        "cpu": {"quota": 150_000, "period": 100_000},
        "pids": {"limit": 64},
    }
    assert body["timeout"] == 90
    scratch = body["mounts"][0]
    assert (scratch["destination"], scratch["type"]) == ("/tmp", "tmpfs")
    assert "size=1024m" in scratch["options"]


def test_the_run_files_are_bound_at_mnt_task_and_only_output_is_writable() -> None:
    binds = {m["destination"]: m for m in body_of(spec())["mounts"] if m["type"] == "bind"}

    assert binds["/mnt/task/input"]["source"] == "/srv/tasks/run-7/input"
    assert "ro" in binds["/mnt/task/input"]["options"]
    assert "ro" in binds["/mnt/task/token"]["options"]
    assert "rw" in binds["/mnt/task/output"]["options"]


def test_file_databases_are_bound_read_only_at_their_container_uri_and_services_not_at_all() -> (
    None
):
    databases = (
        DatabaseMount(label="default", type="csv", uri="/data/a.csv", is_local_path=True),
        DatabaseMount(label="images", type="folder", uri="/data/scans", is_local_path=True),
        DatabaseMount(label="omop", type="sql", uri="postgresql://db/x", is_local_path=False),
    )

    binds = {m["destination"]: m for m in body_of(spec(databases=databases))["mounts"]}

    assert binds["/mnt/data/default/a.csv"]["source"] == "/data/a.csv"
    assert binds["/mnt/data/images"]["source"] == "/data/scans"
    assert all("ro" in binds[d]["options"] for d in ("/mnt/data/default/a.csv", "/mnt/data/images"))
    assert not any("postgresql" in m["source"] for m in binds.values())


def test_labels_let_a_restarted_node_find_the_run_and_carry_its_trace() -> None:
    body = body_of(spec(labels={"team": "x"}, trace_context={"traceparent": TRACEPARENT}))

    assert body["name"] == "fednode-hospital-a-run-7"
    assert body["labels"][LABEL_NODE] == "hospital-a"
    assert body["labels"][LABEL_RUN] == "7"
    assert body["labels"][LABEL_TASK] == "3"
    assert body["labels"][LABEL_DEADLINE] == "90"
    assert body["labels"]["team"] == "x"
    assert body["labels"][ANNOTATION_TRACEPARENT] == TRACEPARENT
    assert body["annotations"][ANNOTATION_TRACEPARENT] == TRACEPARENT
    assert body["env"] == {"INPUT_FILE": "/mnt/task/input"}


def test_a_run_with_a_proxy_joins_the_internal_network_instead_of_none() -> None:
    settings = PodmanSettings(network="runs-net")

    body = body_of(spec(proxy=ProxyEndpoint(host="10.213.0.1", port=7654)), settings)

    assert body["netns"] == {"nsmode": "bridge"}
    assert body["Networks"] == {"runs-net": {}}
    assert settings.network_gateway == "10.213.0.1"


def test_the_devices_chosen_for_a_run_are_requested_as_cdi_devices_and_labelled() -> None:
    run = spec(resources=Resources(gpus=2, gpu_type="a100"))
    chosen = ("nvidia.com/gpu=3", "nvidia.com/gpu=1")

    body = create_body(
        run,
        settings=PodmanSettings(),
        node_name="hospital-a",
        files=RunFiles(Path("/srv/tasks"), run.run_id),
        devices=chosen,
    )

    assert body["devices"] == [{"path": "nvidia.com/gpu=3"}, {"path": "nvidia.com/gpu=1"}]
    assert devices_of(body["labels"]) == chosen
    assert "devices" not in body_of(spec()) and LABEL_DEVICES not in body_of(spec())["labels"]


def test_bare_gpu_devices_are_of_the_cdi_kind_and_typed_ones_keep_their_type() -> None:
    settings = PodmanSettings(
        cdi_gpu_kind="amd.com/gpu",
        gpu_devices=["0", {"device": "nvidia.com/gpu=GPU-1", "type": "a100"}],
    )

    assert [(d.device, d.type) for d in settings.gpu_devices] == [
        ("amd.com/gpu=0", None),
        ("nvidia.com/gpu=GPU-1", "a100"),
    ]
    with pytest.raises(ValueError, match="listed more than once"):
        PodmanSettings(gpu_devices=["0", "nvidia.com/gpu=0"])


def test_container_names_are_valid_for_podman_whatever_the_node_is_called() -> None:
    assert container_name("Hospital A/ICU", 12) == "fednode-Hospital-A-ICU-run-12"
    assert container_name("///", 1) == "fednode-node-run-1"


def state(status: str, exit_code: int | None = None, *, oom: bool = False) -> ContainerState:
    labels = {LABEL_RUN: "7", LABEL_TASK: "3", LABEL_DEADLINE: "90"}
    document = {
        "Id": "abc",
        "Config": {"Labels": labels},
        "State": {"Status": status, "ExitCode": exit_code, "OOMKilled": oom},
    }
    found = ContainerState.from_inspect(document)
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("container", "killed", "expected"),
    [
        (state("created"), False, (Phase.STARTING, None, None)),
        (state("created"), True, (Phase.KILLED, Reason.KILLED, None)),
        (state("running"), False, (Phase.RUNNING, None, None)),
        (state("running"), True, (Phase.RUNNING, None, None)),
        (state("exited", 0), False, (Phase.SUCCEEDED, Reason.COMPLETED, 0)),
        (state("exited", 3), False, (Phase.FAILED, Reason.CRASHED, 3)),
        (state("exited", -1), False, (Phase.FAILED, Reason.DEADLINE_EXCEEDED, -1)),
        (state("exited", 137), False, (Phase.FAILED, Reason.OOM_KILLED, 137)),
        (state("exited", 1, oom=True), False, (Phase.FAILED, Reason.OOM_KILLED, 1)),
        (state("exited", 137), True, (Phase.KILLED, Reason.KILLED, 137)),
        (state("stopped", 0), True, (Phase.KILLED, Reason.KILLED, 0)),
    ],
)
def test_container_states_map_onto_phases_and_reasons(
    container: ContainerState, killed: bool, expected: tuple[Phase, Reason | None, int | None]
) -> None:
    verdict = phase_of(container, kill_requested=killed)

    assert verdict is not None
    assert (verdict.phase, verdict.reason, verdict.exit_code) == expected


def test_transitional_states_and_foreign_containers_are_not_read() -> None:
    assert phase_of(state("removing"), kill_requested=False) is None
    assert ContainerState.from_inspect({"Id": "x", "Config": {"Labels": {}}}) is None


def test_list_entries_read_like_inspect_documents() -> None:
    entry = {
        "Id": "abc",
        "Labels": {LABEL_RUN: "7", LABEL_TASK: "3"},
        "State": "exited",
        "ExitCode": 4,
    }

    found = ContainerState.from_list_entry(entry)

    assert found is not None
    assert (found.run_id, found.task_id, found.status, found.exit_code) == (7, 3, "exited", 4)


def test_go_timestamps_with_nanoseconds_are_read_and_the_zero_time_is_none() -> None:
    document = {"State": {"FinishedAt": "2026-11-22T02:26:18.970595222Z"}}

    assert finished_at(document) == datetime(2026, 11, 22, 2, 26, 18, 970595, tzinfo=UTC)
    assert finished_at({"State": {"FinishedAt": "0001-01-01T00:00:00Z"}}) is None


def test_a_run_asking_for_a_relayed_database_by_host_name_finds_the_name_at_the_relay() -> None:
    relayed = [
        DatabaseMount(
            label=label,
            type="sql",
            uri=f"postgresql://u:p@{host}:5432/x",
            is_local_path=False,
            run_host="10.213.0.1",
            run_port=port,
        )
        for label, host, port in (
            ("clinic", "db.hospital.example", 15432),
            ("lab", "192.0.2.10", 15433),
            ("other", "other.hospital.example", 15434),
        )
    ]
    run = spec(
        databases=tuple(relayed),
        requested_databases=("clinic", "lab"),
        proxy=ProxyEndpoint(host="10.213.0.1", port=7654),
    )

    body = body_of(run)

    # A name (kept in the URI, so TLS still matches) leads to the gateway; an IP literal is
    # replaced in the URI instead; a database the run did not ask for is not mapped.
    assert body["hostadd"] == ["db.hospital.example:10.213.0.1"]
    assert body["labels"]["fednode.io/db-clinic"] == "true"
    assert body["labels"]["fednode.io/db-lab"] == "true"
    assert "fednode.io/db-other" not in body["labels"]
    assert [db.container_uri for db in relayed] == [
        "postgresql://u:p@db.hospital.example:15432/x",
        "postgresql://u:p@10.213.0.1:15433/x",
        "postgresql://u:p@other.hospital.example:15434/x",
    ]
