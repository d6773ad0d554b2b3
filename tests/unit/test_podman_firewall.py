"""The podman runs' network firewall: the nftables text it renders, and how the executor's
:class:`RunsFirewall` applies it (against a stand-in ``nft`` that records its input; the
real kernel is in ``tests/integration/test_podman_executor.py``)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest

from executors.base import ExecutorError
from executors.podman.firewall import RunNetwork, RunsFirewall
from policies.podman_firewall import (
    database_access_ruleset,
    isolation_ruleset,
    removal_ruleset,
    table_name,
)

NETWORK = RunNetwork(
    name="fednode-runs",
    bridge="podman1",
    subnet=ipaddress.IPv4Network("10.213.0.0/24"),
    gateway=ipaddress.IPv4Address("10.213.0.1"),
)


def test_the_ruleset_lets_runs_reach_only_the_proxy_ports_on_the_gateway() -> None:
    text = isolation_ruleset(
        network="fednode-runs",
        bridge="podman1",
        subnet="10.213.0.0/24",
        gateway="10.213.0.1",
        proxy_ports=[7654, 8000, 7654],
    )

    assert (
        text
        == """\
# fednode: runs on podman network fednode-runs (bridge podman1) reach only the proxy at
# 10.213.0.1, ports in @proxy_ports; nothing else on this host, and not each other.
table inet fednode-net-fednode-runs {
    set proxy_ports { type inet_service; }
    set db_access { type ipv4_addr . inet_service; }
    chain input { type filter hook input priority filter; policy accept; }
    chain forward { type filter hook forward priority filter; policy accept; }
    chain output { type filter hook output priority filter; policy accept; }
}
add element inet fednode-net-fednode-runs proxy_ports { 7654, 8000 }
flush chain inet fednode-net-fednode-runs input
add rule inet fednode-net-fednode-runs input iifname "podman1" ip daddr 10.213.0.1 \
tcp dport @proxy_ports accept
add rule inet fednode-net-fednode-runs input iifname "podman1" ip daddr 10.213.0.1 \
ip saddr . tcp dport @db_access accept
add rule inet fednode-net-fednode-runs input iifname "podman1" drop
flush chain inet fednode-net-fednode-runs output
flush chain inet fednode-net-fednode-runs forward
add rule inet fednode-net-fednode-runs forward iifname "podman1" drop
add rule inet fednode-net-fednode-runs forward oifname "podman1" drop
table bridge fednode-net-fednode-runs {
    chain forward { type filter hook forward priority filter; policy accept; }
}
flush chain bridge fednode-net-fednode-runs forward
add rule bridge fednode-net-fednode-runs forward meta ibrname "podman1" drop
"""
    )


def test_without_bridge_meta_run_to_run_frames_are_matched_by_the_runs_subnet() -> None:
    text = isolation_ruleset(
        network="n",
        bridge="podman1",
        subnet="10.213.0.0/24",
        gateway="10.213.0.1",
        proxy_ports=[1],
        bridge_by_name=False,
    )

    assert "ibrname" not in text
    assert text.endswith("add rule bridge fednode-net-n forward ip saddr 10.213.0.0/24 drop\n")


def test_removal_deletes_both_tables_whether_or_not_they_exist() -> None:
    assert removal_ruleset("fednode-runs") == (
        "add table inet fednode-net-fednode-runs\n"
        "delete table inet fednode-net-fednode-runs\n"
        "add table bridge fednode-net-fednode-runs\n"
        "delete table bridge fednode-net-fednode-runs\n"
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"bridge": 'podman1" accept; #'},
        {"gateway": "10.9.0.1"},
        {"proxy_ports": []},
        {"proxy_ports": [70000]},
        {"network": "bad name"},
    ],
)
def test_what_would_not_be_a_sound_ruleset_is_refused(fields: dict[str, object]) -> None:
    values: dict[str, object] = {
        "network": "fednode-runs",
        "bridge": "podman1",
        "subnet": "10.213.0.0/24",
        "gateway": "10.213.0.1",
        "proxy_ports": [7654],
        **fields,
    }
    with pytest.raises(ValueError):
        isolation_ruleset(**values)  # type: ignore[arg-type]


def test_table_names_carry_the_network_name() -> None:
    assert table_name("fednode-runs") == "fednode-net-fednode-runs"


def fake_nft(tmp_path: Path, *, exit_code: int = 0, stderr: str = "") -> tuple[str, Path]:
    """An ``nft`` that appends each script it is given to a file and answers as told."""
    record = tmp_path / "scripts.log"
    script = tmp_path / "nft"
    script.write_text(
        "#!/bin/sh\n"
        f'cat >> "{record}"\n'
        f"echo '=====' >> \"{record}\"\n"
        f"printf '%s' '{stderr}' >&2\n"
        f"exit {exit_code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script), record


def applied(record: Path) -> list[str]:
    return [s for s in record.read_text().split("=====\n") if s] if record.exists() else []


def no_bridge_meta_nft(tmp_path: Path) -> tuple[str, Path]:
    """An nft that refuses scripts naming ibrname, as on a kernel without nft_meta_bridge;
    it records each script with its arguments."""
    record = tmp_path / "scripts.log"
    script = tmp_path / "nft"
    script.write_text(
        "#!/bin/sh\n"
        'input=$(cat); printf "%s\\n%s\\n=====\\n" "$*" "$input" >> "' + str(record) + '"\n'
        'case "$input" in *ibrname*) '
        "echo 'Error: Could not process rule: Operation not supported' >&2; "
        "echo ' meta ibrname \"fednode-probe\" accept' >&2; exit 1;; esac\n"
    )
    script.chmod(0o755)
    return str(script), record


async def test_it_applies_once_per_port_and_again_with_both_when_a_run_names_another(
    tmp_path: Path,
) -> None:
    command, record = fake_nft(tmp_path)
    firewall = RunsFirewall(seconds=5, commands=(command,))

    await firewall.allow(NETWORK, proxy_port=7654)
    await firewall.allow(NETWORK, proxy_port=7654)
    await firewall.allow(NETWORK, proxy_port=8000)

    scripts = applied(record)
    assert len(scripts) == 2
    assert "proxy_ports { 7654 }" in scripts[0]
    assert "proxy_ports { 7654, 8000 }" in scripts[1]


async def test_without_nft_a_run_fails_with_the_setting_and_both_ways_out(tmp_path: Path) -> None:
    firewall = RunsFirewall(seconds=5, commands=(str(tmp_path / "no-nft"),))

    with pytest.raises(ExecutorError) as refused:
        await firewall.allow(NETWORK, proxy_port=7654)

    problem = str(refused.value)
    assert "executor.firewall is nftables" in problem
    assert "not installed" in problem
    assert "install nftables" in problem
    assert "executor.firewall: off" in problem


async def test_without_the_right_to_change_the_firewall_a_run_fails_saying_so(
    tmp_path: Path,
) -> None:
    command, _ = fake_nft(
        tmp_path,
        exit_code=1,
        stderr="Error: Could not process rule: Operation not permitted",
    )
    firewall = RunsFirewall(seconds=5, commands=(command,))

    with pytest.raises(ExecutorError) as refused:
        await firewall.allow(NETWORK, proxy_port=7654)
    with pytest.raises(ExecutorError) as refused_again:
        await firewall.allow(NETWORK, proxy_port=7654)

    problem, again = str(refused.value), str(refused_again.value)
    assert "Operation not permitted" in problem
    assert "CAP_NET_ADMIN" in problem
    assert "executor.firewall: off" in problem
    assert again == problem  # a failed apply is tried again by the next run


async def test_on_a_kernel_without_bridge_meta_it_falls_back_to_the_subnet(
    tmp_path: Path,
) -> None:
    command, record = no_bridge_meta_nft(tmp_path)
    firewall = RunsFirewall(seconds=5, commands=(command,))

    await firewall.allow(NETWORK, proxy_port=7654)  # no error: the fallback applied
    await firewall.allow(NETWORK, proxy_port=8000)

    scripts = applied(record)
    assert ["ibrname" in s for s in scripts] == [True, False, False]
    assert "ip saddr 10.213.0.0/24 drop" in scripts[-1]


async def test_on_close_it_takes_only_its_own_ports_out_and_leaves_the_rules(
    tmp_path: Path,
) -> None:
    command, record = fake_nft(tmp_path)
    firewall = RunsFirewall(seconds=5, commands=(command,))
    await firewall.allow(NETWORK, proxy_port=7654)

    await firewall.release()
    await firewall.release()  # nothing more to release

    scripts = applied(record)
    assert len(scripts) == 2
    assert scripts[1] == (
        "add element inet fednode-net-fednode-runs proxy_ports { 7654 }\n"
        "delete element inet fednode-net-fednode-runs proxy_ports { 7654 }\n"
    )


def test_a_runs_database_access_first_takes_away_what_its_address_had_then_adds_its_own() -> None:
    text = database_access_ruleset(
        "fednode-runs", address="10.213.0.7", relay_ports=[15433, 15432], allowed_ports=[15433]
    )

    table = "inet fednode-net-fednode-runs db_access"
    assert text.splitlines() == [
        f"add element {table} {{ 10.213.0.7 . 15432, 10.213.0.7 . 15433 }}",
        f"delete element {table} {{ 10.213.0.7 . 15432, 10.213.0.7 . 15433 }}",
        f"add element {table} {{ 10.213.0.7 . 15433 }}",
    ]


def test_database_access_without_databases_only_takes_away() -> None:
    text = database_access_ruleset(
        "fednode-runs", address="10.213.0.7", relay_ports=[15432], allowed_ports=[]
    )

    assert "delete element" in text.splitlines()[-1]
    with pytest.raises(ValueError, match="not all database relay ports"):
        database_access_ruleset(
            "fednode-runs", address="10.213.0.7", relay_ports=[15432], allowed_ports=[1]
        )


async def test_the_host_is_asked_once_and_the_first_apply_already_fits_it(
    tmp_path: Path,
) -> None:
    command, record = no_bridge_meta_nft(tmp_path)
    firewall = RunsFirewall(seconds=5, commands=(command,))

    assert await firewall.learn_host() is False
    await firewall.allow(NETWORK, proxy_port=7654)

    probe, apply = applied(record)
    assert probe.startswith("-c -f -\n")  # check only: the probe changes nothing
    assert "ibrname" in probe
    assert "ibrname" not in apply and "ip saddr 10.213.0.0/24 drop" in apply


async def test_where_nft_cannot_tell_the_host_is_unknown_and_nothing_is_assumed(
    tmp_path: Path,
) -> None:
    refused, _ = fake_nft(tmp_path, exit_code=1, stderr="Error: Operation not permitted")
    assert await RunsFirewall(seconds=5, commands=(refused,)).learn_host() is None
    assert await RunsFirewall(seconds=5, commands=(str(tmp_path / "no-nft"),)).learn_host() is None
    able, _ = fake_nft(tmp_path)
    assert await RunsFirewall(seconds=5, commands=(able,)).learn_host() is True


def test_with_the_node_uid_only_the_node_opens_connections_into_runs() -> None:
    text = isolation_ruleset(
        network="n",
        bridge="podman1",
        subnet="10.213.0.0/24",
        gateway="10.213.0.1",
        proxy_ports=[8000],
        node_uid=0,
    )
    assert (
        'input iifname "podman1" ip daddr 10.213.0.1 ct state established,related accept\n' in text
    )
    assert 'output oifname "podman1" ct state new meta skuid != 0 drop\n' in text
    assert text.index("established,related accept") < text.index('input iifname "podman1" drop')
