"""What apptainer peering decides without running anything: the runs' host-side
addresses, who takes part, the supervisor's plan, and ``/proc/net/tcp``'s spelling."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest
from pydantic import SecretStr

from executors.apptainer import supervisor
from executors.apptainer.command import (
    RUN_ADDRESSES,
    NetworkMode,
    PeerPlan,
    PlanError,
    peering_refusal,
    run_loopback_address,
    supervisor_plan,
)
from executors.apptainer.config import ApptainerSettings
from executors.apptainer.records import PeerRecord
from executors.ports import DEFAULT_PORTS, DeclaredPort, ImagePorts, configured_ports
from executors.spec import ProxyEndpoint, RunSpec

SECRETSUM = ImagePorts(r"harbor\.example\.org/mpc/secretsum(:.*)?", (DeclaredPort(8888, "shares"),))


def relay_spec(run_id: int = 7) -> RunSpec:
    return RunSpec(
        run_id=run_id,
        task_id=3,
        organization_id=1,
        collaboration_id=1,
        image="harbor.example.org/mpc/secretsum:1",
        token=SecretStr("jwt"),
        proxy=ProxyEndpoint(host="127.0.0.1", port=7654),
    )


def test_a_runs_address_is_derived_from_its_id_inside_127_64_0_0_16() -> None:
    first, second = run_loopback_address(1, ()), run_loopback_address(2, ())

    assert (first, second) == ("127.64.0.2", "127.64.0.3")
    assert run_loopback_address(1 + 65534, ()) == first  # wraps, never .0.0 or .255.255
    assert ipaddress.ip_address(run_loopback_address(65533, ())) in RUN_ADDRESSES
    assert run_loopback_address(65533, ()) == "127.64.255.254"


def test_an_address_another_run_holds_is_skipped() -> None:
    assert run_loopback_address(1, {"127.64.0.2", "127.64.0.3"}) == "127.64.0.4"


def test_when_every_address_is_held_the_run_is_refused() -> None:
    every = {str(RUN_ADDRESSES.network_address + i) for i in range(1, 65535)}

    with pytest.raises(PlanError, match=r"127\.64\.0\.0/16"):
        run_loopback_address(1, every)


def test_host_networking_runs_take_no_part_and_say_why() -> None:
    reason = peering_refusal(NetworkMode.HOST, "127.0.0.1")

    assert reason is not None and "proxy_network: host" in reason
    assert peering_refusal(NetworkMode.NONE, None) == "the run has no network"
    assert "IPv4" in (peering_refusal(NetworkMode.RELAY, "::1") or "")
    assert peering_refusal(NetworkMode.RELAY, "localhost") is None


def test_the_plan_relays_forwarders_out_and_declared_ports_in_for_the_nodes_user() -> None:
    peer = PeerPlan("127.64.0.8", (7700, 7701), (DeclaredPort(8888, "shares"),))

    plan = supervisor_plan(
        argv=["x"],
        spec=relay_spec(),
        settings=ApptainerSettings(),
        mode=NetworkMode.RELAY,
        peer=peer,
        euid=1000,
    )

    assert plan["network"] == {
        "listen_host": "127.0.0.1",
        "listen_port": 7654,
        "upstream_host": "127.0.0.1",
        "upstream_port": 7654,
        "source_host": "127.64.0.8",
        "forward_ports": [7700, 7701],
        "declared_ports": [8888],
        "owner_uid": 1000,
    }


def test_an_image_declaring_a_port_the_node_takes_in_the_namespace_is_refused() -> None:
    peer = PeerPlan("127.64.0.8", (7700,), (DeclaredPort(7700, None),))

    with pytest.raises(PlanError, match="7700"):
        supervisor_plan(
            argv=["x"],
            spec=relay_spec(),
            settings=ApptainerSettings(),
            mode=NetworkMode.RELAY,
            peer=peer,
        )


def test_ports_come_from_the_first_whole_name_rule_else_8888() -> None:
    other = ImagePorts(r"harbor\.example\.org/mpc/.*", (DeclaredPort(9000, None),))

    assert configured_ports("harbor.example.org/mpc/secretsum:1", [SECRETSUM, other]) == [
        DeclaredPort(8888, "shares")
    ]
    assert configured_ports("harbor.example.org/mpc/x", [SECRETSUM, other]) == [
        DeclaredPort(9000, None)
    ]
    assert configured_ports("evil/harbor.example.org/mpc/secretsum", [SECRETSUM]) == list(
        DEFAULT_PORTS
    )


def test_the_record_keeps_the_address_and_ports_or_why_not() -> None:
    taking_part = PeerRecord("127.64.0.8", (DeclaredPort(8888, "shares"),))
    left_out = PeerRecord(unavailable="no isolation")

    assert PeerRecord.from_document(taking_part.document()) == taking_part
    assert PeerRecord.from_document(left_out.document()) == left_out
    assert PeerRecord.from_document(None) is None


def test_the_owner_of_a_loopback_connection_is_read_from_proc_net_tcp() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, peer = server.accept()
        with client, accepted:
            owner = supervisor.tcp_owner(peer, accepted.getsockname())
            nobody = supervisor.tcp_owner(("127.0.0.9", 1), accepted.getsockname())

    assert supervisor._proc_address("127.0.0.1", 8888) == "0100007F:22B8"
    assert owner == os.geteuid()
    assert nobody is None
