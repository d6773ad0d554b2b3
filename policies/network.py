"""Network isolation of algorithm pods on Kubernetes, as NetworkPolicy manifests.

The design's rule "the proxy is the only door" becomes two NetworkPolicies in the runs
namespace, selecting the run pods by the labels every run carries:

* ``<prefix>-default-deny``: no ingress, no egress (policy types set, no rules);
* ``<prefix>-egress``: egress to the node's proxy pods (selected by a label the node pod
  really carries, in the proxy's namespace) on the proxy's container port — nothing else.

No DNS: the cluster DNS forwards what it does not know upstream, so a run that may query
it has a channel around the proxy (data encoded in the names it looks up). Runs are given
the proxy Service's ClusterIP, an address, and need no name resolved
(:mod:`executors.kubernetes.executor` reads it from the Service at start-up).

* ``<prefix>-peers``, only where the node carries algorithm-to-algorithm streams
  (``peering``, docs/networking.md): ingress to the runs from the node pods (the node
  connects a peer's stream to the run's declared port) and egress from the runs to the
  node pods on the forwarder ports (the addresses ``/vpn/algorithm/addresses`` hands out).
  Runs still reach no other run, pod or address: every peer connection goes through the
  node, which admits it.

* ``<prefix>-db-<label>``, one per network database the node declares (``sql``,
  ``sparql``, ``omop``): egress to that database's address block and TCP port, for the run
  pods that carry the database's label (``fednode.io/db-<label>: "true"``, put on a run's
  pod only when its task asked for that database) — so a run reaches the databases it
  asked for, and no others.

NetworkPolicies are additive, so the second (and third) only open what the first closed. The ports
are the *pod's* ports (policies apply after a Service's address translation, so traffic
to the ClusterIP is judged as traffic to the proxy pod).

Pure functions returning plain dicts: this module knows the manifests, not the client
library. The Helm chart renders these objects (``runs-networkpolicy.yaml``); the
Kubernetes executor only reads them back at start-up and refuses to start when one is
missing or differs in substance (:func:`policy_differences`) — a node that could write
them could also open its runs' egress. Only out of a cluster (development) is it told to
apply them itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: The label Kubernetes puts on every namespace with the namespace's own name.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
#: The fields of a NetworkPolicy's spec that decide what it allows.
_SUBSTANCE = ("podSelector", "policyTypes", "ingress", "egress")


def policy_name_prefix(node_name: str) -> str:
    """The runs' policies' name prefix for a node: ``fednode-runs-<node>`` as a DNS label,
    short enough for the suffixes (the chart's ``fednode.runsPolicyPrefix`` is the same)."""
    return re.sub(r"[^a-z0-9-]+", "-", f"fednode-runs-{node_name}".lower())[:40].strip("-")


def run_network_policy_names(name_prefix: str) -> tuple[str, str]:
    """The names of the two policies :func:`run_network_policies` always makes."""
    return f"{name_prefix}-default-deny", f"{name_prefix}-egress"


def peers_policy_name(name_prefix: str) -> str:
    """The name of the policy that opens peer streams (only with :class:`PeerAccess`)."""
    return f"{name_prefix}-peers"


class PeerPods(BaseModel):
    """Pods a run may reach: a label selector in one namespace, on some ports."""

    model_config = ConfigDict(frozen=True)

    namespace: str
    pod_selector: dict[str, str]
    ports: tuple[tuple[int, str], ...]  # (port, protocol)


def proxy_peer(*, namespace: str, pod_selector: Mapping[str, str], port: int) -> PeerPods:
    """The node's proxy pods, on the port the proxy container listens on."""
    return PeerPods(namespace=namespace, pod_selector=dict(pod_selector), ports=((port, "TCP"),))


class DatabaseEgress(BaseModel):
    """A network database runs that asked for it may reach: an address block and a port,
    for the run pods that carry ``pod_label`` (set to ``"true"``)."""

    model_config = ConfigDict(frozen=True)

    label: str
    pod_label: str
    cidr: str
    port: int


def database_policy_name(name_prefix: str, label: str) -> str:
    """The name of the egress policy of database ``label`` (a DNS label, at most 63)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", label.lower())
    return f"{name_prefix}-db-{slug}"[:63].strip("-")


class PeerAccess(BaseModel):
    """Peer streams pass the node: it may connect to its runs (any port: the declared
    ports are the images'), and its runs may reach it on the forwarder ports."""

    model_config = ConfigDict(frozen=True)

    namespace: str
    node_selector: dict[str, str]
    forwarder_ports: tuple[int, ...]


class RunIsolation(BaseModel):
    """Everything the policies need: whose pods, and which peers they may reach."""

    model_config = ConfigDict(frozen=True)

    namespace: str
    run_selector: dict[str, str]
    allowed: tuple[PeerPods, ...] = Field(default_factory=tuple)
    databases: tuple[DatabaseEgress, ...] = Field(default_factory=tuple)
    peers: PeerAccess | None = None
    name_prefix: str = "fednode-runs"
    labels: dict[str, str] = Field(default_factory=dict)


def run_network_policies(isolation: RunIsolation) -> list[dict[str, Any]]:
    """The NetworkPolicies isolating run pods: default deny, then egress to ``allowed``."""
    selector = {"matchLabels": dict(isolation.run_selector)}
    deny_name, egress_name = run_network_policy_names(isolation.name_prefix)
    deny = _policy(
        isolation,
        deny_name,
        {"podSelector": selector, "policyTypes": ["Ingress", "Egress"]},
    )
    egress = _policy(
        isolation,
        egress_name,
        {
            "podSelector": selector,
            "policyTypes": ["Egress"],
            "egress": [_egress_rule(peer) for peer in isolation.allowed],
        },
    )
    databases = [
        _policy(
            isolation,
            database_policy_name(isolation.name_prefix, database.label),
            {
                "podSelector": {
                    "matchLabels": {**isolation.run_selector, database.pod_label: "true"}
                },
                "policyTypes": ["Egress"],
                "egress": [
                    {
                        "to": [{"ipBlock": {"cidr": database.cidr}}],
                        "ports": [{"port": database.port, "protocol": "TCP"}],
                    }
                ],
            },
        )
        for database in isolation.databases
    ]
    peers = [] if isolation.peers is None else [_peers_policy(isolation, isolation.peers)]
    return [deny, egress, *peers, *databases]


def _peers_policy(isolation: RunIsolation, peers: PeerAccess) -> dict[str, Any]:
    node_pods = {
        "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: peers.namespace}},
        "podSelector": {"matchLabels": dict(peers.node_selector)},
    }
    return _policy(
        isolation,
        peers_policy_name(isolation.name_prefix),
        {
            "podSelector": {"matchLabels": dict(isolation.run_selector)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [node_pods]}],
            "egress": [
                {
                    "to": [node_pods],
                    "ports": [{"port": port, "protocol": "TCP"} for port in peers.forwarder_ports],
                }
            ],
        },
    )


def _policy(isolation: RunIsolation, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": isolation.namespace}
    if isolation.labels:
        metadata["labels"] = dict(isolation.labels)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": spec,
    }


def _egress_rule(peer: PeerPods) -> dict[str, Any]:
    return {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: peer.namespace}},
                "podSelector": {"matchLabels": dict(peer.pod_selector)},
            }
        ],
        "ports": [{"port": port, "protocol": protocol} for port, protocol in peer.ports],
    }


def policy_differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """What in ``found``'s spec allows other traffic than ``expected``'s (empty: the same).

    Compared in substance: the order of rules, peers, ports and policy types does not
    matter, nor an empty value against a missing one; labels and annotations do not count.
    """
    want, have = expected.get("spec") or {}, found.get("spec") or {}
    problems = []
    for key in _SUBSTANCE:
        if _canonical(want.get(key)) != _canonical(have.get(key)):
            problems.append(
                f"spec.{key} is {json.dumps(have.get(key))}, expected {json.dumps(want.get(key))}"
            )
    return problems


def _canonical(value: Any) -> Any:
    """A form in which equal policies are equal: lists as sorted, empties as ``None``."""
    if isinstance(value, Mapping):
        items = {k: _canonical(v) for k, v in value.items()}
        kept = {k: v for k, v in items.items() if v is not None}
        return kept or None
    if isinstance(value, list):
        values = [_canonical(v) for v in value]
        return sorted(json.dumps(v, sort_keys=True) for v in values) or None
    return value
