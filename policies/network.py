"""Network isolation of algorithm pods on Kubernetes, as NetworkPolicy manifests.

The design's rule "the proxy is the only door" becomes two NetworkPolicies in the runs
namespace, selecting the run pods by the labels every run carries:

* ``<prefix>-default-deny``: no ingress, no egress (policy types set, no rules);
* ``<prefix>-egress``: egress to the node's proxy pods (selected by a label the node pod
  really carries, in the proxy's namespace) on the proxy's container port, and to the
  cluster DNS on port 53 — nothing else.

NetworkPolicies are additive, so the second only opens what the first closed. The ports
are the *pod's* ports (policies apply after a Service's address translation).

Pure functions returning plain dicts: this module knows the manifests, not the client
library. The Kubernetes executor applies them with server-side apply at start-up, and the
Helm chart renders the same dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: The label Kubernetes puts on every namespace with the namespace's own name.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


class PeerPods(BaseModel):
    """Pods a run may reach: a label selector in one namespace, on some ports."""

    model_config = ConfigDict(frozen=True)

    namespace: str
    pod_selector: dict[str, str]
    ports: tuple[tuple[int, str], ...]  # (port, protocol)


def dns_peer(
    *, namespace: str = "kube-system", pod_selector: Mapping[str, str] | None = None
) -> PeerPods:
    """The cluster DNS (CoreDNS/kube-dns label ``k8s-app: kube-dns`` by default)."""
    return PeerPods(
        namespace=namespace,
        pod_selector=dict(pod_selector if pod_selector is not None else {"k8s-app": "kube-dns"}),
        ports=((53, "UDP"), (53, "TCP")),
    )


def proxy_peer(*, namespace: str, pod_selector: Mapping[str, str], port: int) -> PeerPods:
    """The node's proxy pods, on the port the proxy container listens on."""
    return PeerPods(namespace=namespace, pod_selector=dict(pod_selector), ports=((port, "TCP"),))


class RunIsolation(BaseModel):
    """Everything the policies need: whose pods, and which peers they may reach."""

    model_config = ConfigDict(frozen=True)

    namespace: str
    run_selector: dict[str, str]
    allowed: tuple[PeerPods, ...] = Field(default_factory=tuple)
    name_prefix: str = "fednode-runs"
    labels: dict[str, str] = Field(default_factory=dict)


def run_network_policies(isolation: RunIsolation) -> list[dict[str, Any]]:
    """The NetworkPolicies isolating run pods: default deny, then egress to ``allowed``."""
    selector = {"matchLabels": dict(isolation.run_selector)}
    deny = _policy(
        isolation,
        f"{isolation.name_prefix}-default-deny",
        {"podSelector": selector, "policyTypes": ["Ingress", "Egress"]},
    )
    egress = _policy(
        isolation,
        f"{isolation.name_prefix}-egress",
        {
            "podSelector": selector,
            "policyTypes": ["Egress"],
            "egress": [_egress_rule(peer) for peer in isolation.allowed],
        },
    )
    return [deny, egress]


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
