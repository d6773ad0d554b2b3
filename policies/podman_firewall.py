"""The host firewall around podman's runs' network, as nftables script text.

An internal podman network has no route out, but that alone does not make the node's proxy
the only door: the host answers on the network's gateway address for every service that
listens on all addresses (sshd, a database, the node's health port), over IPv4 and IPv6
link-local, and runs on the same bridge reach each other directly. Three things close it,
for the runs' bridge only:

* ``inet`` table, ``input`` hook: from the bridge, only TCP to the gateway on a proxy port
  is accepted, and TCP from one run's address to the relay port of a network database
  that run asked for (the ``db_access`` set of address . port pairs,
  :func:`database_access_ruleset`); everything else (IPv4 and IPv6) is dropped;
* ``inet`` table, ``forward`` hook: nothing is routed from or to the bridge (an internal
  network has no route anyway; this keeps it so whatever else the host forwards);
* ``bridge`` table, ``forward`` hook: frames between two ports of the bridge (run to run)
  are dropped, so this holds with or without ``br_netfilter``. The bridge is named with
  ``meta ibrname``, which needs the kernel's ``nft_meta_bridge``; where that is missing
  the rule matches the runs' IPv4 subnet instead (``bridge_by_name=False``), and IPv6
  between runs is then dropped only by the ``inet`` forward rule, which sees bridged
  frames when ``br_netfilter`` passes them to it (``bridge-nf-call-ip6tables``).

In nftables a ``drop`` in any base chain is final while an ``accept`` only ends its own
chain, so these tables can only take away; they never open what another table closes.

One pair of tables per runs' network, named after it (:func:`table_name`). The proxy
ports live in a named set that an apply only *adds* to: two nodes may share one runs'
network (each with its own proxy port), and neither may close the other's door. A node
that stops leaves its port in (its runs keep running and call it again once it is back);
:func:`release_ruleset` takes a port out when a node is removed for good. Everything
else — the chains and their rules, which name the bridge and the gateway — is flushed
and written again in the same transaction, so a ruleset is replaced atomically and
applying it twice changes nothing.

Pure functions returning text for ``nft -f -``: the podman executor applies it
(:mod:`executors.podman.firewall`); nothing here runs a command.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

#: The prefix of every table fednode makes, so ``nft list tables`` shows whose they are.
TABLE_PREFIX = "fednode-net-"
#: The named set of proxy ports in the ``inet`` table.
PORTS_SET = "proxy_ports"
#: The named set of (run address . database relay port) pairs in the ``inet`` table.
DB_ACCESS_SET = "db_access"

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# An nft string in double quotes may hold anything but the quote itself; interface names
# (at most 15 bytes, no "/" or whitespace) are checked against this to be safe to quote.
_INTERFACE = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")


def table_name(network: str) -> str:
    """The name of the ``inet`` and ``bridge`` tables guarding runs' network ``network``."""
    if not _NAME.fullmatch(network):
        raise ValueError(f"network name {network!r} is not a valid podman network name")
    return f"{TABLE_PREFIX}{network}"


def isolation_ruleset(
    *,
    network: str,
    bridge: str,
    subnet: ipaddress.IPv4Network | str,
    gateway: ipaddress.IPv4Address | str,
    proxy_ports: Iterable[int],
    bridge_by_name: bool = True,
    node_uid: int | None = None,
) -> str:
    """The nft script that (re)applies the isolation of ``network``'s ``bridge``.

    ``gateway`` is the bridge's address in ``subnet`` where the proxy listens;
    ``proxy_ports`` are added to those any earlier apply allowed (the set only grows; see
    the module docstring). ``bridge_by_name=False`` is for kernels without
    ``nft_meta_bridge``.

    ``node_uid``: the node connects into runs for peer streams (docs/networking.md); the
    replies to its connections are let back in, and new connections into the bridge from
    any other user of the host are dropped (``meta skuid``; root can enter a container
    anyway).
    """
    table = table_name(network)
    if not _INTERFACE.fullmatch(bridge):
        raise ValueError(f"bridge interface name {bridge!r} is not a network interface name")
    runs_subnet = ipaddress.IPv4Network(subnet)
    address = ipaddress.IPv4Address(gateway)
    if address not in runs_subnet:
        raise ValueError(f"gateway {address} is not in subnet {runs_subnet}")
    run_to_run = f'meta ibrname "{bridge}"' if bridge_by_name else f"ip saddr {runs_subnet}"
    ports = sorted(set(proxy_ports))
    if not ports or not all(0 < port < 65536 for port in ports):
        raise ValueError(f"proxy ports must be 1-65535, at least one: {ports}")
    elements = ", ".join(str(port) for port in ports)
    to_gateway = f'iifname "{bridge}" ip daddr {address}'
    inbound = outbound = ""
    if node_uid is not None:
        if node_uid < 0:
            raise ValueError(f"node uid must be >= 0, got {node_uid}")
        inbound = (
            f'add rule inet {table} input iifname "{bridge}" ip daddr {address} '
            "ct state established,related accept\n"
        )
        outbound = (
            f'add rule inet {table} output oifname "{bridge}" ct state new '
            f"meta skuid != {node_uid} drop\n"
        )
    return f"""\
# fednode: runs on podman network {network} (bridge {bridge}) reach only the proxy at
# {address}, ports in @{PORTS_SET}; nothing else on this host, and not each other.
table inet {table} {{
    set {PORTS_SET} {{ type inet_service; }}
    set {DB_ACCESS_SET} {{ type ipv4_addr . inet_service; }}
    chain input {{ type filter hook input priority filter; policy accept; }}
    chain forward {{ type filter hook forward priority filter; policy accept; }}
    chain output {{ type filter hook output priority filter; policy accept; }}
}}
add element inet {table} {PORTS_SET} {{ {elements} }}
flush chain inet {table} input
add rule inet {table} input {to_gateway} tcp dport @{PORTS_SET} accept
add rule inet {table} input {to_gateway} ip saddr . tcp dport @{DB_ACCESS_SET} accept
{inbound}add rule inet {table} input iifname "{bridge}" drop
flush chain inet {table} output
{outbound}flush chain inet {table} forward
add rule inet {table} forward iifname "{bridge}" drop
add rule inet {table} forward oifname "{bridge}" drop
table bridge {table} {{
    chain forward {{ type filter hook forward priority filter; policy accept; }}
}}
flush chain bridge {table} forward
add rule bridge {table} forward {run_to_run} drop
"""


def database_access_ruleset(
    network: str,
    *,
    address: ipaddress.IPv4Address | str,
    relay_ports: Iterable[int],
    allowed_ports: Iterable[int],
) -> str:
    """The nft script that lets the run at ``address`` reach exactly ``allowed_ports``
    among the database ``relay_ports`` on the gateway, and none of the others.

    Whatever an earlier run with the same address was allowed is taken out first (podman
    hands addresses out again), in the same transaction: a run never inherits another's
    databases. With ``allowed_ports`` empty this only takes away.
    """
    table = table_name(network)
    run = ipaddress.IPv4Address(address)
    relays = sorted(set(relay_ports))
    allowed = sorted(set(allowed_ports))
    if not set(allowed) <= set(relays):
        raise ValueError(f"ports {allowed} are not all database relay ports {relays}")
    if not all(0 < port < 65536 for port in relays):
        raise ValueError(f"relay ports must be 1-65535: {relays}")
    lines = []
    if relays:
        every = ", ".join(f"{run} . {port}" for port in relays)
        # Adding first makes the delete succeed whether or not the pair was there.
        lines.append(f"add element inet {table} {DB_ACCESS_SET} {{ {every} }}")
        lines.append(f"delete element inet {table} {DB_ACCESS_SET} {{ {every} }}")
    if allowed:
        pairs = ", ".join(f"{run} . {port}" for port in allowed)
        lines.append(f"add element inet {table} {DB_ACCESS_SET} {{ {pairs} }}")
    return "".join(f"{line}\n" for line in lines)


def release_ruleset(network: str, proxy_ports: Iterable[int]) -> str:
    """The nft script that takes ``proxy_ports`` out of ``network``'s set, if they are in it
    (adding them first makes the delete succeed either way; both in one transaction)."""
    table = table_name(network)
    elements = ", ".join(str(port) for port in sorted(set(proxy_ports)))
    return (
        f"add element inet {table} {PORTS_SET} {{ {elements} }}\n"
        f"delete element inet {table} {PORTS_SET} {{ {elements} }}\n"
    )


def removal_ruleset(network: str) -> str:
    """The nft script that removes ``network``'s tables, whether or not they exist."""
    table = table_name(network)
    return "".join(
        f"add table {family} {table}\ndelete table {family} {table}\n"
        for family in ("inet", "bridge")
    )
